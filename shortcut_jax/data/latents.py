"""Precomputed VAE latents: the record format, the directory metadata, and `LatentSource`.

A latent directory is written by `python -m shortcut_jax.tools.encode_latents` and holds

    plan.json                                   what is being encoded (checked on every rerun)
    shard-00000-of-00313.arrayrecord, ...       ArrayRecord files, one record per example
    shard-00000-of-00313.json, ...              per-shard count and moment statistics
    metadata.json                               written last, once every shard exists

Record format (version 1), little-endian, one ArrayRecord record per example:

    bytes  0..3   magic b'SJLT'
           4      format version (uint8, 1)
           5      storage dtype code (uint8: 1 = float16, 2 = float32)
           6..7   zero
           8..15  example index (int64): position in the source's fixed enumeration order
          16..19  label (int32; 0 for unlabelled data)
          20..25  latent height h, width w, channels c (3 x uint16)
          26..31  zero
          32..    four (h, w, c) C-order arrays of the storage dtype, in this order: posterior
                  mean and std of the image, then posterior mean and std of its horizontal
                  mirror. Moments are UNSCALED (multiply by the VAE scaling factor after
                  sampling). The mirror's moments come from encoding the mirrored image: the
                  VAE is not exactly flip-equivariant, and storing both makes training-time
                  flips free.

`LatentSource` serves batches addressed by step exactly like `image_folder.ImageFolderSource`:
per-epoch permutations of the `count` examples seeded by (config.seed, epoch), the global batch of
step k at positions [k * B, (k + 1) * B) of its epoch, process p taking its contiguous slice, and
random access by index into the shards, so resuming at step k reads nothing before it. Per example
(position i of the global batch of step k): the mirror's moments with probability 1/2 when
`config.data.random_flip` (drawn from (seed, k)), and

    latent = scaling_factor * (mean + std * eps)    if config.vae.sample_posterior
    latent = scaling_factor * mean                   otherwise

with eps ~ N(0, I) drawn per block of 32 global-batch positions from PCG64 seeded with (seed, k,
block): the same for any process layout. Batches are assembled a few steps ahead in a background
thread, with decoding and noise spread over a thread pool (numpy releases the GIL there).

A latent directory may live in a bucket (gs://..., any etils.epath filesystem). Training then reads
shards through a `shard_cache.ShardCache` of at most `config.data.latent_cache_bytes` in
`config.data.latent_cache_dir`, which downloads whole shards of the next steps ahead of the
reader (through gcsfs/fsspec). With `config.data.latent_cache_bytes = 0`, gs:// shards are read
in place instead, record by record, by ArrayRecord's own GCS client (google-cloud-cpp: application
default credentials; CLOUD_STORAGE_EMULATOR_ENDPOINT for an emulator), the shards of one read in
parallel. Either way batches are the same as from a local copy.
"""

from __future__ import annotations

import concurrent.futures
import copy
import glob
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from shortcut_jax import atomic_files
from shortcut_jax.atomic_files import is_remote
from shortcut_jax.data import check_seed, local_batch_size, preprocess, shard_cache
from shortcut_jax.data.image_folder import StepOrder, reference_order

FORMAT_VERSION = 1
MAGIC = b"SJLT"
HEADER = struct.Struct("<4sBB2xqi3H6x")  # 32 bytes
DTYPE_CODES = {"float16": 1, "float32": 2}
DTYPES_BY_CODE = {code: np.dtype(name).newbyteorder("<") for name, code in DTYPE_CODES.items()}
METADATA_FILE = "metadata.json"
PLAN_FILE = "plan.json"
# One record per chunk (cheap random access), uncompressed: zstd saved ~7 % on float32 moments
# but made random reads ~4x slower (measured: 256 records of 64 KB in 56 ms vs 14 ms).
WRITER_OPTIONS = "group_size:1,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access
ENCODE_COMMAND = (
    "python -m shortcut_jax.tools.encode_latents --config CONFIG.py --out {dir} "
    "--config.vae.path=VAE.npz"
)
_EPOCH_TAG = 0x6C65  # 'le'
_FLIP_TAG = 0x6C66  # 'lf'
_NOISE_TAG = 0x6C6E  # 'ln'
_PREFETCH_BATCHES = 3
_NOISE_BLOCK = 32  # global-batch positions per noise generator (and per worker task)
DEFAULT_CACHE_BYTES = 4 << 30  # config.data.latent_cache_bytes when a config lacks the field
_CACHE_LOOKAHEAD_STEPS = 8
_DIRECT_READ_THREADS = 32  # shards read at once in place (latent_cache_bytes = 0)


