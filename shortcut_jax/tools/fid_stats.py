"""Reference statistics (mu, sigma) of a dataset's features, in the common FID .npz format.

    # A config's data (TFDS or the embedded MNIST), with the usual overrides:
    python -m shortcut_jax.tools.fid_stats --config experiments/imagenet256.py --num 50000 \
        --out imagenet256_stats.npz [--config.data.tfds_split=train]
    # Images in an .npz: key 'images' ((N, H, W, C), float in [-1, 1] or uint8), or 'arr_0'
    # (uint8 NHWC: the ADM evaluator's batches, and what `shortcut_jax.sample` writes):
    python -m shortcut_jax.tools.fid_stats --images samples.npz --out samples_stats.npz

The file has keys 'mu' (D,) and 'sigma' (D, D) like published FID statistics, so it can be
passed to `python -m shortcut_jax.evaluate --ref_stats`. The images are read, featurized and
added to float64 running moments (`fid.RunningStatistics`) a chunk at a time, so host memory
does not grow with --num: an --images .npz is read row by row from its archive, and a
`config.data.latent_dir` is read a chunk of latents at a time and decoded through the run's VAE
(config.vae.decode_batch_size images per device per pass): its statistics are those of the VAE's
reconstructions. TFDS and image-folder configs are read by index (`preprocess.indexed_images`, the
same ADM center crop as training and `encode_latents`) in the sources' `reference_order`, a chunk
at a time, gs:// included. The default network is the FID
Inception (converted weights, see `shortcut_jax.tools.convert_inception`); --network takes any
metric of `shortcut_jax.evaluators.registry` (fd_mnist: the project's MNIST classifier).
Features are computed on all local devices. --out may be a bucket path (gs://...); the file is
written atomically. Bad flags give one line on stderr and exit status 2; a missing, unreadable
or unusable input file, missing weights and an output that cannot be written one line and exit
status 1 (the rule of `shortcut_jax.cli_inputs`).
"""

from __future__ import annotations

import contextlib
import math
import zipfile
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

from shortcut_jax import atomic_files, cli_inputs, configs, latent_space, sharding
from shortcut_jax.evaluators import features, fid, registry, sweep


def _define_flags() -> None:
    """The CLI's flags, defined only when it runs (`python -m ...fid_stats`): importing the module
    for its functions next to another CLI (both define --config) must not clash."""
    global _CONFIG, _IMAGES, _NUM, _NETWORK, _INCEPTION, _OUT, _SAVE_FEATURES, _CHUNK
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "An experiments/*.py config whose data to use.", lock_config=True
    )
    _IMAGES = flags.DEFINE_string(
        "images", None, "An .npz with key 'images' or 'arr_0' (ADM) instead of --config."
    )
    _NUM = flags.DEFINE_integer("num", 50_000, "Number of examples (at most what there is).")
    _NETWORK = flags.DEFINE_enum(
        "network", "fid", list(registry.names()), "Feature network (a metric of the evaluation)."
    )
    _INCEPTION = flags.DEFINE_string("inception", None, "Converted Inception weights .npz.")
    _OUT = flags.DEFINE_string("out", None, "Output .npz path.")
    _SAVE_FEATURES = flags.DEFINE_bool(
        "save_features",
        False,
        "Also store the features (key 'features', num x D float32 on the host) for "
        "precision/recall.",
    )
    _CHUNK = flags.DEFINE_integer("chunk", 1024, "Images read and featurized at a time.")
    flags.mark_flags_as_required(["out"])


IMAGE_KEYS = ("images", "arr_0")  # ours, then the ADM evaluator's batches


def load_images(path: str) -> np.ndarray:
    """Images from an .npz ('images' or 'arr_0'; uint8 or float in [-1, 1]) as float32 in [-1, 1].

    Raises:
      InputFileError: naming the file when it is missing, unreadable or holds no usable images.
    """
    chunks = list(image_chunks(path, num=2**62, chunk=2**62))
    return np.concatenate(chunks) if chunks else np.zeros((0, 1, 1, 1), np.float32)


def _to_pixels(images: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) uint8 or float images as float32 (N, H, W, C) in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def _npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of the .npy stream `member` (C order, no objects)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    if fortran or dtype.hasobject or not shape:
        raise ValueError(f"an array of shape {shape}, dtype {dtype}, Fortran order {fortran}")
    return tuple(shape), dtype


