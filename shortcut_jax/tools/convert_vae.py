"""Converts a Stable Diffusion VAE from .safetensors into shortcut_jax's .npz.

    # SD 1.x / 2.x VAE (sd-vae-ft-mse, LDM names; scaling factor 0.18215 is the default):
    python -m shortcut_jax.tools.convert_vae \
        --from vae-ft-mse-840000-ema-pruned.safetensors --out ~/.cache/shortcut_jax/sd_vae.npz
    # The SDXL VAE (diffusers names) with its scaling factor:
    python -m shortcut_jax.tools.convert_vae --from diffusion_pytorch_model.safetensors \
        --out sdxl_vae.npz --scaling_factor 0.13025

``--from`` takes diffusers names (``diffusion_pytorch_model.safetensors``, also the older
``query/key/value/proj_attn`` attention names), the original LDM names
(``vae-ft-mse-840000-ema-pruned.safetensors``, ``sdxl_vae.safetensors``), or a full SD
checkpoint (only its ``first_stage_model.*`` tensors are read). The block structure is read from
the tensor shapes. Pickled torch files (``.ckpt``, ``.pt``, ``.bin``) are refused: weights are
never unpickled. Reading needs only the ``safetensors`` package (numpy API), no torch.

The output (see `shortcut_jax.models.vae_weights.save_vae`) holds the flattened Flax
parameters, the architecture as JSON and the scaling factor;
`shortcut_jax.models.vae_weights.load_vae` reads it (so does ``config.vae.path``). The printed
checksum is the same for the .npz and its source file. A missing, refused or unreadable --from
and an --out that cannot be written give one line on stderr and exit status 1, bad flags status 2
(the rule of `shortcut_jax.cli_inputs`).
"""

from __future__ import annotations

import math

from absl import app, flags

from shortcut_jax import cli_inputs
from shortcut_jax.models import vae as vae_lib

_FROM = flags.DEFINE_string(
    "from", None, "The VAE .safetensors (diffusers or LDM names, or a full SD checkpoint)."
)
_OUT = flags.DEFINE_string("out", None, "Output .npz path (local or gs://).")
_SCALING = flags.DEFINE_float(
    "scaling_factor",
    None,
    f"Latent scaling factor stored with the weights (default {vae_lib.SD_SCALING_FACTOR}; "
    f"the SDXL VAE uses {vae_lib.SDXL_SCALING_FACTOR}).",
)
_GROUPS = flags.DEFINE_integer(
    "norm_num_groups",
    None,
    "GroupNorm groups, not readable from shapes (default 32 as in SD/SDXL; an .npz keeps its own).",
)
flags.mark_flags_as_required(["from", "out"])


def convert(
    source: str,
    out: str,
    scaling_factor: float | None = None,
    norm_num_groups: int | None = None,
) -> vae_lib.Vae:
    """Loads ``source`` (.safetensors, or our .npz), checks it and writes ``out`` atomically.

    Args:
      source: the VAE file.
      out: destination .npz.
      scaling_factor: default: `vae_lib.SD_SCALING_FACTOR` (or the .npz's own).
      norm_num_groups: GroupNorm groups (default 32, or the .npz's own).

    Returns:
      The loaded `vae_lib.Vae` (its checksum is the one of ``out``).

    Raises:
      FileNotFoundError, ValueError: see `vae_lib.load_vae`.
    """
    vae = vae_lib.load_vae(source, scaling_factor=scaling_factor, norm_num_groups=norm_num_groups)
    vae_lib.save_vae(out, vae)
    return vae


def describe(vae: vae_lib.Vae) -> str:
    """Arch, parameter count, scaling factor and checksum, one per line."""
    arch = vae.arch
    return "\n".join(
        [
            f"arch: block_out_channels={arch.block_out_channels}, layers_per_block="
            f"{arch.layers_per_block}, latent_channels={arch.latent_channels}, in/out channels="
            f"{arch.in_channels}/{arch.out_channels}, norm_num_groups={arch.norm_num_groups} "
            f"(downsample factor {arch.downsample_factor})",
            f"parameters: {vae.num_params:,}",
            f"scaling_factor: {vae.scaling_factor}",
            f"checksum: {vae.checksum}",
        ]
    )


def main(argv: list[str]) -> None:
    """Converts --from into --out and describes the result."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # A file that is missing, pickled, or not a VAE (ValueError) is the input's fault: status 1.
    with cli_inputs.errors_as_one_line(OSError, ValueError):
        if _SCALING.value is not None and not (
            math.isfinite(_SCALING.value) and _SCALING.value > 0
        ):
            raise cli_inputs.InputError(f"--scaling_factor={_SCALING.value}: a number > 0")
        if _GROUPS.value is not None:
            cli_inputs.check_positive("--norm_num_groups", _GROUPS.value)
        vae = convert(_FROM.value, _OUT.value, _SCALING.value, _GROUPS.value)
    print(f"wrote {_OUT.value} from {_FROM.value}\n{describe(vae)}", flush=True)


if __name__ == "__main__":
    cli_inputs.run(main)
