"""A directory of image files as a training source (`config.data.name = 'image_folder'`).

Layout of `config.data.image_dir`:

    image_dir/
      class_a/ img0.jpg, sub/img1.png, ...     one folder per class: labels 0..K-1 in sorted
      class_b/ ...                             folder-name order; files found recursively
or
    image_dir/ img0.jpg, img1.png, ...         no subfolders: unconditional (every label 0)

Files are those with a common image extension (case-insensitive; see `IMAGE_EXTENSIONS`); names
starting with '.' are skipped. Examples are ordered by class, then by relative path: this fixed
order is the example index used by `shortcut_jax.tools.encode_latents` and by `real_examples`.

Each image is ADM-center-cropped to `config.data.image_size` (`preprocess.center_crop_adm`), made
grayscale ('L') or RGB per `config.data.channels`, scaled to [-1, 1], and mirrored with
probability 1/2 when `config.data.random_flip`.

Batches are addressed by step, like `mnist.MnistSource`: epoch e visits the examples in a
permutation that is a pure function of (config.seed, e), global step k takes positions
[k * B, (k + 1) * B) of its epoch (count // B steps per epoch; the remainder is dropped), and
process p takes its contiguous slice of that global batch. Flips are drawn per (seed, step,
position in the global batch). Resuming at step k therefore reads nothing before step k, and any
process layout sees the same global batches. Files are decoded by a thread pool, a few batches
ahead of the consumer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from shortcut_jax.data import check_seed, local_batch_size, preprocess

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)  # fmt: skip
LAYOUT = (
    "expected image_dir/<class_name>/**/<image> (one folder per class) or image files directly "
    "in image_dir (unconditional)"
)
# Last entries of numpy seed sequences: keep the streams of each use of config.seed apart.
_EPOCH_TAG = 0x6966  # 'if'
_FLIP_TAG = 0x666C  # 'fl'
_REFERENCE_SEED = 20_250_102
_PREFETCH_BATCHES = 2


class StepOrder:
    """Which examples global step k uses: seeded per-epoch permutations, sliced per process.

    Shared by the image-folder and latent sources.

    Attributes:
      count: Number of examples.
      batch_size: Global batch size B.
      local_batch_size: B_local = B // process_count.
      steps_per_epoch: count // B.
    """

    def __init__(
        self,
        seed: int,
        count: int,
        batch_size: int,
        process_index: int,
        local_batch_size: int,
        epoch_tag: int,
    ):
        self.seed = seed
        self.count = count
        self.batch_size = batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.steps_per_epoch = count // batch_size
        self._epoch_tag = epoch_tag
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """(count,) int64 permutation of the example indices: a pure function of (seed, epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, self._epoch_tag])
            self._cached = (epoch, rng.permutation(self.count))
        return self._cached[1]

    def global_indices(self, step: int) -> np.ndarray:
        """(B,) int64 example indices of the whole global batch of `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self.epoch_permutation(epoch)[start : start + self.batch_size]

    def local_slice(self) -> slice:
        """This process's positions within a global batch."""
        start = self.process_index * self.local_batch_size
        return slice(start, start + self.local_batch_size)

    def local_indices(self, step: int) -> np.ndarray:
        """(B_local,) int64: this process's slice of `global_indices(step)`."""
        return self.global_indices(step)[self.local_slice()]

    def local_flips(self, step: int, flip_tag: int = _FLIP_TAG) -> np.ndarray:
        """(B_local,) bool: mirror each example with probability 1/2, seeded by (seed, step)."""
        flips = np.random.default_rng([self.seed, step, flip_tag]).random(self.batch_size) < 0.5
        return flips[self.local_slice()]


def reference_order(count: int) -> np.ndarray:
    """A fixed permutation of [0, count) (independent of config.seed): `real_examples` order.

    Taking the first n of it spreads reference examples over all classes of a class-sorted
    dataset; the image-folder and latent sources of the same data use the same order.
    """
    return np.random.default_rng(_REFERENCE_SEED).permutation(count)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(root: str, folder: str) -> list[str]:
    """Sorted image paths (relative to `root`, '/'-separated) found recursively in `folder`."""
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        relative = os.path.relpath(directory, root).replace(os.sep, "/")
        found.extend(f"{relative}/{name}" for name in files if _is_image(name))
    return sorted(found)


