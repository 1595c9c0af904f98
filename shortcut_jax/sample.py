"""Sample from a trained run, in the files FID tools read.

    python -m shortcut_jax.sample --workdir runs/mnist --steps 1 --num 50000 --out samples.npz

Only the parameters it samples with are read from the checkpoint (the EMA, or the raw ones with
--raw_params): `checkpoint.load_params`. Samples are drawn, decoded (latent runs) and written
chunk by chunk (--batch_size), so --num 50000 needs memory for one chunk, not for all of them.

--format (default: adm for image runs, npz_float for 2-D toy runs):
  adm        the ADM evaluator's .npz (openai/guided-diffusion evaluations/evaluator.py):
             `arr_0` (N, H, W, C) uint8 = ((x + 1) * 127.5).clip(0, 255) truncated, as its
             image_sample.py writes, and `arr_1` (N,) int64 labels for class-conditional runs.
  npz_float  `images` (N, H, W, C) float32 clipped to [-1, 1] (or (N, 2) toy points) and
             `labels` (N,) int32.
  png        a folder --out holding 000000.png, 000001.png, ... (the adm pixels; sorted names
             are the sample order) and labels.txt (one label a line), for pytorch-fid / clean-fid.
A PNG grid of the first samples is written beside (samples.npz -> samples.png). Every file
appears whole or not at all, also on a bucket (gs://...). Bad flags give one line on stderr and
exit status 2; a workdir that is not a run, an unreadable checkpoint or an output that cannot be
written one line and exit status 1 (the rule of `shortcut_jax.cli_inputs`). Only this package's
INFO lines are logged (--verbosity=1 shows the libraries' too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
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
    preemption,
    sampling,
    sharding,
    steps,
)

FORMATS = ("adm", "npz_float", "png")
FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command-line flags; defined only when this module runs as a script, so importing it
    (tests, notebooks) never clashes with another CLI's flags of the same name (--num)."""
    flags.DEFINE_string("workdir", None, "Run directory (written by shortcut_jax.main).")
    flags.DEFINE_integer("steps", 1, "Number of sampling steps, 1..denoise_timesteps.")
    flags.DEFINE_integer("num", 64, "Number of samples.")
    flags.DEFINE_float(
        "cfg",
        None,
        "Guidance scale (default: the run's sample_cfg_scale where its sample_guidance policy "
        "applies it at --steps).",
    )
    flags.DEFINE_string(
        "out", None, "Output .npz path, or folder for --format png (default samples.npz / samples)."
    )
    flags.DEFINE_enum(
        "format",
        None,
        FORMATS,
        "Output format (default: adm for images, npz_float for toy points).",
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: newest).")
    flags.DEFINE_integer("label", None, "Sample only this class (default: cycle classes).")
    flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA.")
    flags.DEFINE_integer("batch_size", 256, "Samples per device call and per write.")
    flags.DEFINE_integer("grid", 100, "How many samples the PNG grid shows.")
    flags.mark_flags_as_required(["workdir"])


# (pixels (B, ...) float32, labels (B,) int32) -> None, called once per chunk in order.
ChunkWriter = Callable[[np.ndarray, np.ndarray], None]


def grid_path(out: str) -> str:
    """The grid PNG beside `out`: samples.npz -> samples.png, folder samples/ -> samples.png."""
    return os.path.splitext(out.rstrip("/"))[0] + ".png"


@contextlib.contextmanager
def sample_writer(
    out: str, fmt: str, num: int, shape: tuple[int, ...], labels: np.ndarray, conditional: bool
) -> Iterator[ChunkWriter]:
    """Yields a writer taking the samples chunk by chunk; the output appears when the block ends.

    Args:
      out: the .npz path, or the folder for 'png'; local or gs://.
      fmt: one of FORMATS.
      num: the number of samples that will be written.
      shape: one sample's shape, (H, W, C) pixels or (2,) toy points.
      labels: (num,) the labels of all the samples (written once, after the samples).
      conditional: whether the run is class-conditional (ADM writes arr_1 only then).
    """
    if fmt == "png":
        with _png_writer(out, num, labels, conditional) as write:
            yield write
        return
    key, dtype, quantize = ("arr_0", np.uint8, images.quantize_adm)
    if fmt == "npz_float":
        key, dtype, quantize = ("images", np.float32, lambda x: np.asarray(x, np.float32))
    with images.npz_stream(out) as members:
        members.begin(key, (num, *shape), dtype)
        yield lambda pixels, _: members.write(quantize(pixels))
        members.end()
        if fmt == "npz_float":
            members.add("labels", labels.astype(np.int32))
        elif conditional:
            members.add("arr_1", labels.astype(np.int64))  # what ADM's torch labels become


@contextlib.contextmanager
def _png_writer(out: str, num: int, labels: np.ndarray, conditional: bool) -> Iterator[ChunkWriter]:
    folder = images.PngFolder(out, num)
    written = [0]

    def write(pixels: np.ndarray, _: np.ndarray) -> None:
        folder.write(written[0], images.quantize_adm(pixels))
        written[0] += len(pixels)

    try:
        yield write
        if written[0] != num:
            raise ValueError(f"{out}: {written[0]} of {num} samples written")
        if conditional:
            folder.write_text("labels.txt", "".join(f"{int(label)}\n" for label in labels))
        folder.finish()
    except BaseException:
        folder.abandon()
        raise


