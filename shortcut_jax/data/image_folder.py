"""A directory of image files as a training source (`config.data.name = 'image_folder'`), and the
step-addressed batching it shares with the TFDS source.

Layout of `config.data.image_dir` (a local path or a bucket path such as gs://bucket/imagenet):

    image_dir/
      class_a/ img0.jpg, sub/img1.png, ...     one folder per class: labels 0..K-1 in sorted
      class_b/ ...                             folder-name order; files found recursively
or
    image_dir/ img0.jpg, img1.png, ...         no subfolders: unconditional (every label 0)

Files are those with a common image extension (case-insensitive; see
`preprocess.IMAGE_EXTENSIONS`); names starting with '.' are skipped. Examples are ordered by class,
then by relative path: this fixed order is the example index used by
`shortcut_jax.tools.encode_latents` and by `real_examples` (`preprocess.scan_image_dir`).

Each image is ADM-center-cropped to `config.data.image_size` (`preprocess.center_crop_adm`), made
grayscale ('L') or RGB per `config.data.channels`, scaled to [-1, 1], and mirrored with
probability 1/2 when `config.data.random_flip`.

`IndexedImageSource` serves batches of any `preprocess.IndexedImages` by step (image folders here,
TFDS in `tfds_source`): epoch e visits the examples in a permutation that is a pure function of
(config.seed, e), global step k takes positions [k * B, (k + 1) * B) of its epoch (count // B steps
per epoch; the remainder is dropped), and process p takes its contiguous slice of that global
batch. Flips are drawn per (seed, step, position in the global batch). Resuming at step k therefore
reads nothing before step k, and any process layout sees the same global batches. Images are read
and decoded by a thread pool, a few batches ahead of the consumer.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator

import ml_collections
import numpy as np

from shortcut_jax.data import check_seed, local_batch_size, preprocess

# Last entries of numpy seed sequences: keep the streams of each use of config.seed apart.
_EPOCH_TAG = 0x6966  # 'if'
_FLIP_TAG = 0x666C  # 'fl'
_REFERENCE_SEED = 20_250_102
_PREFETCH_BATCHES = 2


class StepOrder:
    """Which examples global step k uses: seeded per-epoch permutations, sliced per process.

    Shared by the image-folder, TFDS and latent sources.

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
        cached = self._cached
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, self._epoch_tag])
            cached = self._cached = (epoch, rng.permutation(self.count))
        return cached[1]

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
    dataset; the image-folder, TFDS and latent sources of the same data use the same order.
    """
    return np.random.default_rng(_REFERENCE_SEED).permutation(count)


def check_image_size(config: ml_collections.ConfigDict) -> int:
    """Returns config.data.image_size after checking it is a positive int."""
    size = config.data.image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"config.data.image_size={size!r} must be a positive int.")
    return size


class IndexedImageSource:
    """Training batches of a `preprocess.IndexedImages`, addressed by step (module docstring).

    Attributes:
      images: The dataset read by index.
      element_shape: (image_size, image_size, channels).
      num_classes: Classes of the labels (0 = unconditional; labels then all 0).
      class_names: The dataset's class names (() when unlabelled).
      steps_per_epoch: Global batches per pass over the dataset.
      order: The `StepOrder` (which indices each step and process reads).
      finite_by_construction: True: pixels decoded from 8-bit images are never NaN or inf, so
        the train loop does not scan them (`data.checks`).
    """

    finite_by_construction = True

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        images: preprocess.IndexedImages,
        where: str,
        process_index: int = 0,
        process_count: int = 1,
    ):
        """Checks the batch against the dataset (no image is read).

        Args:
          config: Experiment config; reads seed, batch_size, data.num_classes, data.random_flip.
          images: The dataset, with images already at the configured size and channels.
          where: Names the dataset in errors, e.g. "config.data.image_dir='/data/x'".
          process_index: Index of this process in [0, process_count).
          process_count: Number of processes sharing each global batch.

        Raises:
          ValueError: If the batch does not fit the dataset or split across processes.
        """
        if config.batch_size > images.count:
            raise ValueError(
                f"config.batch_size={config.batch_size} exceeds the {images.count} images in "
                f"{where}."
            )
        self.images = images
        self.seed = check_seed(config)
        self.num_classes = int(config.data.num_classes)
        self.class_names = images.class_names
        self.random_flip = bool(config.data.random_flip)
        self.element_shape = (images.image_size, images.image_size, images.channels)
        self.order = StepOrder(
            self.seed,
            images.count,
            config.batch_size,
            process_index,
            local_batch_size(config, process_index, process_count),
            _EPOCH_TAG,
        )
        self.steps_per_epoch = self.order.steps_per_epoch
        self.local_batch_size = self.order.local_batch_size
        self.workers = preprocess.default_workers()

    def _load(self, index: int, flip: bool) -> tuple[np.ndarray, int]:
        """(S, S, C) float32 in [-1, 1] of example `index` (mirrored if `flip`), and its label."""
        image, label = self.images.load(index)
        if flip:
            image = image[:, ::-1]
        return preprocess.to_float(image), label if self.num_classes else 0

    def _submit(
        self, executor: concurrent.futures.Executor, step: int
    ) -> list[concurrent.futures.Future]:
        indices = self.order.local_indices(step)
        flips = self.order.local_flips(step) if self.random_flip else np.zeros(len(indices), bool)
        return [
            executor.submit(self._load, int(index), bool(flip))
            for index, flip in zip(indices, flips, strict=True)
        ]

    @staticmethod
    def _collect(futures: list[concurrent.futures.Future]) -> dict[str, np.ndarray]:
        examples = [future.result() for future in futures]
        return {
            "image": np.stack([image for image, _ in examples]),
            "label": np.array([label for _, label in examples], np.int32),
        }

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step `step` (read synchronously).

        Returns:
          {'image': (B_local, S, S, C) float32 in [-1, 1], 'label': (B_local,) int32}.
        """
        with concurrent.futures.ThreadPoolExecutor(self.workers) as executor:
            return self._collect(self._submit(executor, step))

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields this process's batches from global step `start_step` on (endless).

        Only the examples of steps >= start_step are read (O(1) in start_step).

        Yields:
          {'image': (B_local, S, S, C) float32 in [-1, 1], 'label': (B_local,) int32}.

        Raises:
          ValueError: If start_step < 0, or naming an image that cannot be read.
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
                yield self._collect(pending.popleft())
        finally:
            for futures in pending:
                for future in futures:
                    future.cancel()
            executor.shutdown(wait=False)

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """Up to `n` examples in `reference_order` (independent of seed and process; no flip).

        Returns:
          {'image': (N, S, S, C) float32 in [-1, 1], 'label': (N,) int32}, N = min(n, count).
        """
        indices = reference_order(self.images.count)[: max(0, n)]
        examples = list(
            preprocess.parallel_map(
                lambda index: self._load(int(index), False), indices, self.workers
            )
        )
        if not examples:
            return {
                "image": np.zeros((0, *self.element_shape), np.float32),
                "label": np.zeros((0,), np.int32),
            }
        return {
            "image": np.stack([image for image, _ in examples]),
            "label": np.array([label for _, label in examples], np.int32),
        }


class ImageFolderSource(IndexedImageSource):
    """`config.data.image_dir` as a `DataSource` (see the module docstring).

    Attributes:
      image_dir: The folder (local or gs://).
      (and those of `IndexedImageSource`)
    """

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Lists the folder (no image is read yet) and checks the config.

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
        preprocess.check_folder_channels(data.channels)
        check_image_size(config)
        images = preprocess.folder_images(config, data.channels)
        classes = len(images.class_names)
        if data.num_classes and data.num_classes != classes:
            raise ValueError(
                f"config.data.num_classes={data.num_classes} but config.data.image_dir="
                f"{data.image_dir!r} has {classes} class folders; set it to {classes} "
                "(class-conditional) or 0 (unconditional)."
            )
        self.image_dir = data.image_dir
        where = f"config.data.image_dir={data.image_dir!r}"
        super().__init__(config, images, where, process_index, process_count)