class LatentFormatError(ValueError):
    """A record or a latent directory that this code cannot read."""


def encode_record(
    index: int,
    label: int,
    mean: np.ndarray,
    std: np.ndarray,
    mirror_mean: np.ndarray,
    mirror_std: np.ndarray,
    storage_dtype: str = "float32",
) -> bytes:
    """Serializes one example (see the module docstring for the layout).

    Args:
      index: Example index in the source's enumeration order.
      label: Class label (0 if none).
      mean, std: (h, w, c) unscaled posterior moments of the image.
      mirror_mean, mirror_std: (h, w, c) moments of the horizontally mirrored image.
      storage_dtype: 'float32' or 'float16'.

    Returns:
      The record bytes: 32 + 4 * h * w * c * itemsize.
    """
    dtype = DTYPES_BY_CODE[DTYPE_CODES[storage_dtype]]
    height, width, channels = np.shape(mean)
    header = HEADER.pack(
        MAGIC, FORMAT_VERSION, DTYPE_CODES[storage_dtype], index, label, height, width, channels
    )
    arrays = np.stack([mean, std, mirror_mean, mirror_std]).astype(dtype, copy=False)
    return header + np.ascontiguousarray(arrays).tobytes()


def decode_record(record: bytes) -> tuple[int, int, np.ndarray]:
    """Parses one record.

    Args:
      record: Bytes written by `encode_record`.

    Returns:
      index, label, moments: (4, h, w, c) array of the storage dtype (read-only view) holding
      mean, std, mirror mean, mirror std.

    Raises:
      LatentFormatError: On a wrong magic, version, dtype code or length.
    """
    if len(record) < HEADER.size:
        raise LatentFormatError(f"A latent record of {len(record)} bytes is too short.")
    magic, version, code, index, label, height, width, channels = HEADER.unpack_from(record)
    if magic != MAGIC or version != FORMAT_VERSION or code not in DTYPES_BY_CODE:
        raise LatentFormatError(
            f"Not a version-{FORMAT_VERSION} latent record (magic {magic!r}, version {version}, "
            f"dtype code {code})."
        )
    dtype = DTYPES_BY_CODE[code]
    size = 4 * height * width * channels
    expected = HEADER.size + size * dtype.itemsize
    if len(record) != expected:
        raise LatentFormatError(
            f"Latent record {index} has {len(record)} bytes; its header says {expected}."
        )
    moments = np.frombuffer(record, dtype, size, HEADER.size)
    return index, label, moments.reshape(4, height, width, channels)


def shard_name(shard: int, num_shards: int) -> str:
    """File name of shard `shard` of `num_shards`."""
    return f"shard-{shard:05d}-of-{num_shards:05d}.arrayrecord"


