"""The Stable Diffusion VAE's parameters: their structure, checksums, halves and weight files.

Everything here is about the weights, not the network (`shortcut_jax.models.vae`, which imports
this module; this module never imports it):

- `VaeArch` (the block structure) and `param_shapes` (every parameter path and shape of it);
- `Vae` (a loaded VAE), `params_checksum`, `random_vae`;
- the two halves of the parameter tree: `encoder_params` (``encoder``, ``quant_conv``: all that
  encoding images needs) and `decoder_params` (``post_quant_conv``, ``decoder``: all that
  decoding latents needs). The train step gets only the first, sampling only the second;
- files: `load_vae` reads our ``.npz`` (flattened Flax paths, written by `save_vae` or
  ``python -m shortcut_jax.tools.convert_vae``) or a ``.safetensors`` file directly, in
  diffusers names (``diffusion_pytorch_model.safetensors``, including the older
  ``query/key/value/proj_attn`` attention names), in the original LDM names
  (``vae-ft-mse-840000-ema-pruned.safetensors``, ``sdxl_vae.safetensors``) or inside a full SD
  checkpoint (``first_stage_model.*``). Pickled torch files (``.ckpt``, ``.pt``, ``.bin``) are
  refused: they are never unpickled. The block structure of a safetensors file is read from its
  tensor shapes.

All public names here are also reachable as `shortcut_jax.models.vae.load_vae` etc.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from shortcut_jax import atomic_files

SD_SCALING_FACTOR = 0.18215
SDXL_SCALING_FACTOR = 0.13025
FORMAT_VERSION = 1
FORMAT_KEY = "__format_version__"
ARCH_KEY = "__arch__"
SCALING_KEY = "__scaling_factor__"
# Compute dtypes of encode / decode (config.vae.dtype); parameters are float32 either way.
DTYPES = ("float32", "bfloat16")
# Top-level parameter groups of each half of the autoencoder.
ENCODER_GROUPS = ("encoder", "quant_conv")
DECODER_GROUPS = ("post_quant_conv", "decoder")


def check_dtype(dtype: str) -> str:
    """`dtype` if it is a compute dtype name in `DTYPES`, else one clear ValueError."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"VAE dtype (config.vae.dtype) = {dtype!r}; allowed: {list(DTYPES)}")
    return dtype


# --------------------------------------------------------------------------------------------
# Structure and loaded VAEs.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VaeArch:
    """The AutoencoderKL block structure (hashable: usable as a static jit argument).

    Attributes:
      in_channels: image channels into the encoder.
      out_channels: image channels out of the decoder.
      latent_channels: latent channels (4 for SD and SDXL).
      block_out_channels: channels of each encoder block (decoder: reversed).
      layers_per_block: resnets per encoder block (decoder blocks have one more).
      norm_num_groups: GroupNorm groups; must divide every channel count.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32

    def __post_init__(self):
        object.__setattr__(
            self, "block_out_channels", tuple(int(c) for c in self.block_out_channels)
        )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or bad or self.layers_per_block < 1:
            raise ValueError(
                f"VaeArch: block_out_channels={self.block_out_channels} must be non-empty and "
                f"divisible by norm_num_groups={self.norm_num_groups}, layers_per_block="
                f"{self.layers_per_block} >= 1"
            )

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_json(self) -> str:
        """The fields as sorted JSON (stored in our .npz files)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VaeArch:
        """The arch of `to_json`'s text."""
        return cls(**json.loads(text))


SD_ARCH = VaeArch()


@dataclasses.dataclass
class Vae:
    """A loaded VAE.

    Attributes:
      arch: the block structure.
      params: nested Flax parameter tree (both halves), float32 numpy arrays; whatever runs on
        devices places only the half it needs (`encoder_params`, `decoder_params`).
      scaling_factor: latent scaling factor.
      checksum: `params_checksum` of the params (the same for the same weights in any format).
      source: the path loaded from.
      dtype: compute dtype name, 'float32' or 'bfloat16'.
    """

    arch: VaeArch
    params: Any
    scaling_factor: float
    checksum: str
    source: str
    dtype: str = "float32"

    @property
    def num_params(self) -> int:
        """Number of parameter values (both halves)."""
        return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self.params))

    @property
    def encoder_params(self) -> dict[str, Any]:
        """The encoder half of `params` (`encoder_params`): what the train step needs."""
        return encoder_params(self.params)

    @property
    def decoder_params(self) -> dict[str, Any]:
        """The decoder half of `params` (`decoder_params`): what sampling needs."""
        return decoder_params(self.params)