def image_chunks(path: str, num: int, chunk: int) -> Iterator[np.ndarray]:
    """The first `num` images of an .npz (key 'images'), `chunk` at a time, float32 in [-1, 1].

    Reads the archive member row by row (compressed or not), so memory holds one chunk. The
    file, its keys and the array's header are checked at once; a truncated body when the
    iteration reaches it.

    Raises:
      InputFileError: naming the file when it is missing, unreadable or holds no usable images.
    """
    file = epath.Path(path)
    if not file.is_file():
        raise cli_inputs.InputFileError(f"--images={path}: no such file")
    with _images_member(file, path) as (shape, _, _):
        pass
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise cli_inputs.InputFileError(
            f"--images={path}: images must be (N, H, W, C) with C in (1, 3), got {shape}"
        )
    return (_to_pixels(block) for block in _read_rows(file, path, min(shape[0], num), chunk))


@contextlib.contextmanager
def _images_member(file: epath.Path, path: str) -> Iterator[tuple[tuple[int, ...], Any, Any]]:
    """(shape, dtype, stream positioned at the data) of the archive's 'images' array."""
    try:
        with file.open("rb") as f, zipfile.ZipFile(f) as archive:
            keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
            key = next((name for name in IMAGE_KEYS if name in keys), None)
            if key is None:
                raise KeyError(keys)
            with archive.open(f"{key}.npy") as member:
                shape, dtype = _npy_header(member)
                yield shape, dtype, member
    except KeyError as missing:
        raise cli_inputs.InputFileError(
            f"--images={path} has keys {missing.args[0]}; expected 'images' or 'arr_0'"
        ) from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise cli_inputs.InputFileError(
            f"--images={path}: not a readable .npz ({type(error).__name__}: {error})"
        ) from None


def _read_rows(file: epath.Path, path: str, total: int, chunk: int) -> Iterator[np.ndarray]:
    """Rows 0 .. total - 1 of the 'images' array, `chunk` at a time, as stored."""
    with _images_member(file, path) as (shape, dtype, member):
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        for start in range(0, total, chunk):
            rows = min(chunk, total - start)
            data = member.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise EOFError(f"the images end after {start} of {shape[0]} rows")
            yield np.frombuffer(data, dtype).reshape((rows, *shape[1:]))