class ShardWriter:
    """Writes one shard to a temporary file; `commit` makes it appear under its final name.

    Local: the temporary is '.<name>.tmp' beside the shard and `commit` renames it, so an exception
    (or a crash) before `commit` leaves only that file, which the next run deletes and redoes.
    Bucket (gs://...): the temporary is a local scratch file and `commit` uploads it as one object,
    so nothing of an unfinished shard is ever visible in the bucket. Either way a shard under its
    final name is complete.
    """

    def __init__(self, path: str):
        from array_record.python import array_record_module

        self.path = str(path)
        self._scratch = None
        if is_remote(self.path):
            root = os.path.join(tempfile.gettempdir(), "shortcut_jax_shard_scratch")
            os.makedirs(root, exist_ok=True)
            shard_cache.remove_abandoned(root, "shard")  # left by killed encodes
            self._scratch = tempfile.mkdtemp(prefix=f"shard-{os.getpid()}-", dir=root)
            self.temporary = os.path.join(self._scratch, os.path.basename(self.path))
        else:
            self.temporary = temporary_shard_path(self.path)
            for stale in glob.glob(self.temporary + "*"):
                os.remove(stale)
        self._writer = array_record_module.ArrayRecordWriter(self.temporary, WRITER_OPTIONS)
        self.count = 0

    def write(self, record: bytes) -> None:
        """Appends one record."""
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        """Closes the file without committing it (a local temporary stays; a scratch goes)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def commit(self) -> None:
        """Closes the temporary file and makes it the shard: fsync and rename, or one upload."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._scratch is not None:
            try:
                atomic_files.upload_file(self.temporary, self.path)
            finally:
                shutil.rmtree(self._scratch, ignore_errors=True)
            return
        with open(self.temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(self.temporary, self.path)


def temporary_shard_path(path: str) -> str:
    """Where a shard is written before it is complete ('.<name>.tmp' beside it)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def read_metadata(latent_dir: str) -> dict[str, Any]:
    """Reads and checks `latent_dir`/metadata.json.

    Args:
      latent_dir: A directory written by `shortcut_jax.tools.encode_latents`.

    Returns:
      The metadata dict (count, latent_shape, scaling_factor, vae {checksum, arch, ...}, source,
      class_names, preprocessing, flip_policy, storage_dtype, shard_size, shards [{file, start,
      count}], ...).

    Raises:
      FileNotFoundError: If the directory or its metadata is missing (encoding not run or not
        finished), or a shard file it lists is missing; the message has the encode command.
      LatentFormatError: If the metadata has another format version.
    """
    directory = epath.Path(latent_dir)
    path = directory / METADATA_FILE
    command = ENCODE_COMMAND.format(dir=latent_dir)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"config.data.latent_dir={latent_dir!r} does not exist. Encode the dataset first:\n"
            f"  {command}"
        )
    names = shard_cache.list_names(latent_dir)  # one listing, also on a bucket
    if METADATA_FILE not in names:
        state = (
            "encoding has not finished (plan.json exists, metadata.json does not)"
            if PLAN_FILE in names
            else "it was not written by encode_latents"
        )
        raise FileNotFoundError(
            f"config.data.latent_dir={latent_dir!r} has no {METADATA_FILE}: {state}. Run (or "
            f"rerun, it resumes):\n  {command}"
        )
    metadata = json.loads(path.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise LatentFormatError(
            f"{path} has format_version={metadata.get('format_version')!r}; this code reads "
            f"version {FORMAT_VERSION}. Re-encode with:\n  {command}"
        )
    missing = [shard["file"] for shard in metadata["shards"] if shard["file"] not in names]
    if missing:
        raise FileNotFoundError(
            f"config.data.latent_dir={latent_dir!r}: {len(missing)} shard files listed in "
            f"{METADATA_FILE} are missing ({missing[0]}, ...). Rerun:\n  {command}"
        )
    return metadata


class ShardReaders:
    """Random access to the examples of a latent directory by global index.

    Shards are opened on first use and stay open. A bucket directory is read through its own
    `shard_cache.ShardCache` (`self.cache`; ArrayRecord reads local files only): each read pins
    the shards it needs one at a time, and a shard's reader is closed when the cache evicts it.
    Every call is serialized by a lock (one instance per consumer thread keeps them independent).
    `close` closes the readers and the cache.
    """

    def __init__(
        self,
        latent_dir: str,
        metadata: dict[str, Any],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache_dir: str = "",
    ):
        """Opens nothing yet.

        Args:
          latent_dir: The latent directory (local or bucket).
          metadata: Its `read_metadata`.
          cache_bytes: Budget of the shard cache of a bucket directory; 0 reads gs:// shards in
            place through ArrayRecord's GCS client.
          cache_dir: Parent of that cache's directory ('' = the system temporary directory).
        """
        self.latent_dir = latent_dir
        self.shard_size = int(metadata["shard_size"])
        self.shards = metadata["shards"]
        self.count = int(metadata["count"])
        self.cache = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if is_remote(latent_dir) and cache_bytes == 0:
            if not str(latent_dir).startswith("gs://"):
                raise ValueError(
                    f"config.data.latent_cache_bytes=0 reads shards in place, which ArrayRecord "
                    f"does for gs:// only, not {latent_dir}: set a cache budget (bytes) instead."
                )
            self._pool = concurrent.futures.ThreadPoolExecutor(_DIRECT_READ_THREADS)
        elif is_remote(latent_dir):
            self.cache = shard_cache.ShardCache(
                latent_dir,
                [shard["file"] for shard in self.shards],
                cache_bytes,
                cache_dir,
                on_evict=self._forget,
            )
        self._readers: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _open(self, shard: int, path: str) -> Any:
        from array_record.python import array_record_module

        info = self.shards[shard]
        reader = array_record_module.ArrayRecordReader(path, READER_OPTIONS)
        if not reader.ok() or reader.num_records() != info["count"]:
            found = reader.num_records()
            reader.close()
            where = os.path.join(self.latent_dir, info["file"])
            raise LatentFormatError(
                f"{where} has {found} records; {METADATA_FILE} says {info['count']}. Delete it "
                "and rerun encode_latents."
            )
        return reader

    def _reader(self, shard: int, path: str) -> Any:
        reader = self._readers.get(shard)
        if reader is None:
            reader = self._readers[shard] = self._open(shard, path)
        return reader

    def _forget(self, shard: int) -> None:
        """Closes the reader of `shard` (the cache is evicting it; it is not pinned)."""
        reader = self._readers.pop(shard, None)
        if reader is not None:
            reader.close()

    def read(self, indices: Sequence[int], step: int | None = None) -> list[bytes]:
        """The records of global example `indices`, in that order.

        Args:
          indices: Global example indices.
          step: The training step they belong to (moves a cache's prefetch window on).
        """
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"Example indices must be in [0, {self.count}).")
        shards, offsets = np.divmod(indices, self.shard_size)
        records: list[bytes] = [b""] * len(indices)
        with self._lock:
            needed = [int(shard) for shard in np.unique(shards)]
            groups = [np.flatnonzero(shards == shard) for shard in needed]

            def read_shard(rank: int) -> list[bytes]:
                positions = groups[rank]
                try:
                    return self._read_shard(
                        needed[rank], offsets[positions], step, needed[rank + 1 :]
                    )
                except (LatentFormatError, shard_cache.CacheBudgetError):
                    raise
                except Exception as error:  # noqa: BLE001 - a corrupt shard fails in many ways
                    where = os.path.join(self.latent_dir, self.shards[needed[rank]]["file"])
                    raise LatentFormatError(
                        f"cannot read the latent shard {where} ({type(error).__name__}: "
                        f"{error}): it is truncated or corrupt. Delete it and rerun "
                        "encode_latents, which encodes the missing shards again."
                    ) from error

            ranks = range(len(needed))
            parts = self._pool.map(read_shard, ranks) if self._pool else map(read_shard, ranks)
            for positions, values in zip(groups, parts, strict=True):
                for position, value in zip(positions, values, strict=True):
                    records[position] = value
        return records

    def _read_shard(
        self, shard: int, offsets: np.ndarray, step: int | None, later: list[int]
    ) -> list[bytes]:
        """Records at `offsets` of `shard`; through the cache one shard at a time (any budget
        that holds one shard serves any read, e.g. `real_examples` over every shard)."""
        offsets = [int(offset) for offset in offsets]
        if self.cache is None:
            path = os.path.join(self.latent_dir, self.shards[shard]["file"])
            return self._reader(shard, path).read(offsets)
        path = self.cache.acquire([shard], step, keep=later)[shard]
        try:  # pinned: the cache cannot evict it (nor close its reader) meanwhile
            return self._reader(shard, path).read(offsets)
        finally:
            self.cache.release([shard])

    def close(self) -> None:
        """Closes the open readers and deletes the shard cache (if any)."""
        with self._lock:
            if self.cache is not None:
                self.cache.close()  # first: its prefetcher may evict (and close readers)
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            for reader in list(self._readers.values()):
                reader.close()
            self._readers.clear()


class LatentSource:
    """Precomputed latents in `config.data.latent_dir` as a `DataSource` (module docstring).

    Attributes:
      element_shape: (h, w, latent_channels) from the metadata.
      num_classes: `config.data.num_classes` (0 = unconditional; labels then all 0).
      metadata: The directory's metadata.json.
      count: Number of examples.
      steps_per_epoch: Global batches per pass over the examples.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Reads the metadata (no record yet) and checks it against the config.

        Args:
          config: Experiment config; reads seed, batch_size, data.latent_dir, data.random_flip,
            data.num_classes, data.image_size, vae.scaling_factor, vae.latent_channels,
            vae.sample_posterior, and for a bucket directory data.latent_cache_bytes and
            data.latent_cache_dir.
          process_index: Index of this process in [0, process_count).
          process_count: Number of processes sharing each global batch.

        Raises:
          FileNotFoundError: If the directory or its metadata is missing or incomplete.
          ValueError: If the config disagrees with the metadata (scaling factor, latent channels,
            image size, classes), the batch does not fit, or (bucket directory) the cache budget
            cannot hold the shards of one batch.
        """
        self.latent_dir = config.data.latent_dir
        self.metadata = read_metadata(self.latent_dir)
        metadata = self.metadata
        where = f"config.data.latent_dir={self.latent_dir!r}"
        self.scaling_factor = float(config.vae.scaling_factor)
        stored = float(metadata["scaling_factor"])
        if abs(self.scaling_factor - stored) > 1e-6 * abs(stored):
            raise ValueError(
                f"config.vae.scaling_factor={self.scaling_factor} but {where} was encoded for "
                f"scaling factor {stored} (scaling_factor in {self.latent_dir}/{METADATA_FILE}); "
                f"set config.vae.scaling_factor={stored}."
            )
        self.element_shape = tuple(int(side) for side in metadata["latent_shape"])
        if int(config.vae.latent_channels) != self.element_shape[-1]:
            raise ValueError(
                f"config.vae.latent_channels={config.vae.latent_channels} but the latents in "
                f"{where} have {self.element_shape[-1]} channels (shape {self.element_shape})."
            )
        image_size = metadata["preprocessing"]["image_size"]
        if config.data.image_size != image_size:
            raise ValueError(
                f"config.data.image_size={config.data.image_size} but {where} was encoded from "
                f"{image_size}x{image_size} images; set config.data.image_size={image_size}."
            )
        self.num_classes = int(config.data.num_classes)
        stored_classes = int(metadata["num_classes"])
        if self.num_classes and self.num_classes != stored_classes:
            raise ValueError(
                f"config.data.num_classes={self.num_classes} but {where} has {stored_classes} "
                f"classes; set it to {stored_classes} (class-conditional) or 0 (unconditional)."
            )
        self.count = int(metadata["count"])
        if config.batch_size > self.count:
            raise ValueError(
                f"config.batch_size={config.batch_size} exceeds the {self.count} examples in "
                f"{where}."
            )
        self.seed = check_seed(config)
        self.random_flip = bool(config.data.random_flip)
        self.sample_posterior = bool(config.vae.sample_posterior)
        self.order = StepOrder(
            self.seed,
            self.count,
            config.batch_size,
            process_index,
            local_batch_size(config, process_index, process_count),
            _EPOCH_TAG,
        )
        self.steps_per_epoch = self.order.steps_per_epoch
        self.local_batch_size = self.order.local_batch_size
        self.workers = max(1, min(16, os.cpu_count() or 1))
        self.cache_bytes = config.data.get("latent_cache_bytes", DEFAULT_CACHE_BYTES)
        self.cache_dir = str(config.data.get("latent_cache_dir", "") or "")
        self.remote = is_remote(self.latent_dir)
        if self.remote and self.cache_bytes != 0:
            self._check_cache_budget()

    def _check_cache_budget(self) -> None:
        """Refuses a config.data.latent_cache_bytes that cannot hold one batch's shards."""
        shards = self.metadata["shards"]
        shards_per_batch = min(self.local_batch_size, len(shards))
        largest = int((epath.Path(self.latent_dir) / shards[0]["file"]).stat().length)
        shard_cache.check_budget(
            self.cache_bytes,
            shards_per_batch,
            largest,
            "config.data.latent_cache_bytes",
            self.latent_dir,
        )

    def _readers(self, prefetch_from: int | None = None) -> ShardReaders:
        """Readers of the directory; through a fresh shard cache for a bucket directory.

        Args:
          prefetch_from: With a cache, fetch the shards of steps prefetch_from, ... ahead.
        """
        readers = ShardReaders(self.latent_dir, self.metadata, self.cache_bytes, self.cache_dir)
        if readers.cache is not None and prefetch_from is not None:
            order = copy.copy(self.order)  # its own permutation memo: no thrash with the reader
            shard_size = int(self.metadata["shard_size"])

            def shards_of_step(step: int) -> np.ndarray:
                return np.unique(order.local_indices(step) // shard_size)

            readers.cache.start_prefetch(shards_of_step, prefetch_from, _CACHE_LOOKAHEAD_STEPS)
        return readers

    def _noise(self, step: int, start: int, stop: int) -> np.ndarray:
        """N(0, 1) noise of global-batch positions [start, stop) (inside one block).

        Block b (positions [b * 32, (b + 1) * 32)) draws from PCG64 seeded with (seed, step, b),
        so a position's noise does not depend on how the batch is split across processes.

        Returns:
          (stop - start, h, w, c) float32.
        """
        block = start // _NOISE_BLOCK
        if (stop - 1) // _NOISE_BLOCK != block:
            raise ValueError(f"Positions [{start}, {stop}) cross a noise block boundary.")
        rng = np.random.Generator(np.random.PCG64([self.seed, step, block, _NOISE_TAG]))
        noise = rng.standard_normal((_NOISE_BLOCK, *self.element_shape), np.float32)
        return noise[start - block * _NOISE_BLOCK : stop - block * _NOISE_BLOCK]

    def _assemble(
        self, records: list[bytes], flips: np.ndarray, step: int, start: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Latents (n, h, w, c) float32 and labels (n,) int32 of the records of global-batch
        positions [start, stop)."""
        latents = np.empty((len(records), *self.element_shape), np.float32)
        labels = np.zeros(len(records), np.int32)
        stds = np.empty_like(latents) if self.sample_posterior else None
        for row, (record, flip) in enumerate(zip(records, flips, strict=True)):
            _, label, moments = decode_record(record)
            offset = 2 if flip else 0
            latents[row] = moments[offset]
            if stds is not None:
                stds[row] = moments[offset + 1]
            labels[row] = label
        if stds is not None:
            latents += stds * self._noise(step, start, stop)
        latents *= np.float32(self.scaling_factor)
        if not self.num_classes:
            labels[:] = 0
        return latents, labels

    def _batch(
        self, step: int, readers: ShardReaders, executor: concurrent.futures.Executor | None
    ) -> dict[str, np.ndarray]:
        indices = self.order.local_indices(step)
        local = self.order.local_slice()
        if self.random_flip:
            flips = self.order.local_flips(step, _FLIP_TAG)
        else:
            flips = np.zeros(len(indices), bool)
        records = readers.read(indices, step)
        # Work items: this process's positions cut at the global noise-block boundaries.
        first_boundary = -(-local.start // _NOISE_BLOCK) * _NOISE_BLOCK
        bounds = sorted({local.start, local.stop, *range(first_boundary, local.stop, _NOISE_BLOCK)})
        chunks = list(zip(bounds[:-1], bounds[1:], strict=True))

        def assemble(chunk: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            start, stop = chunk
            rows = slice(start - local.start, stop - local.start)
            return self._assemble(records[rows], flips[rows], step, start, stop)

        parts = list(executor.map(assemble, chunks) if executor else map(assemble, chunks))
        return {
            "image": np.concatenate([part[0] for part in parts]),
            "label": np.concatenate([part[1] for part in parts]),
        }

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step `step` (read synchronously).

        Returns:
          {'image': (B_local, h, w, c) float32 scaled latents, 'label': (B_local,) int32}.
        """
        readers = self._readers()
        try:
            return self._batch(step, readers, None)
        finally:
            readers.close()

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields this process's batches from global step `start_step` on (endless).

        A background thread assembles up to a few batches ahead.

        Yields:
          {'image': (B_local, h, w, c) float32 scaled latents, 'label': (B_local,) int32}.
        """
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        return self._iterate(start_step)

    def _iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        return preprocess.in_background(self._produce(start_step), _PREFETCH_BATCHES)

    def _produce(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches from `start_step` on, with their own readers and worker threads."""
        readers = self._readers(prefetch_from=start_step)
        executor = concurrent.futures.ThreadPoolExecutor(self.workers)
        try:
            step = start_step
            while True:
                yield self._batch(step, readers, executor)
                step += 1
        finally:
            executor.shutdown(wait=False)
            readers.close()

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """Scaled posterior means (no flip, no sampling) of up to `n` examples in the fixed
        `image_folder.reference_order` (independent of seed and process; spread over classes).

        Returns:
          {'image': (N, h, w, c) float32, 'label': (N,) int32}, N = min(n, count).
        """
        indices = reference_order(self.count)[: max(0, n)]
        readers = self._readers()
        try:
            records = readers.read(indices)
        finally:
            readers.close()
        images = np.empty((len(indices), *self.element_shape), np.float32)
        labels = np.zeros(len(indices), np.int32)
        for row, record in enumerate(records):
            _, label, moments = decode_record(record)
            images[row] = moments[0]
            labels[row] = label if self.num_classes else 0
        images *= np.float32(self.scaling_factor)
        return {"image": images, "label": labels}