@functools.cache
def param_shapes(arch: VaeArch) -> dict[str, tuple[int, ...]]:
    """Flattened parameter paths of `AutoencoderKL` and their shapes, computed from the arch.

    Equal to the shapes of ``AutoencoderKL(arch).init`` (a test pins this) without tracing it.

    Returns:
      ``{'encoder/conv_in/kernel': (3, 3, 3, 128), 'encoder/conv_in/bias': (128,), ...}``;
      kernels HWIO (convs) or (in, out) (attention projections).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cin: int, cout: int, k: int = 3) -> None:
        shapes[f"{prefix}/kernel"], shapes[f"{prefix}/bias"] = (k, k, cin, cout), (cout,)

    def norm(prefix: str, channels: int) -> None:
        shapes[f"{prefix}/scale"] = shapes[f"{prefix}/bias"] = (channels,)

    def resnet(prefix: str, cin: int, cout: int) -> None:
        norm(f"{prefix}/norm1", cin)
        conv(f"{prefix}/conv1", cin, cout)
        norm(f"{prefix}/norm2", cout)
        conv(f"{prefix}/conv2", cout, cout)
        if cin != cout:
            conv(f"{prefix}/conv_shortcut", cin, cout, 1)

    def mid(prefix: str, channels: int) -> None:
        resnet(f"{prefix}/resnets_0", channels, channels)
        norm(f"{prefix}/attention/group_norm", channels)
        for name in ("to_q", "to_k", "to_v", "to_out"):
            shapes[f"{prefix}/attention/{name}/kernel"] = (channels, channels)
            shapes[f"{prefix}/attention/{name}/bias"] = (channels,)
        resnet(f"{prefix}/resnets_1", channels, channels)

    channels, latent = arch.block_out_channels, arch.latent_channels
    last = len(channels) - 1
    conv("encoder/conv_in", arch.in_channels, channels[0])
    previous = channels[0]
    for i, width in enumerate(channels):
        for j in range(arch.layers_per_block):
            resnet(f"encoder/down_blocks_{i}/resnets_{j}", previous if j == 0 else width, width)
        if i != last:
            conv(f"encoder/down_blocks_{i}/downsample", width, width)
        previous = width
    mid("encoder/mid_block", channels[-1])
    norm("encoder/conv_norm_out", channels[-1])
    conv("encoder/conv_out", channels[-1], 2 * latent)
    conv("quant_conv", 2 * latent, 2 * latent, 1)
    conv("post_quant_conv", latent, latent, 1)
    conv("decoder/conv_in", latent, channels[-1])
    mid("decoder/mid_block", channels[-1])
    previous = channels[-1]
    for i, width in enumerate(reversed(channels)):
        for j in range(arch.layers_per_block + 1):
            resnet(f"decoder/up_blocks_{i}/resnets_{j}", previous if j == 0 else width, width)
        if i != last:
            conv(f"decoder/up_blocks_{i}/upsample", width, width)
        previous = width
    norm("decoder/conv_norm_out", channels[0])
    conv("decoder/conv_out", channels[0], arch.out_channels)
    return shapes


def params_checksum(params: Any) -> str:
    """sha256 over sorted flattened paths, shapes and float32 little-endian values."""
    flat = traverse_util.flatten_dict(_as_dict(params), sep="/")
    digest = hashlib.sha256()
    for path in sorted(flat):
        value = np.ascontiguousarray(np.asarray(flat[path], dtype="<f4"))
        digest.update(f"{path}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _as_dict(params: Any) -> dict:
    return params.unfreeze() if hasattr(params, "unfreeze") else dict(params)


def random_vae(arch: VaeArch, seed: int = 0, scaling_factor: float = SD_SCALING_FACTOR) -> Vae:
    """A VAE with torch-like random weights (no compile: drawn with numpy).

    Kernels and conv / dense biases are U(-1/sqrt(fan_in), 1/sqrt(fan_in)); GroupNorm scale 1,
    bias 0. For tests and CPU smoke runs: the latents mean nothing.
    """
    rng = np.random.default_rng(seed)
    shapes = param_shapes(arch)
    flat = {}
    for path in sorted(shapes):
        shape = shapes[path]
        module = path.rsplit("/", 1)[0]
        kernel = shapes.get(f"{module}/kernel")
        if kernel is None:  # GroupNorm
            value = np.ones(shape) if path.endswith("/scale") else np.zeros(shape)
        else:
            bound = 1.0 / np.sqrt(int(np.prod(kernel[:-1])))
            value = rng.uniform(-bound, bound, shape)
        flat[path] = value.astype(np.float32)
    return _make_vae(arch, flat, scaling_factor, f"random_vae(seed={seed})")


def _make_vae(
    arch: VaeArch, flat: dict[str, np.ndarray], scaling_factor: float, source: str, dtype="float32"
) -> Vae:
    params = traverse_util.unflatten_dict(flat, sep="/")
    check_dtype(dtype)
    return Vae(arch, params, float(scaling_factor), params_checksum(params), source, dtype)


def _half(params: Any, groups: tuple[str, ...], what: str) -> dict[str, Any]:
    """The top-level `groups` of a VAE parameter tree (full, or already that half)."""
    tree = _as_dict(params)
    missing = [group for group in groups if group not in tree]
    if missing:
        raise ValueError(
            f"VAE params for {what} need the groups {list(groups)}; missing {missing} (the tree "
            f"has {sorted(tree)})"
        )
    return {group: tree[group] for group in groups}


def encoder_params(params: Any) -> dict[str, Any]:
    """The encoder half of a VAE parameter tree: ``{'encoder', 'quant_conv'}`` (what encoding
    images needs; `params` may be the full tree or this half)."""
    return _half(params, ENCODER_GROUPS, "encoding")


def decoder_params(params: Any) -> dict[str, Any]:
    """The decoder half of a VAE parameter tree: ``{'post_quant_conv', 'decoder'}`` (what
    decoding latents needs; `params` may be the full tree or this half)."""
    return _half(params, DECODER_GROUPS, "decoding")


# --------------------------------------------------------------------------------------------
# Saving.
# --------------------------------------------------------------------------------------------


_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_CONVERT = "python -m shortcut_jax.tools.convert_vae"


def save_vae(
    path: str | os.PathLike,
    vae_or_params: Vae | Any,
    arch: VaeArch | None = None,
    scaling_factor: float | None = None,
) -> None:
    """Writes our ``.npz`` (flattened params, arch JSON, scaling factor) atomically.

    Args:
      path: destination (local or ``gs://``); a temporary file in the same directory is renamed.
      vae_or_params: a `Vae`, or a parameter tree (then ``arch`` and ``scaling_factor`` are
        required).
      arch: the block structure (default: the Vae's).
      scaling_factor: default: the Vae's.
    """
    if isinstance(vae_or_params, Vae):
        arch = arch or vae_or_params.arch
        scaling_factor = vae_or_params.scaling_factor if scaling_factor is None else scaling_factor
        params = vae_or_params.params
    else:
        params = vae_or_params
    if arch is None or scaling_factor is None:
        raise ValueError("save_vae: give arch and scaling_factor with a bare parameter tree")
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(_as_dict(params), sep="/").items()
    }
    _check_flat(flat, param_shapes(arch), f"the parameters to save ({arch})")
    atomic_files.write_npz(
        path,
        **flat,
        **{
            FORMAT_KEY: np.asarray(FORMAT_VERSION),
            ARCH_KEY: np.asarray(arch.to_json()),
            SCALING_KEY: np.asarray(float(scaling_factor), np.float64),
        },
    )


def _check_flat(flat: Mapping[str, Any], expected: Mapping[str, tuple], source: str) -> None:
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [
        f"{k} {tuple(np.shape(flat[k]))} (expected {expected[k]})"
        for k in sorted(set(expected) & set(flat))
        if tuple(np.shape(flat[k])) != tuple(expected[k])
    ]
    problems = mismatch_problems(missing, unexpected, wrong)
    if problems:
        raise ValueError(f"{source} does not match the VAE: " + "; ".join(problems))


def mismatch_problems(
    missing: Iterable[str], unexpected: Iterable[str], wrong: Iterable[str], limit: int = 12
) -> list[str]:
    """One phrase per kind of mismatch, each listing (up to ``limit``) names."""
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        names = sorted(names)
        if names:
            more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
            problems.append(f"{len(names)} {label}: " + ", ".join(names[:limit]) + more)
    return problems


# --------------------------------------------------------------------------------------------
# Name mapping: our flat paths <-> diffusers names <-> original LDM names.
# --------------------------------------------------------------------------------------------


def diffusers_name(path: str) -> str:
    """Our flat path -> the diffusers state-dict name.

    'encoder/down_blocks_0/resnets_1/conv1/kernel' ->
    'encoder.down_blocks.0.resnets.1.conv1.weight'; 'downsample' / 'upsample' ->
    'downsamplers.0.conv' / 'upsamplers.0.conv', 'attention' -> 'attentions.0', 'to_out' ->
    'to_out.0'; kernel and scale -> weight.
    """
    parts = []
    for part in path.split("/"):
        part = re.sub(r"^(down_blocks|up_blocks|resnets)_(\d+)$", r"\1.\2", part)
        part = {
            "downsample": "downsamplers.0.conv",
            "upsample": "upsamplers.0.conv",
            "attention": "attentions.0",
            "to_out": "to_out.0",
            "kernel": "weight",
            "scale": "weight",
        }.get(part, part)
        parts.append(part)
    return ".".join(parts)


_LDM_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def ldm_name(name: str, num_blocks: int) -> str:
    """A diffusers name -> the original LDM (CompVis / Stability) name.

    'decoder.up_blocks.{i}' is 'decoder.up.{num_blocks - 1 - i}' (LDM counts up blocks from the
    highest resolution); resnets are 'block.{j}', mid resnets 'mid.block_1' / 'mid.block_2', the
    attention 'mid.attn_1.{norm,q,k,v,proj_out}', 'conv_shortcut' 'nin_shortcut',
    'conv_norm_out' 'norm_out', samplers 'downsample.conv' / 'upsample.conv'.
    """
    name = re.sub(r"\.down_blocks\.(\d+)\.", r".down.\1.", name)
    name = re.sub(
        r"\.up_blocks\.(\d+)\.", lambda m: f".up.{num_blocks - 1 - int(m.group(1))}.", name
    )
    name = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", name)
    name = name.replace(".downsamplers.0.conv.", ".downsample.conv.")
    name = name.replace(".upsamplers.0.conv.", ".upsample.conv.")
    name = name.replace(".mid_block.block.0.", ".mid.block_1.")
    name = name.replace(".mid_block.block.1.", ".mid.block_2.")
    match = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name)
    if match:
        name = f"{match[1]}.mid.attn_1.{_LDM_ATTENTION[match[2]]}.{match[3]}"
    name = name.replace(".conv_shortcut.", ".nin_shortcut.")
    return name.replace(".conv_norm_out.", ".norm_out.")


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:  # (in, out) -> (out, in)
        return (flax_shape[1], flax_shape[0])
    return flax_shape


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if len(flax_shape) == 4:
        value = value.transpose(2, 3, 1, 0)
    elif len(flax_shape) == 2:
        value = value.reshape(value.shape[:2]).T  # LDM attention 1x1 convs: (C, C, 1, 1)
    return np.ascontiguousarray(value)


def to_state_dict(vae: Vae, layout: str = "diffusers") -> dict[str, np.ndarray]:
    """Our params as a torch-layout state dict (numpy), in 'diffusers' or 'ldm' names.

    LDM attention projections are written as 1x1 convs (C, C, 1, 1) like the original files.
    """
    flat = traverse_util.flatten_dict(_as_dict(vae.params), sep="/")
    state = {}
    for path, value in flat.items():
        value = np.asarray(value, np.float32)
        name = diffusers_name(path)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        if layout == "ldm":
            name = ldm_name(name, len(vae.arch.block_out_channels))
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif layout != "diffusers":
            raise ValueError(f"layout={layout!r}; allowed: 'diffusers', 'ldm'")
        state[name] = np.ascontiguousarray(value)
    return state


_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_FULL_CHECKPOINT_PREFIX = "first_stage_model."
_IGNORED_PREFIXES = ("loss.", "model_ema.")  # LDM training leftovers (discriminator, EMA copy)


def _is_ldm(names: Iterable[str]) -> bool:
    return any(re.match(r"^(encoder|decoder)\.(down|up|mid)\.", name) for name in names)


def _infer_arch(state: Mapping[str, np.ndarray], ldm: bool, norm_num_groups: int) -> VaeArch:
    """Reads the block structure from tensor shapes; unreadable fields keep SD defaults."""
    down = r"^encoder\.down\.(\d+)\." if ldm else r"^encoder\.down_blocks\.(\d+)\."
    blocks = sorted({int(m[1]) for k in state if (m := re.match(down, k))})
    fields: dict[str, Any] = {"norm_num_groups": norm_num_groups}
    if ldm:
        resnet, layers = (
            "encoder.down.{}.block.{}.conv1.weight",
            r"^encoder\.down\.0\.block\.(\d+)\.",
        )
    else:
        resnet = "encoder.down_blocks.{}.resnets.{}.conv1.weight"
        layers = r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."
    channels = [state.get(resnet.format(i, 0)) for i in blocks]
    if blocks and blocks == list(range(len(blocks))) and all(c is not None for c in channels):
        fields["block_out_channels"] = tuple(int(c.shape[0]) for c in channels)
        count = len({m[1] for k in state if (m := re.match(layers, k))})
        fields["layers_per_block"] = count or SD_ARCH.layers_per_block
    for key, field, read in (
        ("encoder.conv_in.weight", "in_channels", lambda s: s[1]),
        ("decoder.conv_out.weight", "out_channels", lambda s: s[0]),
        ("decoder.conv_in.weight", "latent_channels", lambda s: s[1]),
        ("quant_conv.weight", "latent_channels", lambda s: s[0] // 2),
        ("post_quant_conv.weight", "latent_channels", lambda s: s[0]),
    ):
        if key in state and np.ndim(state[key]) == 4 and field not in fields:
            fields[field] = int(read(np.shape(state[key])))
    try:
        return VaeArch(**fields)
    except ValueError as error:
        raise ValueError(
            f"the tensor shapes give an impossible VAE: {error} (the number of GroupNorm groups "
            "is not stored in the weights: pass norm_num_groups, --norm_num_groups)"
        ) from None


def from_state_dict(
    state: Mapping[str, np.ndarray], source: str = "the state dict", norm_num_groups: int = 32
) -> tuple[VaeArch, dict[str, np.ndarray]]:
    """A diffusers / LDM / full-SD-checkpoint state dict (numpy) -> (arch, our flat params).

    Args:
      state: tensor name -> array (any float dtype).
      source: what to name in error messages.
      norm_num_groups: not readable from shapes (32 in every SD / SDXL VAE).

    Returns:
      The inferred arch and flat float32 params with exactly the paths of `param_shapes`.

    Raises:
      ValueError: one message listing every missing, unexpected and wrong-shape tensor.
    """
    if any(k.startswith(_FULL_CHECKPOINT_PREFIX) for k in state):
        state = {
            k[len(_FULL_CHECKPOINT_PREFIX) :]: v
            for k, v in state.items()
            if k.startswith(_FULL_CHECKPOINT_PREFIX)
        }
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    ldm = _is_ldm(state)
    if not ldm:  # diffusers < 0.14 attention names
        state = {
            re.sub(
                r"\.attentions\.0\.(query|key|value|proj_attn)\.",
                lambda m: f".attentions.0.{_DEPRECATED_ATTENTION[m[1]]}.",
                k,
            ): v
            for k, v in state.items()
        }
    arch = _infer_arch(state, ldm, norm_num_groups)
    layout = "LDM" if ldm else "diffusers"
    expected = {}
    for path, shape in param_shapes(arch).items():
        name = diffusers_name(path)
        if ldm:
            name = ldm_name(name, len(arch.block_out_channels))
        expected[name] = (path, shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong, flat = [], {}
    for name in sorted(set(expected) & set(state)):
        path, shape = expected[name]
        want, got = _torch_shape(shape), tuple(np.shape(state[name]))
        if got != want and not (len(want) == 2 and got == want + (1, 1)):
            wrong.append(f"{name} {got} (expected {want})")
        else:
            flat[path] = _to_flax(state[name], shape)
    problems = mismatch_problems(missing, unexpected, wrong)
    if problems:
        raise ValueError(
            f"{source} is not an AutoencoderKL with {arch} in {layout} names: "
            + "; ".join(problems)
        )
    return arch, flat


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def convert_command(out: str) -> str:
    """The shell command converting a downloaded VAE to our .npz at `out`."""
    return (
        f"{_CONVERT} --from <vae-ft-mse-840000-ema-pruned.safetensors | sdxl_vae.safetensors | "
        f"diffusion_pytorch_model.safetensors | a full SD .safetensors> --out {out} "
        f"[--scaling_factor {SDXL_SCALING_FACTOR} for the SDXL VAE]"
    )


def _file_kind(file: epath.Path) -> str:
    """'npz', 'safetensors' or 'pickle', from the suffix, else from the first bytes."""
    name = file.name.lower()
    if name.endswith(_PICKLE_SUFFIXES):
        return "pickle"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".safetensors"):
        return "safetensors"
    with file.open("rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        with file.open("rb") as f, zipfile.ZipFile(f) as archive:
            if any(n.endswith("data.pkl") for n in archive.namelist()):
                return "pickle"
        return "npz"
    if len(head) > 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise ValueError(
        f"{os.fspath(file)!r} is neither our .npz nor a .safetensors file; "
        + convert_command("vae.npz")
    )


def _read_safetensors(file: epath.Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy (a full SD checkpoint: only first_stage_model.*)."""
    from safetensors import numpy as safetensors_numpy
    from safetensors import safe_open

    path = os.fspath(file)
    if os.path.exists(path):  # local: read only what we need
        with safe_open(path, framework="np") as f:
            names = list(f.keys())
            if any(n.startswith(_FULL_CHECKPOINT_PREFIX) for n in names):
                names = [n for n in names if n.startswith(_FULL_CHECKPOINT_PREFIX)]
            return {n: f.get_tensor(n) for n in names}
    return safetensors_numpy.load(file.read_bytes())


def _read_npz(file: epath.Path) -> tuple[VaeArch, float, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(file.read_bytes()), allow_pickle=False) as archive:
        keys = set(archive.files)
        if not {FORMAT_KEY, ARCH_KEY, SCALING_KEY} <= keys:
            raise ValueError(
                f"{os.fspath(file)!r} is not a converted VAE (.npz without {FORMAT_KEY!r}, "
                f"{ARCH_KEY!r} and {SCALING_KEY!r}); {convert_command(os.fspath(file))}"
            )
        version = int(archive[FORMAT_KEY])
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(file)!r} has format version {version}, this code reads "
                f"{FORMAT_VERSION}; reconvert: {convert_command(os.fspath(file))}"
            )
        arch = VaeArch.from_json(str(archive[ARCH_KEY]))
        scaling_factor = float(archive[SCALING_KEY])
        flat = {
            k: np.asarray(archive[k], np.float32)
            for k in keys - {FORMAT_KEY, ARCH_KEY, SCALING_KEY}
        }
    return arch, scaling_factor, flat