def latent_image_chunks(
    config: ml_collections.ConfigDict, num: int, chunk: int, mesh: jax.sharding.Mesh
) -> Iterator[np.ndarray]:
    """Pixels of the first `num` latents of config.data.latent_dir (in `real_examples` order:
    scaled posterior means), read `chunk` at a time and decoded through the run's VAE."""
    from shortcut_jax.data import latents

    reading = config.copy_and_resolve_references()
    reading.batch_size = 1  # the source checks a training batch against the count: none here
    source = latents.LatentSource(reading)
    shards = sharding.batch_shards(mesh)
    per_device = int(config.vae.get("decode_batch_size", 0)) or max(chunk // shards, 1)
    decoder = latent_space.PixelDecoder.for_config(config, mesh, per_device * shards)
    order = latents.reference_order(source.count)[:num]
    readers = latents.ShardReaders(
        source.latent_dir,
        source.metadata,
        cache_bytes=int(config.data.get("latent_cache_bytes", latents.DEFAULT_CACHE_BYTES)),
        cache_dir=str(config.data.get("latent_cache_dir", "")),
    )
    try:
        for start in range(0, len(order), chunk):
            records = readers.read(order[start : start + chunk])
            moments = np.stack([latents.decode_record(record)[2][0] for record in records])
            yield decoder(moments.astype(np.float32) * np.float32(source.scaling_factor))
    finally:
        readers.close()


def main(argv: list[str]) -> None:
    """Reads the images, computes their features and writes mu and sigma."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with cli_inputs.errors_as_one_line(
        sweep.EvaluationError,
        features.WeightsError,
        features.NonFiniteImagesError,
        OSError,  # an --out that cannot be written
        usage=(SyntaxError,),  # a --config path that is not a Python file
    ):
        _write_statistics()


def _chunks(
    num: int, chunk: int, mesh: jax.sharding.Mesh
) -> tuple[ml_collections.ConfigDict, Iterator[np.ndarray], str]:
    """(config, image chunks, what they are) for the --config or --images input."""
    if (_CONFIG.value is None) == (_IMAGES.value is None):
        raise cli_inputs.InputError("give exactly one of --config and --images")
    if _IMAGES.value is not None:
        return configs.base_config(), image_chunks(_IMAGES.value, num, chunk), _IMAGES.value
    config = _CONFIG.value
    problem = registry.get(_NETWORK.value).data_problem(config)
    if problem:
        raise cli_inputs.InputError(f"--network={_NETWORK.value} and --config: {problem}")
    if config.data.get("latent_dir"):
        what = f"config.data.latent_dir ({config.data.latent_dir}) decoded by config.vae"
        return config, latent_image_chunks(config, num, chunk, mesh), what
    if config.data.name in ("tfds", "image_folder"):
        return config, dataset_image_chunks(config, num, chunk), f"config.data ({config.data.name})"
    from shortcut_jax import data

    images = data.get_source(config).real_examples(num)["image"]  # MNIST: 5,000 at most
    blocks = (images[start : start + chunk] for start in range(0, len(images), chunk))
    return config, blocks, f"config.data ({config.data.name})"


def dataset_image_chunks(
    config: ml_collections.ConfigDict, num: int, chunk: int
) -> Iterator[np.ndarray]:
    """The first `num` images of a TFDS or image-folder config in `reference_order` (the order of
    the sources' `real_examples`), float32 in [-1, 1], read by index `chunk` at a time."""
    from shortcut_jax.data import image_folder, preprocess

    images = preprocess.indexed_images(config, channels=int(config.data.channels))
    order = image_folder.reference_order(images.count)[:num]
    workers = preprocess.default_workers()
    for start in range(0, len(order), chunk):
        rows = preprocess.parallel_map(
            lambda index: images.load(int(index))[0], order[start : start + chunk], workers
        )
        yield preprocess.to_float(np.stack(list(rows)))


def _features_of(
    net: features.FeatureNet, images: np.ndarray, mesh: jax.sharding.Mesh, least: int
) -> np.ndarray:
    """Features of `images`, a short last chunk padded to `least` rows so that it reuses the
    compiled program of the full chunks instead of compiling its own."""
    valid = len(images)
    if valid < least:
        padding = np.zeros((least - valid, *images.shape[1:]), images.dtype)
        images = np.concatenate([images, padding])
    return features.compute_features(net, images, mesh=mesh)[:valid]


def _write_statistics() -> None:
    num = cli_inputs.check_positive("--num", _NUM.value)
    chunk = cli_inputs.check_positive("--chunk", _CHUNK.value)
    if num < 2:
        raise cli_inputs.InputError(f"--num={num}: at least 2 images are needed for a covariance")
    if not _OUT.value:
        raise cli_inputs.InputError("--out is empty: pass the .npz path to write")
    mesh = sharding.make_mesh(sharding.single_device_config(), jax.local_devices())
    config, chunks, source = _chunks(num, chunk, mesh)
    if _INCEPTION.value:
        config.eval_inception_path = _INCEPTION.value
    net = sweep.load_feature_net(config, _NETWORK.value)
    shards = sharding.batch_shards(mesh)
    running, kept = fid.RunningStatistics(net.dim), []
    with tqdm(total=num, unit="img", desc=f"{net.name} features") as bar:
        for images in chunks:
            features.check_finite_images(images, f"images {running.count}.. of {source}")
            feats = _features_of(net, images, mesh, min(chunk, net.batch_size * shards))
            running.add(feats)
            if _SAVE_FEATURES.value:
                kept.append(feats)
            bar.update(len(images))
    what = f"{running.count} images of {source}"
    if running.count < 2:
        raise cli_inputs.InputFileError(f"{what}: at least 2 images are needed for a covariance")
    mu, sigma = running.statistics()
    if _SAVE_FEATURES.value:
        atomic_files.write_npz(_OUT.value, mu=mu, sigma=sigma, features=np.concatenate(kept))
    else:
        fid.save_statistics(_OUT.value, mu, sigma)
    logging.info("Wrote %s statistics of %s to %s", net.name, what, _OUT.value)
    print(f"{_OUT.value}: {net.name} statistics of {what} (D={net.dim})")


if __name__ == "__main__":
    _define_flags()
    cli_inputs.run(main)
