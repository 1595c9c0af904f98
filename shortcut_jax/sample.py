"""Sample from a trained run.

    python -m shortcut_jax.sample --workdir runs/mnist --steps 1 --num 1000 --cfg 1.5 \
        --out samples.npz

Writes `images` (N, H, W, C) float32 clipped to [-1, 1] (latent runs are decoded to pixels
first) and `labels` (N,) int32 to the .npz file, and a PNG grid of the first images beside it
(samples.png). `--out` may be a bucket path (gs://...); both files are written atomically.
Bad flags or a workdir that is not a run give one line on stderr and exit status 2.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags, logging

from shortcut_jax import (
    atomic_files,
    checkpoint,
    cli_inputs,
    images,
    latent_space,
    models,
    objectives,
    sampling,
    sharding,
    steps,
)

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (written by shortcut_jax.main).")
_STEPS = flags.DEFINE_integer("steps", 1, "Number of sampling steps, 1..denoise_timesteps.")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_CFG = flags.DEFINE_float(
    "cfg",
    None,
    "Guidance scale (default: the run's sample_cfg_scale where its sample_guidance policy "
    "applies it at --steps).",
)
_OUT = flags.DEFINE_string("out", "samples.npz", "Output .npz path.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: newest).")
_LABEL = flags.DEFINE_integer("label", None, "Sample only this class (default: cycle classes).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples per device call.")
_GRID = flags.DEFINE_integer("grid", 100, "How many samples the PNG grid shows.")
flags.mark_flags_as_required(["workdir"])


def write_samples(
    out: str, samples: np.ndarray, labels: np.ndarray, *, title: str, grid: int, num_classes: int
) -> str:
    """Writes the .npz (images float32, labels int32) and a PNG beside it, each atomically.

    Args:
      out: the .npz path, local or a bucket path (gs://...).
      samples: (N, H, W, C) images in [-1, 1], or (N, 2) points of a toy run.
      labels: (N,) class labels.
      title: the scatter plot's panel title (toy runs).
      grid: how many images the PNG grid shows.
      num_classes: the run's classes (one grid column each when there are at most 20).

    Returns:
      The PNG's path.
    """
    if not atomic_files.is_remote(out):
        out = os.path.abspath(out)
    atomic_files.write_npz(out, images=samples.astype(np.float32), labels=labels.astype(np.int32))
    png = os.path.splitext(out)[0] + ".png"
    if samples.ndim == 2:
        images.scatter_png(png, {title: samples})
    else:
        columns = num_classes if 0 < num_classes <= 20 else None
        images.save_grid(png, samples[:grid], ncols=columns)
    return png


def main(argv: list[str]) -> None:
    """Checks the flags and the run, samples, writes the .npz and the PNG grid."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with cli_inputs.errors_as_one_line(checkpoint.CheckpointError):
        _sample()


def _sample() -> None:
    num = cli_inputs.check_positive("--num", _NUM.value)
    cli_inputs.check_positive("--batch_size", _BATCH.value)
    if _GRID.value < 1:
        raise cli_inputs.InputError(f"--grid={_GRID.value}: must be a positive integer")
    cli_inputs.check_guidance_scale("--cfg", _CFG.value)
    if not _OUT.value:
        raise cli_inputs.InputError("--out is empty: pass the .npz path to write")
    step = cli_inputs.checkpoint_step(_WORKDIR.value, _STEP.value)
    config, state = checkpoint.load_run(_WORKDIR.value, step)
    if not 1 <= _STEPS.value <= config.denoise_timesteps:
        raise cli_inputs.InputError(
            f"--steps={_STEPS.value}: allowed 1..{config.denoise_timesteps} (denoise_timesteps)"
        )
    num_classes = int(config.data.num_classes)
    labels = None
    if _LABEL.value is not None:
        if not 0 <= _LABEL.value < max(num_classes, 1):
            raise cli_inputs.InputError(f"--label={_LABEL.value}: allowed 0..{num_classes - 1}")
        labels = np.full((num,), _LABEL.value, np.int32)
    out = _OUT.value if atomic_files.is_remote(_OUT.value) else os.path.abspath(_OUT.value)
    shape = latent_space.model_shape(config)
    if latent_space.uses_vae(config):  # the .npz holds the decoded images, not the latents
        shape = latent_space.pixel_shape(config)
    needed = 4 * num * int(np.prod(shape))  # float32 images (any old file stays until replaced)
    cli_inputs.check_output_directory("--out", os.path.dirname(out), needed)
    cfg_scale = latent_space.guidance_scale(config, _STEPS.value, _CFG.value)
    mesh = sharding.make_mesh(config, jax.local_devices())
    samples, sample_labels = sampling.sample_batch(
        steps.make_apply_fn(models.get_model(config)),
        state.params if _RAW.value else state.ema_params,
        jax.random.PRNGKey(_SEED.value),
        num=num,
        shape=latent_space.model_shape(config),
        labels=labels,
        num_steps=_STEPS.value,
        denoise_timesteps=config.denoise_timesteps,
        cfg_scale=float(cfg_scale),
        num_classes=num_classes,
        batch_size=_BATCH.value,
        mesh=mesh,
        objective=objectives.ObjectiveConfig.from_config(config),
        sharding_rules=sharding.logical_rules(config),
    )
    # Latent runs decode to pixels here; images are clipped to [-1, 1] only after decoding.
    samples = latent_space.PixelDecoder.for_config(config, mesh, _BATCH.value)(samples)
    png = write_samples(
        out,
        samples,
        sample_labels,
        title=f"{_STEPS.value} step(s)",
        grid=_GRID.value,
        num_classes=num_classes,
    )
    logging.info(
        "Wrote %d samples (%d steps, cfg %.2f) to %s and %s",
        len(samples),
        _STEPS.value,
        cfg_scale,
        _OUT.value,
        png,
    )


if __name__ == "__main__":
    app.run(main)
