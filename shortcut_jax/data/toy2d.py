"""2-D toy distributions for fast tests and teaching (pure numpy).

Every step's global batch is a fresh sample from a numpy Generator seeded by (config.seed, step),
and process p takes its contiguous slice of it: batches are deterministic, resuming at step k
computes step k directly (nothing before it), and any process layout sees the same global
batches. Points are scaled to roughly [-1, 1] (per-coordinate std about 0.5-0.7). Unconditional:
labels are all 0.

Distributions (`config.data.toy_name`):
  * 'checkerboard': uniform on the 8 dark cells of a 4x4 board covering [-1, 1]^2.
  * 'eight_gaussians': 8 Gaussians (std 0.1) evenly spaced on the unit circle.
  * 'two_moons': two interleaved half circles with a little noise.
  * 'swiss_roll': a 2-D spiral with a little noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from shortcut_jax.data import check_seed, local_batch_size

# Last entries of the seed sequences (non-zero: numpy ignores trailing zeros in a seed sequence).
_TRAIN_TAG = 0x7472
_REFERENCE_TAG = 0x7265


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    column = rng.integers(0, 4, n)
    row = 2 * rng.integers(0, 2, n) + column % 2  # dark cells: row + column even
    cells = np.stack([column, row], axis=1)
    return -1.0 + 0.5 * (cells + rng.uniform(size=(n, 2)))


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.integers(0, 8, n) * (np.pi / 4)
    centers = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return centers + 0.1 * rng.standard_normal((n, 2))


def _two_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0.0, np.pi, n)
    lower = rng.integers(0, 2, n).astype(bool)
    x = np.where(lower, 1.0 - np.cos(angle), np.cos(angle))
    y = np.where(lower, 0.5 - np.sin(angle), np.sin(angle))
    points = np.stack([x - 0.5, y - 0.25], axis=1) + 0.075 * rng.standard_normal((n, 2))
    return points / 1.5


def _swiss_roll(n: int, rng: np.random.Generator) -> np.ndarray:
    turn = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
    points = np.stack([turn * np.cos(turn), turn * np.sin(turn)], axis=1) / (4.5 * np.pi)
    return points + 0.02 * rng.standard_normal((n, 2))


_SAMPLERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "checkerboard": _checkerboard,
    "eight_gaussians": _eight_gaussians,
    "two_moons": _two_moons,
    "swiss_roll": _swiss_roll,
}
TOY_NAMES = tuple(_SAMPLERS)


def sample_toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draws `n` points from the named 2-D distribution.

    Args:
      name: One of `TOY_NAMES`.
      n: Number of points.
      rng: numpy Generator (consumed).

    Returns:
      (n, 2) float32 points, roughly in [-1, 1].

    Raises:
      ValueError: If `name` is unknown.
    """
    if name not in _SAMPLERS:
        raise ValueError(
            f"config.data.toy_name={name!r} is not a known 2-D distribution; allowed: {TOY_NAMES}."
        )
    return _SAMPLERS[name](n, rng).astype(np.float32)


class Toy2dSource:
    """A 2-D toy distribution as a `DataSource` (see the module docstring).

    Attributes:
      element_shape: (2,).
      num_classes: 0 (unconditional).
    """

    element_shape = (2,)
    num_classes = 0

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Checks the config.

        Args:
          config: Experiment config; reads seed, batch_size, data.toy_name, data.num_classes.
          process_index: Index of this process in [0, process_count).
          process_count: Number of processes sharing each global batch.

        Raises:
          ValueError: On an unknown `config.data.toy_name`, `config.data.num_classes != 0`, or a
            batch size that does not split across processes.
        """
        if config.data.toy_name not in _SAMPLERS:
            raise ValueError(
                f"config.data.toy_name={config.data.toy_name!r} is not a known 2-D distribution; "
                f"allowed: {TOY_NAMES}."
            )
        if config.data.num_classes != 0:
            raise ValueError(
                f"config.data.num_classes={config.data.num_classes} but toy2d data is "
                "unconditional: set it to 0."
            )
        self.name = config.data.toy_name
        self.seed = check_seed(config)
        self.batch_size = config.batch_size
        self.local_batch_size = local_batch_size(config, process_index, process_count)
        self.local_start = process_index * self.local_batch_size

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch of step `step` (fresh, deterministic).

        Returns:
          {'image': (B_local, 2) float32, 'label': (B_local,) int32 zeros}.
        """
        rng = np.random.default_rng([self.seed, step, _TRAIN_TAG])
        points = sample_toy(self.name, self.batch_size, rng)  # the global batch (cheap: 2-D)
        points = points[self.local_start : self.local_start + self.local_batch_size]
        return {"image": points, "label": np.zeros(self.local_batch_size, np.int32)}

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields `batch(step)` for step = start_step, start_step + 1, ... (endless).

        Yields:
          {'image': (B_local, 2) float32, 'label': (B_local,) int32 zeros}.
        """
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """`n` fresh points from a fixed seed (config.seed; independent of the process).

        Returns:
          {'image': (n, 2) float32, 'label': (n,) int32 zeros}.
        """
        rng = np.random.default_rng([self.seed, _REFERENCE_TAG])
        n = max(0, n)
        return {"image": sample_toy(self.name, n, rng), "label": np.zeros(n, np.int32)}