def write_samples(
    out: str,
    samples: np.ndarray,
    labels: np.ndarray,
    *,
    title: str,
    grid: int,
    num_classes: int,
    fmt: str = "npz_float",
) -> str:
    """Writes all `samples` at once in format `fmt` and the PNG grid beside, each atomically.

    Args:
      out: the .npz path (the folder for 'png'), local or a bucket path (gs://...).
      samples: (N, H, W, C) images in [-1, 1], or (N, 2) points of a toy run.
      labels: (N,) class labels.
      title: the scatter plot's panel title (toy runs).
      grid: how many images the PNG grid shows.
      num_classes: the run's classes (one grid column each when there are at most 20).
      fmt: one of FORMATS.

    Returns:
      The PNG grid's path.
    """
    if not atomic_files.is_remote(out):
        out = os.path.abspath(out)
    samples, labels = np.asarray(samples), np.asarray(labels)
    with sample_writer(out, fmt, len(samples), samples.shape[1:], labels, num_classes > 0) as write:
        write(samples, labels)
    return write_grid(out, samples[:grid], title=title, num_classes=num_classes)


def write_chunks(
    chunks: Iterator[tuple[np.ndarray, np.ndarray]], write: ChunkWriter, num: int, grid: int
) -> np.ndarray:
    """Passes every (pixels, labels) chunk to `write`, holding no chunk after it is written.

    Returns:
      A copy of the first `grid` samples (for the PNG grid).
    """
    shown, done = [], 0
    for pixels, labels in chunks:
        write(pixels, labels)
        if done < grid:
            shown.append(pixels[: grid - done].copy())  # a copy: a view would keep the chunk
        done += len(pixels)
        logging.log_every_n_seconds(logging.INFO, "%d of %d samples", 30, done, num)
    return np.concatenate(shown)


def write_grid(out: str, samples: np.ndarray, *, title: str, num_classes: int) -> str:
    """Writes the grid (or the scatter plot of toy points) of `samples` beside `out`."""
    png = grid_path(out)
    if samples.ndim == 2:
        images.scatter_png(png, {title: samples})
    else:
        columns = num_classes if 0 < num_classes <= 20 else None
        images.save_grid(png, samples, ncols=columns)
    return png