def scan_image_dir(image_dir: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Lists the examples of an image folder in their fixed order.

    Args:
      image_dir: The folder (see the module docstring for the layout).

    Returns:
      files: Paths relative to `image_dir` ('/'-separated), class by class, sorted within a class.
      labels: (N,) int32 class index of every file (all 0 without class folders).
      class_names: Sorted class folder names; () for an unconditional folder.

    Raises:
      FileNotFoundError: If the folder does not exist or holds no images.
      ValueError: If images sit beside class folders, or a class folder has no images.
    """
    if not image_dir or not os.path.isdir(image_dir):
        raise FileNotFoundError(
            f"config.data.image_dir={image_dir!r} is not a directory; {LAYOUT}."
        )
    with os.scandir(image_dir) as entries:
        entries = sorted(entries, key=lambda entry: entry.name)
        class_names = tuple(
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=True) and not entry.name.startswith(".")
        )
        top_images = [entry.name for entry in entries if entry.is_file() and _is_image(entry.name)]
    if not class_names:
        if not top_images:
            raise FileNotFoundError(
                f"config.data.image_dir={image_dir!r} has no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); {LAYOUT}."
            )
        return sorted(top_images), np.zeros(len(top_images), np.int32), ()
    if top_images:
        raise ValueError(
            f"config.data.image_dir={image_dir!r} has both class folders {list(class_names[:3])} "
            f"and image files at the top level ({top_images[0]!r}, ...); {LAYOUT}."
        )
    files: list[str] = []
    labels: list[np.ndarray] = []
    for label, class_name in enumerate(class_names):
        found = _images_under(image_dir, os.path.join(image_dir, class_name))
        if not found:
            raise ValueError(
                f"Class folder {os.path.join(image_dir, class_name)!r} in config.data.image_dir "
                f"has no image files ({', '.join(IMAGE_EXTENSIONS)}); {LAYOUT}."
            )
        files.extend(found)
        labels.append(np.full(len(found), label, np.int32))
    return files, np.concatenate(labels), class_names


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(
            f"config.data.channels={channels} must be 1 (grayscale) or 3 (RGB) for "
            "config.data.name='image_folder'."
        )


def describe(image_dir: str, files: list[str], class_names: tuple[str, ...]) -> dict:
    """JSON-able identity of an image folder: path, count, classes and a file-list fingerprint."""
    return {
        "name": "image_folder",
        "image_dir": os.path.abspath(image_dir),
        "count": len(files),
        "num_classes": len(class_names),
        "file_list_sha256": preprocess.fingerprint(files),
    }


def indexed_images(
    config: ml_collections.ConfigDict, channels: int = 3
) -> preprocess.IndexedImages:
    """`config.data.image_dir` enumerated once in its fixed order (for encoding latents).

    Args:
      config: Reads data.image_dir and data.image_size.
      channels: 1 (grayscale) or 3 (RGB).

    Returns:
      `preprocess.IndexedImages` of ADM-center-cropped uint8 images and folder labels.
    """
    _check_channels(channels)
    image_dir, size = config.data.image_dir, config.data.image_size
    files, labels, class_names = scan_image_dir(image_dir)

    def load(index: int) -> preprocess.Example:
        path = os.path.join(image_dir, files[index])
        return index, preprocess.load_image(path, size, channels), int(labels[index])

    def read_range(start: int, stop: int) -> Iterator[preprocess.Example]:
        return preprocess.parallel_map(load, range(start, stop), preprocess.default_workers())

    return preprocess.IndexedImages(
        count=len(files),
        class_names=class_names,
        description=describe(image_dir, files, class_names),
        image_size=size,
        channels=channels,
        read_range=read_range,
    )


class ImageFolderSource:
    """`config.data.image_dir` as a `DataSource` (see the module docstring).

    Attributes:
      element_shape: (image_size, image_size, channels).
      num_classes: `config.data.num_classes` (0 = unconditional; labels then all 0).
      class_names: Sorted class folder names (() without class folders).
      files: Relative paths of all examples, in index order.
      steps_per_epoch: Global batches per pass over the folder.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Scans the folder (no image is read yet) and checks the config.

        Args:
          config: Experiment config; reads seed, batch_size and config.data.*.
          process_index: Index of this process in [0, process_count).
          process_count: Number of processes sharing each global batch.

        Raises:
          FileNotFoundError: If config.data.image_dir is missing or has no images.
          ValueError: On a class-count or channel mismatch, a bad layout or image size, or a
            batch that does not fit the folder or split across processes.
        """
        data = config.data
        _check_channels(data.channels)
        if not isinstance(data.image_size, int) or data.image_size < 1:
            raise ValueError(f"config.data.image_size={data.image_size!r} must be a positive int.")
        self.image_dir = data.image_dir
        self.files, self.labels, self.class_names = scan_image_dir(data.image_dir)
        self.num_classes = int(data.num_classes)
        if self.num_classes and self.num_classes != len(self.class_names):
            raise ValueError(
                f"config.data.num_classes={self.num_classes} but config.data.image_dir="
                f"{data.image_dir!r} has {len(self.class_names)} class folders; set it to "
                f"{len(self.class_names)} (class-conditional) or 0 (unconditional)."
            )
        count = len(self.files)
        if config.batch_size > count:
            raise ValueError(
                f"config.batch_size={config.batch_size} exceeds the {count} images in "
                f"config.data.image_dir={data.image_dir!r}."
            )
        self.seed = check_seed(config)
        self.image_size = data.image_size
        self.channels = data.channels
        self.random_flip = bool(data.random_flip)
        self.element_shape = (data.image_size, data.image_size, data.channels)
        self.order = StepOrder(
            self.seed,
            count,
            config.batch_size,
            process_index,
            local_batch_size(config, process_index, process_count),
            _EPOCH_TAG,
        )
        self.steps_per_epoch = self.order.steps_per_epoch
        self.workers = preprocess.default_workers()

    def _load(self, index: int, flip: bool) -> np.ndarray:
        """(S, S, C) float32 in [-1, 1] of example `index`, mirrored if `flip`."""
        path = os.path.join(self.image_dir, self.files[index])
        image = preprocess.load_image(path, self.image_size, self.channels)
        if flip:
            image = image[:, ::-1]
        return preprocess.to_float(image)

    def _labels(self, indices: np.ndarray) -> np.ndarray:
        if self.num_classes:
            return self.labels[indices].astype(np.int32)
        return np.zeros(len(indices), np.int32)

    def _submit(
        self, executor: concurrent.futures.Executor, step: int
    ) -> tuple[np.ndarray, list[concurrent.futures.Future]]:
        indices = self.order.local_indices(step)
        flips = self.order.local_flips(step) if self.random_flip else np.zeros(len(indices), bool)
        futures = [
            executor.submit(self._load, int(index), bool(flip))
            for index, flip in zip(indices, flips, strict=True)
        ]
        return indices, futures

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step `step` (read synchronously).

        Returns:
          {'image': (B_local, S, S, C) float32 in [-1, 1], 'label': (B_local,) int32}.
        """
        with concurrent.futures.ThreadPoolExecutor(self.workers) as executor:
            indices, futures = self._submit(executor, step)
            images = np.stack([future.result() for future in futures])
        return {"image": images, "label": self._labels(indices)}

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields this process's batches from global step `start_step` on (endless).

        Yields:
          {'image': (B_local, S, S, C) float32 in [-1, 1], 'label': (B_local,) int32}.

        Raises:
          ValueError: If start_step < 0, or naming an image file that cannot be read.
        """
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        return self._iterate(start_step)

    def _iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        executor = concurrent.futures.ThreadPoolExecutor(self.workers)
        pending: collections.deque = collections.deque()
        step = start_step
        try:
            while True:
                while len(pending) <= _PREFETCH_BATCHES:
                    pending.append(self._submit(executor, step))
                    step += 1
                indices, futures = pending.popleft()
                images = np.stack([future.result() for future in futures])
                yield {"image": images, "label": self._labels(indices)}
        finally:
            for _, futures in pending:
                for future in futures:
                    future.cancel()
            executor.shutdown(wait=False)

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """Up to `n` examples in `reference_order` (independent of seed and process; no flip).

        Returns:
          {'image': (N, S, S, C) float32 in [-1, 1], 'label': (N,) int32}, N = min(n, count).
        """
        indices = reference_order(len(self.files))[: max(0, n)]

        def load(index: int) -> np.ndarray:
            return self._load(int(index), False)

        images = list(preprocess.parallel_map(load, indices, self.workers))
        if not images:
            images_array = np.zeros((0, *self.element_shape), np.float32)
        else:
            images_array = np.stack(images)
        return {"image": images_array, "label": self._labels(indices)}
