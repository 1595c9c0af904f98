"""Encode a dataset once into SD-VAE posterior moments, for training on latents.

    python -m shortcut_jax.tools.encode_latents --config experiments/imagenet256.py \
        --out /data/imagenet256_latents --config.vae.path=vae.npz \
        [--batch_size 32] [--shard_size 4096] [--storage_dtype float32] \
        [--distributed [--coordinator_address HOST:PORT --num_processes N --process_id I]]

then train with `--config.data.latent_dir=/data/imagenet256_latents`.

What it does:
  * reads the images of `config.data` ('tfds', 'image_folder' or 'mnist_embedded') in their fixed
    order (`preprocess.indexed_images`), ADM-center-cropped to `config.data.image_size`;
  * encodes every image AND its horizontal mirror with the VAE of `config.vae.path` (checked
    against config.vae.latent_channels / downsample_factor) and stores the UNSCALED posterior
    mean and std of both, the label and the example index (record format: `data.latents`);
  * splits the examples into shards of --shard_size; shard s is encoded by process
    s % process_count, in batches split over that process's local devices (a 1-D local mesh,
    parameters replicated, batches padded to a multiple of the device count);
  * writes each shard to a temporary name in --out and renames it when complete (--out in a
    bucket, gs://...: to a local scratch file, uploaded as one object when complete, so a killed
    encode leaves no partial object). A rerun skips the shards that exist and redoes an
    interrupted one, so an interrupted job just restarts;
  * first writes (or checks) --out/plan.json: a directory begun with another VAE, source,
    preprocessing, shard size or storage dtype is refused, naming every differing field;
  * when every shard exists (after a barrier across processes), process 0 writes
    --out/metadata.json: count, latent shape, scaling factor, VAE checksum and arch, source,
    class names, preprocessing, flip policy, storage dtype, shards with their counts, and moment
    statistics (including how large float16 rounding would be relative to the posterior std).

Bad flags give one line on stderr and exit status 2; a config, VAE or dataset it cannot encode, an
--out begun with another plan, and I/O errors one line and exit status 1 (the rule of
`shortcut_jax.cli_inputs`).

Storage: float32 by default (exact). --storage_dtype=float16 halves the files; metadata.json's
`float16_rounding_over_std` (measured on every example in any case) says whether that is
negligible for your VAE: it is the largest |float16(x) - x| / std over all latent elements.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shortcut_jax import atomic_files, cli_inputs
from shortcut_jax.data import latents, preprocess, shard_cache
from shortcut_jax.distributed import initialize_distributed

INTERRUPT_ENV = "SHORTCUT_JAX_ENCODE_INTERRUPT_AFTER_SHARDS"  # testing: simulate a crash
KILL_ENV = "SHORTCUT_JAX_ENCODE_INTERRUPT_WITH_SIGKILL"  # testing: '1' = the crash is a SIGKILL
FLIP_POLICY = "both: every record holds the moments of the image and of its horizontal mirror"


class PlanMismatchError(ValueError):
    """--out was begun with another VAE, source, preprocessing or layout."""


class EncodingInterruptedError(RuntimeError):
    """Raised by the test hook `interrupt_after_shards` (a simulated crash mid-shard)."""


# ------------------------------------------------------------------------------------ plan


def make_plan(
    config: ml_collections.ConfigDict,
    vae: Any,
    images: preprocess.IndexedImages,
    shard_size: int,
    storage_dtype: str,
) -> dict[str, Any]:
    """What a latent directory holds; two runs may share a directory only if their plans match.

    Returns:
      JSON-able dict: format_version, source, preprocessing, flip_policy, vae (checksum, arch,
      scaling_factor, compute dtype), shard_size, storage_dtype.
    """
    embedded = images.description["name"] == "mnist_embedded"
    plan = {
        "format_version": latents.FORMAT_VERSION,
        "source": images.description,
        "preprocessing": {
            "crop": "none (embedded digits, resized to image_size)"
            if embedded
            else "adm_center_crop",
            "image_size": images.image_size,
            "channels": images.channels,
            "pixel_scale": "uint8 / 127.5 - 1",
        },
        "flip_policy": FLIP_POLICY,
        "vae": {
            "checksum": vae.checksum,
            "arch": dataclasses.asdict(vae.arch),
            "scaling_factor": float(vae.scaling_factor),
            "dtype": vae.dtype,
        },
        "shard_size": int(shard_size),
        "storage_dtype": storage_dtype,
    }
    return json.loads(json.dumps(plan))  # tuples -> lists: the form read back from plan.json


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def plan_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One line per differing (dotted) field: 'vae.checksum: directory has X, this run Y'."""
    old, new = _flatten(stored), _flatten(wanted)
    return [
        f"{key}: the directory has {old.get(key, '(absent)')!r}, this run has "
        f"{new.get(key, '(absent)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def check_or_write_plan(out_dir: str, plan: dict[str, Any]) -> None:
    """Writes out_dir/plan.json, or checks that the existing one equals `plan`.

    Raises:
      PlanMismatchError: Naming every differing field.
    """
    path = epath.Path(out_dir) / latents.PLAN_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        differences = plan_differences(stored, plan)
        if differences:
            raise PlanMismatchError(
                f"--out={out_dir} holds latents of another plan; use a new directory (or delete "
                "this one) to encode with these settings. Differences:\n  "
                + "\n  ".join(differences)
            )
        return
    atomic_files.write_json(path, plan, indent=1)


# ------------------------------------------------------------------------------------ encoder


def make_moments_fn(vae: Any, devices: list[jax.Device]):
    """A jitted encoder over a 1-D mesh of `devices` (this process's local devices).

    Returns:
      moments(images) -> (mean, std): images (B, S, S, C) uint8 numpy with B a multiple of
      len(devices); mean and std (B, 2, h, w, c) float32 jax arrays, [:, 0] of the images and
      [:, 1] of their horizontal mirrors (unscaled).
    """
    from shortcut_jax.models import vae as vae_lib

    mesh = Mesh(np.asarray(devices), ("batch",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    params = jax.device_put(vae.params, NamedSharding(mesh, PartitionSpec()))
    arch, dtype = vae.arch, vae.dtype

    def moments(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        pixels = images.astype(jnp.float32) / 127.5 - 1.0
        both = jnp.stack([pixels, pixels[:, :, ::-1]], axis=1)  # (B, 2, S, S, C)
        both = both.reshape(-1, *pixels.shape[1:])  # image, mirror, image, mirror, ...
        mean, std = vae_lib.encode_moments(arch, params, both, dtype)
        return mean.reshape(-1, 2, *mean.shape[1:]), std.reshape(-1, 2, *std.shape[1:])

    jitted = jax.jit(moments, out_shardings=(batch_sharding, batch_sharding))

    def run(images: np.ndarray) -> tuple[jax.Array, jax.Array]:
        return jitted(params, jax.device_put(images, batch_sharding))

    return run


def _batches(
    images: preprocess.IndexedImages, start: int, stop: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(indices (n,), labels (n,), uint8 images (n, S, S, C)) for [start, stop), n <= batch_size."""
    rows: list[preprocess.Example] = []
    for example in images.read(start, stop):
        rows.append(example)
        if len(rows) == batch_size:
            yield _stack(rows)
            rows = []
    if rows:
        yield _stack(rows)


def _stack(rows: list[preprocess.Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indices = np.asarray([row[0] for row in rows], np.int64)
    labels = np.asarray([row[2] for row in rows], np.int64)
    return indices, labels, np.stack([row[1] for row in rows])


def _pad(images: np.ndarray, multiple: int) -> np.ndarray:
    extra = -len(images) % multiple
    if not extra:
        return images
    return np.concatenate([images, np.repeat(images[-1:], extra, axis=0)])


class MomentStats:
    """Running statistics of posterior moments (both views) and of float16 rounding."""

    def __init__(self) -> None:
        self.values = 0
        self.std_min = math.inf
        self.std_max = 0.0
        self.std_sum = 0.0
        self.abs_mean_max = 0.0
        self.abs_mean_sum = 0.0
        self.fp16_mean_over_std_max = 0.0
        self.fp16_std_over_std_max = 0.0

    def update(self, mean: np.ndarray, std: np.ndarray) -> None:
        rounding_mean = np.abs(mean.astype(np.float16).astype(np.float32) - mean) / std
        rounding_std = np.abs(std.astype(np.float16).astype(np.float32) - std) / std
        self.values += mean.size
        self.std_min = min(self.std_min, float(std.min()))
        self.std_max = max(self.std_max, float(std.max()))
        self.std_sum += float(std.sum(dtype=np.float64))
        self.abs_mean_max = max(self.abs_mean_max, float(np.abs(mean).max()))
        self.abs_mean_sum += float(np.abs(mean).sum(dtype=np.float64))
        self.fp16_mean_over_std_max = max(self.fp16_mean_over_std_max, float(rounding_mean.max()))
        self.fp16_std_over_std_max = max(self.fp16_std_over_std_max, float(rounding_std.max()))

    def to_json(self) -> dict[str, float]:
        return {
            "values": self.values,
            "std_min": self.std_min,
            "std_max": self.std_max,
            "std_sum": self.std_sum,
            "abs_mean_max": self.abs_mean_max,
            "abs_mean_sum": self.abs_mean_sum,
            "fp16_mean_over_std_max": self.fp16_mean_over_std_max,
            "fp16_std_over_std_max": self.fp16_std_over_std_max,
        }


def _combine_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    values = sum(part["values"] for part in parts)
    return {
        "std_min": min(part["std_min"] for part in parts),
        "std_max": max(part["std_max"] for part in parts),
        "std_average": sum(part["std_sum"] for part in parts) / values,
        "abs_mean_max": max(part["abs_mean_max"] for part in parts),
        "abs_mean_average": sum(part["abs_mean_sum"] for part in parts) / values,
        "float16_rounding_over_std": {
            "mean_max": max(part["fp16_mean_over_std_max"] for part in parts),
            "std_max": max(part["fp16_std_over_std_max"] for part in parts),
        },
    }


# ------------------------------------------------------------------------------------ main loop


def load_checked_vae(config: ml_collections.ConfigDict) -> Any:
    """The VAE of config.vae.path, checked against config.vae and config.data.image_size.

    Raises:
      ValueError: On an empty path, a latent-channel or downsample-factor mismatch, or an image
        size the downsample factor does not divide.
    """
    from shortcut_jax.models import vae as vae_lib

    if not config.vae.path:
        raise ValueError(
            "config.vae.path is empty: pass the VAE weights, e.g. --config.vae.path=vae.npz "
            "(python -m shortcut_jax.tools.convert_vae makes one from a .safetensors file)."
        )
    vae = vae_lib.load_vae(
        config.vae.path, scaling_factor=config.vae.scaling_factor, dtype=config.vae.dtype
    )
    problems = []
    if vae.arch.latent_channels != config.vae.latent_channels:
        problems.append(
            f"config.vae.latent_channels={config.vae.latent_channels} but the VAE has "
            f"{vae.arch.latent_channels}"
        )
    if vae.arch.downsample_factor != config.vae.downsample_factor:
        problems.append(
            f"config.vae.downsample_factor={config.vae.downsample_factor} but the VAE has "
            f"{vae.arch.downsample_factor}"
        )
    if problems:
        raise ValueError(f"config.vae.path={config.vae.path!r}: " + "; ".join(problems) + ".")
    if config.data.image_size % vae.arch.downsample_factor:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} is not divisible by the VAE's "
            f"downsample factor {vae.arch.downsample_factor}."
        )
    return vae


def encode_dataset(
    config: ml_collections.ConfigDict,
    out_dir: str,
    *,
    batch_size: int = 32,
    shard_size: int = 4096,
    storage_dtype: str = "float32",
    interrupt_after_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encodes the dataset of `config` into `out_dir` (resumable; see the module docstring).

    Args:
      config: Experiment config (reads config.data and config.vae).
      out_dir: The latent directory (created if needed).
      batch_size: Images per encoder call on this process (plus as many mirrors).
      shard_size: Examples per shard file.
      storage_dtype: 'float32' or 'float16' for the stored moments.
      interrupt_after_shards: Testing hook: after this many shards complete in this call, write
        one batch of the next shard to its temporary file and raise `EncodingInterruptedError`.
      progress: Show a tqdm bar on process 0.

    Returns:
      The metadata dict on process 0 (None on other processes).

    Raises:
      PlanMismatchError: If out_dir was begun with another plan.
      ValueError, FileNotFoundError: On a bad config, VAE or dataset.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"--batch_size={batch_size} and --shard_size={shard_size} must be >= 1.")
    if storage_dtype not in latents.DTYPE_CODES:
        raise ValueError(
            f"--storage_dtype={storage_dtype!r}; allowed: {sorted(latents.DTYPE_CODES)}."
        )
    vae = load_checked_vae(config)
    images = preprocess.indexed_images(config, channels=vae.arch.in_channels)
    if images.count == 0:
        raise ValueError("The dataset has no examples.")
    plan = make_plan(config, vae, images, shard_size, storage_dtype)
    directory = epath.Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    check_or_write_plan(out_dir, plan)

    process_index, process_count = jax.process_index(), jax.process_count()
    num_shards = math.ceil(images.count / shard_size)
    existing = shard_cache.list_names(out_dir)  # one listing, also on a bucket
    todo = [
        shard
        for shard in range(process_index, num_shards, process_count)
        if latents.shard_name(shard, num_shards) not in existing
    ]
    if todo or latents.METADATA_FILE not in existing:
        _encode_shards(
            vae, images, out_dir, todo, num_shards, shard_size, batch_size, storage_dtype,
            interrupt_after_shards, progress and process_index == 0,
        )  # fmt: skip
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("encode_latents: all shards written")
    metadata = None
    if process_index == 0:
        metadata = _write_metadata(out_dir, plan, vae, images, num_shards, shard_size)
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("encode_latents: metadata written")
    return metadata


def _encode_shards(
    vae: Any,
    images: preprocess.IndexedImages,
    out_dir: str,
    todo: list[int],
    num_shards: int,
    shard_size: int,
    batch_size: int,
    storage_dtype: str,
    interrupt_after_shards: int | None,
    show_progress: bool,
) -> None:
    from tqdm import tqdm

    devices = jax.local_devices()
    moments_fn = make_moments_fn(vae, devices)
    total = sum(min(shard_size, images.count - shard * shard_size) for shard in todo)
    logging.info(
        "Encoding %d shards (%d examples, each with its mirror) on %d local devices.",
        len(todo), total, len(devices),
    )  # fmt: skip
    bar = tqdm(total=total, unit="img", desc="encode_latents", disable=not show_progress)
    try:
        for done, shard in enumerate(todo):
            interrupt = interrupt_after_shards is not None and done >= interrupt_after_shards
            path = str(epath.Path(out_dir) / latents.shard_name(shard, num_shards))
            start, stop = shard * shard_size, min(images.count, (shard + 1) * shard_size)
            writer = latents.ShardWriter(path)
            stats = MomentStats()
            pending = None  # (indices, labels, device results) of the previous batch
            try:
                for batch in preprocess.in_background(_batches(images, start, stop, batch_size)):
                    indices, labels, pixels = batch
                    results = moments_fn(_pad(pixels, len(devices)))  # dispatched asynchronously
                    if pending is not None:
                        _write_batch(writer, stats, *pending, storage_dtype)
                        bar.update(len(pending[0]))
                    pending = (indices, labels, results)
                    if interrupt:
                        break
                if pending is not None:
                    _write_batch(writer, stats, *pending, storage_dtype)
                    bar.update(len(pending[0]))
                if interrupt:
                    if os.environ.get(KILL_ENV) == "1":
                        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: a real crash
                    raise EncodingInterruptedError(
                        f"Interrupted (test hook) in shard {shard} after {done} complete shards."
                    )
                if writer.count != stop - start:
                    raise RuntimeError(f"Shard {shard}: wrote {writer.count} of {stop - start}.")
                shard_info = {"count": writer.count, "start": start, "stats": stats.to_json()}
                atomic_files.write_json(
                    path.removesuffix(".arrayrecord") + ".json", shard_info, indent=1
                )
                writer.commit()
            finally:
                writer.close()
    finally:
        bar.close()


def _write_batch(
    writer: latents.ShardWriter,
    stats: MomentStats,
    indices: np.ndarray,
    labels: np.ndarray,
    results: tuple[jax.Array, jax.Array],
    storage_dtype: str,
) -> None:
    count = len(indices)
    mean = np.asarray(results[0])[:count]  # (n, 2, h, w, c)
    std = np.asarray(results[1])[:count]
    stats.update(mean, std)
    for row in range(count):
        writer.write(
            latents.encode_record(
                int(indices[row]),
                int(labels[row]),
                mean[row, 0],
                std[row, 0],
                mean[row, 1],
                std[row, 1],
                storage_dtype,
            )
        )


def _write_metadata(
    out_dir: str,
    plan: dict[str, Any],
    vae: Any,
    images: preprocess.IndexedImages,
    num_shards: int,
    shard_size: int,
) -> dict[str, Any]:
    """Checks that every shard is complete, then writes metadata.json atomically."""
    directory = epath.Path(out_dir)
    existing = shard_cache.list_names(out_dir)  # fresh: other processes wrote shards too
    shards, stats = [], []
    for shard in range(num_shards):
        name = latents.shard_name(shard, num_shards)
        path = directory / name
        expected = min(shard_size, images.count - shard * shard_size)
        if name not in existing:
            raise FileNotFoundError(f"{path} is missing after encoding; rerun encode_latents.")
        info_name = name.removesuffix(".arrayrecord") + ".json"
        info = json.loads((directory / info_name).read_text()) if info_name in existing else None
        found = _record_count(str(path), info)
        if found != expected:
            raise RuntimeError(f"{path} has {found} records, expected {expected}; delete it.")
        shards.append({"file": name, "start": shard * shard_size, "count": expected})
        if info is not None:
            stats.append(info["stats"])
    side = images.image_size // vae.arch.downsample_factor
    metadata = {
        **plan,
        "count": images.count,
        "latent_shape": [side, side, vae.arch.latent_channels],
        "scaling_factor": float(vae.scaling_factor),
        "class_names": list(images.class_names),
        "num_classes": len(images.class_names),
        "shards": shards,
        "record_format": (
            "shortcut_jax.data.latents v1: 32-byte header (magic SJLT, version, dtype code, "
            "int64 index, int32 label, h, w, c) + unscaled mean, std, mirror mean, mirror std "
            "as (h, w, c) arrays of storage_dtype"
        ),
        "vae_source": vae.source,
        "moment_stats": _combine_stats(stats) if len(stats) == num_shards else None,
    }
    atomic_files.write_json(directory / latents.METADATA_FILE, metadata, indent=1)
    return metadata


def _record_count(path: str, info: dict[str, Any] | None) -> int:
    """Records in the shard at `path`: counted by ArrayRecord locally; in a bucket (ArrayRecord
    reads local files only), the count its `.json` recorded before the shard was uploaded."""
    if atomic_files.is_remote(path):
        if info is None:
            raise FileNotFoundError(
                f"{path} has no .json beside it (written before every shard): delete the shard "
                "and rerun encode_latents."
            )
        return int(info["count"])
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


# ------------------------------------------------------------------------------------ CLI


def _define_flags() -> dict[str, Any]:
    from ml_collections import config_flags

    return {
        "config": config_flags.DEFINE_config_file(
            "config", None, "Path to an experiments/*.py config file.", lock_config=True
        ),
        "out": flags.DEFINE_string("out", None, "Latent directory to write (resumable)."),
        "batch_size": flags.DEFINE_integer("batch_size", 32, "Images per encoder call."),
        "shard_size": flags.DEFINE_integer("shard_size", 4096, "Examples per shard file."),
        "storage_dtype": flags.DEFINE_enum(
            "storage_dtype", "float32", ["float32", "float16"], "dtype of the stored moments."
        ),
        "distributed": flags.DEFINE_bool(
            "distributed", False, "Call jax.distributed.initialize() first (one process per host)."
        ),
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0 (with --distributed)."
        ),
        "num_processes": flags.DEFINE_integer("num_processes", None, "Number of processes."),
        "process_id": flags.DEFINE_integer("process_id", None, "This process's index."),
    }


def main(argv: list[str], flag_values: dict[str, Any]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = {name: holder.value for name, holder in flag_values.items()}
    if values["config"] is None or not values["out"]:
        raise app.UsageError("--config and --out are required.")
    with cli_inputs.errors_as_one_line():
        cli_inputs.check_positive("--batch_size", values["batch_size"])
        cli_inputs.check_positive("--shard_size", values["shard_size"])
    if values["distributed"]:
        initialize_distributed(
            values["coordinator_address"], values["num_processes"], values["process_id"]
        )
    interrupt = os.environ.get(INTERRUPT_ENV)
    # A config, VAE or dataset it cannot encode, an --out of another plan, I/O: status 1.
    with cli_inputs.errors_as_one_line(ValueError, OSError, EncodingInterruptedError):
        metadata = encode_dataset(
            values["config"],
            values["out"],
            batch_size=values["batch_size"],
            shard_size=values["shard_size"],
            storage_dtype=values["storage_dtype"],
            interrupt_after_shards=int(interrupt) if interrupt else None,
        )
    if metadata is not None:
        logging.info(
            "Wrote %d examples (latents %s) in %d shards to %s.",
            metadata["count"], metadata["latent_shape"], len(metadata["shards"]), values["out"],
        )  # fmt: skip


if __name__ == "__main__":
    _flag_values = _define_flags()
    cli_inputs.run(lambda argv: main(argv, _flag_values))