def sample_chunks(
    config: ml_collections.ConfigDict,
    params: Any,
    rng: jax.Array,
    labels: np.ndarray,
    *,
    num_steps: int,
    cfg_scale: float,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (pixels, labels) chunks of at most `batch_size` samples, in order.

    Sample i starts from the noise of fold_in(rng, i), as in `sampling.sample_batch` (so the
    result equals one `sample_batch` call over all the labels); latent runs are decoded per
    chunk. Pixels are float32 clipped to [-1, 1] ((B, 2) points for toy runs).
    """
    shape = tuple(int(size) for size in latent_space.model_shape(config))
    sampler = _mesh_sampler(config, params, mesh, num_steps=num_steps, cfg_scale=cfg_scale)
    decode = latent_space.PixelDecoder.for_config(config, mesh, batch_size)
    chunk = sharding.round_up_to_shards(min(batch_size, len(labels)), mesh)
    for start in range(0, len(labels), chunk):
        chunk_labels = labels[start : start + chunk]
        valid = len(chunk_labels)
        indices = jnp.arange(start, start + chunk, dtype=jnp.uint32)
        noise = np.asarray(sampling.noise_at(rng, indices, shape))
        padded = np.pad(chunk_labels, (0, chunk - valid))
        out = sampler(params, sharding.shard_batch(mesh, noise), sharding.shard_batch(mesh, padded))
        yield decode(sharding.gather(out)[:valid]), chunk_labels


def _mesh_sampler(
    config: ml_collections.ConfigDict,
    params: Any,
    mesh: jax.sharding.Mesh,
    *,
    num_steps: int,
    cfg_scale: float,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """The run's sampler jitted over `mesh` (the program `sampling.sample_batch` runs).

    `sample_batch` draws the noise of examples 0..num-1 only; chunks of one long run need the
    noise of examples start..start+chunk, so the sharded program is called here directly.
    """
    settings = {
        "num_steps": num_steps,
        "denoise_timesteps": int(config.denoise_timesteps),
        "cfg_scale": cfg_scale,
        "num_classes": int(config.data.num_classes),
        "objective": objectives.ObjectiveConfig.from_config(config),
    }
    apply_fn = steps.make_apply_fn(models.get_model(config))
    sampling.make_sampler(apply_fn, **settings)  # validates the settings before compiling
    return sampling.mesh_sampler(
        apply_fn, params, mesh, sharding_rules=sharding.logical_rules(config), **settings
    )


def main(argv: list[str]) -> None:
    """Checks the flags and the run, samples, writes the samples and the PNG grid."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    out = FLAGS.out or "the output"
    unwritten = (
        f"{out} may hold some of the PNG files: delete it before rerunning"
        if FLAGS.format == "png" and atomic_files.is_remote(out)
        else f"{out} was not written (it appears only when complete)"
    )
    with (
        preemption.exit_on_sigterm(unwritten),
        cli_inputs.errors_as_one_line(checkpoint.CheckpointError, OSError),
    ):
        _sample()


def _check_flags() -> int:
    num = cli_inputs.check_positive("--num", FLAGS.num)
    cli_inputs.check_positive("--batch_size", FLAGS.batch_size)
    cli_inputs.check_positive("--grid", FLAGS.grid)
    cli_inputs.check_seed("--seed", FLAGS.seed)
    cli_inputs.check_guidance_scale("--cfg", FLAGS.cfg)
    if FLAGS.out is not None and not FLAGS.out.strip():
        raise cli_inputs.InputError("--out is empty: pass the .npz path (or png folder) to write")
    return num


def output_format(config: ml_collections.ConfigDict, fmt: str | None) -> str:
    """`fmt`, or the default: 'adm' for image runs, 'npz_float' for toy points.

    Raises:
      InputError: naming --format when an image format is asked of a toy run.
    """
    is_image = len(latent_space.model_shape(config)) == 3
    if fmt is None:
        return "adm" if is_image else "npz_float"
    if fmt != "npz_float" and not is_image:
        raise cli_inputs.InputError(
            f"--format={fmt}: this run samples 2-D points, not images; use --format npz_float"
        )
    return fmt


def _output_path(fmt: str) -> str:
    out = FLAGS.out or ("samples" if fmt == "png" else "samples.npz")
    if fmt == "png" and out.rstrip("/").endswith(".npz"):
        raise cli_inputs.InputError(f"--out={out}: --format png writes a folder, not an .npz")
    return out if atomic_files.is_remote(out) else os.path.abspath(out)


def _check_space(out: str, fmt: str, num: int, shape: tuple[int, ...]) -> None:
    """Probes the output directory and the free space (local disk, also for a bucket's upload)."""
    needed = num * int(np.prod(shape)) * (4 if fmt == "npz_float" else 1) + 1024 * num
    directory = os.path.dirname(out.rstrip("/"))
    cli_inputs.check_output_directory("--out", directory, needed)
    if atomic_files.is_remote(out) and fmt != "png":  # uploaded from a local temporary file
        import tempfile

        cli_inputs.check_output_directory("--out (local temporary)", tempfile.gettempdir(), needed)


def _labels(config: ml_collections.ConfigDict, num: int) -> np.ndarray:
    num_classes = int(config.data.num_classes)
    if FLAGS.label is None:
        return sampling.default_labels(num, num_classes)
    if not 0 <= FLAGS.label < max(num_classes, 1):
        raise cli_inputs.InputError(f"--label={FLAGS.label}: allowed 0..{num_classes - 1}")
    return np.full((num,), FLAGS.label, np.int32)


def _sample() -> None:
    num = _check_flags()
    step = cli_inputs.checkpoint_step(FLAGS.workdir, FLAGS.checkpoint_step)
    mesh = sharding.make_mesh(sharding.single_device_config(), jax.local_devices())
    config, params, step = checkpoint.load_params(
        FLAGS.workdir, step, raw=FLAGS.raw_params, mesh=mesh
    )
    if not 1 <= FLAGS.steps <= config.denoise_timesteps:
        raise cli_inputs.InputError(
            f"--steps={FLAGS.steps}: allowed 1..{config.denoise_timesteps} (denoise_timesteps)"
        )
    fmt = output_format(config, FLAGS.format)
    out = _output_path(fmt)
    labels = _labels(config, num)
    shape = tuple(latent_space.model_shape(config))
    if latent_space.uses_vae(config):  # the files hold the decoded images, not the latents
        shape = tuple(latent_space.pixel_shape(config))
    _check_space(out, fmt, num, shape)
    cfg_scale = float(latent_space.guidance_scale(config, FLAGS.steps, FLAGS.cfg))
    num_classes = int(config.data.num_classes)
    chunks = sample_chunks(
        config,
        params,
        jax.random.PRNGKey(FLAGS.seed),
        labels,
        num_steps=FLAGS.steps,
        cfg_scale=cfg_scale,
        batch_size=FLAGS.batch_size,
        mesh=mesh,
    )
    with sample_writer(out, fmt, num, shape, labels, num_classes > 0) as write:
        shown = write_chunks(chunks, write, num, FLAGS.grid)
    title = f"{FLAGS.steps} step(s)"
    png = write_grid(out, shown, title=title, num_classes=num_classes)
    logging.info(
        "Wrote %d samples (step %d, %d sampling steps, cfg %.2f, format %s) to %s and %s",
        num,
        step,
        FLAGS.steps,
        cfg_scale,
        fmt,
        out,
        png,
    )


if __name__ == "__main__":
    _define_flags()
    cli_inputs.run(main)
