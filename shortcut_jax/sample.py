"""Sample from a trained run.

    python -m shortcut_jax.sample --workdir runs/mnist --steps 1 --num 1000 --cfg 1.5 \
        --out samples.npz

Writes `images` (N, H, W, C) float32 clipped to [-1, 1] (latent runs are decoded to pixels
first) and `labels` (N,) int32 to the .npz file, and a PNG grid of the first images beside it
(samples.png).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags, logging

from shortcut_jax import checkpoint, images, latent_space, models, sampling, sharding, steps

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


def main(argv: list[str]) -> None:
    """Loads the run, samples, writes the .npz and the PNG grid."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config, state = checkpoint.load_run(_WORKDIR.value, _STEP.value)
    if not 1 <= _STEPS.value <= config.denoise_timesteps:
        raise app.UsageError(
            f"--steps={_STEPS.value}: allowed 1..{config.denoise_timesteps} (denoise_timesteps)"
        )
    num_classes = int(config.data.num_classes)
    labels = None
    if _LABEL.value is not None:
        if not 0 <= _LABEL.value < max(num_classes, 1):
            raise app.UsageError(f"--label={_LABEL.value}: allowed 0..{num_classes - 1}")
        labels = np.full((_NUM.value,), _LABEL.value, np.int32)
    cfg_scale = latent_space.guidance_scale(config, _STEPS.value, _CFG.value)
    mesh = sharding.make_mesh(config, jax.local_devices())
    samples, sample_labels = sampling.sample_batch(
        steps.make_apply_fn(models.get_model(config)),
        state.params if _RAW.value else state.ema_params,
        jax.random.PRNGKey(_SEED.value),
        num=_NUM.value,
        shape=latent_space.model_shape(config),
        labels=labels,
        num_steps=_STEPS.value,
        denoise_timesteps=config.denoise_timesteps,
        cfg_scale=float(cfg_scale),
        num_classes=num_classes,
        batch_size=_BATCH.value,
        mesh=mesh,
    )
    # Latent runs decode to pixels here; images are clipped to [-1, 1] only after decoding.
    samples = latent_space.PixelDecoder.for_config(config, mesh, _BATCH.value)(samples)
    out = os.path.abspath(_OUT.value)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez(out, images=samples.astype(np.float32), labels=sample_labels.astype(np.int32))
    png = os.path.splitext(out)[0] + ".png"
    shown = samples[: _GRID.value]
    if samples.ndim == 2:
        images.scatter_png(png, {f"{_STEPS.value} step(s)": samples})
    else:
        columns = num_classes if 0 < num_classes <= 20 else None
        images.save_grid(png, shown, ncols=columns)
    logging.info(
        "Wrote %d samples (%d steps, cfg %.2f) to %s and %s",
        len(samples),
        _STEPS.value,
        cfg_scale,
        out,
        png,
    )


if __name__ == "__main__":
    app.run(main)