def load_vae(
    path: str | os.PathLike,
    *,
    scaling_factor: float | None = None,
    dtype: str = "float32",
    norm_num_groups: int | None = None,
) -> Vae:
    """Loads a VAE from our ``.npz`` or a ``.safetensors`` file (local or ``gs://``).

    Args:
      path: ``.npz`` from `save_vae` / the converter, or ``.safetensors`` in diffusers names,
        LDM names or a full SD checkpoint (only ``first_stage_model.*`` is read).
      scaling_factor: default: the ``.npz``'s stored factor, or `SD_SCALING_FACTOR` for
        safetensors (pass `SDXL_SCALING_FACTOR` for the SDXL VAE).
      dtype: compute dtype, 'float32' or 'bfloat16'.
      norm_num_groups: GroupNorm groups for safetensors (default 32).

    Returns:
      The `Vae`; params are float32 numpy.

    Raises:
      FileNotFoundError: no such file (the message has the convert command).
      ValueError: a pickle file, another format, or not this VAE (one message listing the
        missing, unexpected and wrong-shape tensors).
    """
    check_dtype(dtype)
    file = epath.Path(path)
    source = os.fspath(file)
    if not file.exists():
        out = source if source.lower().endswith(".npz") else "vae.npz"
        raise FileNotFoundError(
            f"VAE weights not found at {source!r}. Download the VAE's .safetensors and convert it "
            "once with:\n  " + convert_command(out)
        )
    kind = _file_kind(file)
    if kind == "pickle":
        raise ValueError(
            f"{source!r} is a pickled torch file; shortcut_jax never unpickles weights. Download "
            "the .safetensors version of the same VAE (every SD / SDXL VAE ships one, e.g. "
            "vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors, "
            "diffusion_pytorch_model.safetensors) and run:\n  " + convert_command("vae.npz")
        )
    if kind == "npz":
        arch, stored_scaling, flat = _read_npz(file)
        if norm_num_groups is not None and norm_num_groups != arch.norm_num_groups:
            arch = dataclasses.replace(arch, norm_num_groups=norm_num_groups)
        _check_flat(flat, param_shapes(arch), repr(source))
        scaling = stored_scaling if scaling_factor is None else scaling_factor
    else:
        state = _read_safetensors(file)
        arch, flat = from_state_dict(state, repr(source), norm_num_groups or 32)
        scaling = SD_SCALING_FACTOR if scaling_factor is None else scaling_factor
    bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"{source!r} has non-finite values in {', '.join(sorted(bad)[:5])}")
    return _make_vae(arch, flat, scaling, source, dtype)
