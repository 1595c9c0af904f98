"""Bad data is named once, not looped: every batch is checked for NaN and inf on the host.

A non-finite value stops the run with the data source, the step, the positions in this process's
batch and, for the sources that address examples by index, the dataset indices of those examples
(`BadDataError`); rerunning reads the same batch, so the message says how to go on:
`config.data.skip_non_finite = True` replaces each bad example by the first good one of its
batch (the batch keeps its shape, so nothing recompiles) and counts them; the train loop logs
the count as `data/skipped_examples`.

Sources whose values cannot be non-finite (pixels decoded from 8-bit images) say so with a
`finite_by_construction = True` attribute and are not scanned: at 256x256 a batch of 256 costs
~15 ms of host time per step to scan. Latents and reflow pairs, read back as floats, are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class BadDataError(ValueError):
    """A batch holds NaN or inf values."""


def example_indices(source: Any, step: int) -> np.ndarray | None:
    """Dataset indices of this process's examples of global step `step`, where the source
    addresses examples by index (MNIST, image folders, TFDS, latents); None otherwise."""
    order = getattr(source, "order", None)
    if order is not None and hasattr(order, "local_indices"):
        return np.asarray(order.local_indices(step))
    if hasattr(source, "local_indices"):
        return np.asarray(source.local_indices(step))
    return None


def _bad_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """(B,) bool: the examples with a NaN or inf in any floating array of the batch."""
    bad = None
    for value in batch.values():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating) or value.ndim == 0:
            continue
        rows = ~np.isfinite(value.reshape(value.shape[0], -1)).all(axis=1)
        bad = rows if bad is None else bad | rows
    return np.zeros(0, bool) if bad is None else bad


class FiniteBatches:
    """Iterates `source.iterate(start_step)`, checking each batch (see the module docstring).

    Attributes:
      skipped: examples replaced so far (with `skip`).
    """

    def __init__(self, source: Any, name: str, start_step: int, skip: bool = False):
        self._source = source
        self._name = name
        self._batches = source.iterate(start_step)
        self._step = start_step
        self._skip = skip
        self._scan = not getattr(source, "finite_by_construction", False)
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._batches)
        except (ValueError, OSError) as error:  # an unreadable image or shard names its file
            raise BadDataError(
                f"the data ({self._name}) could not be read at step {self._step + 1}: {error}"
            ) from error
        self._step += 1
        if not self._scan:
            return batch
        bad = _bad_rows(batch)
        if not bad.any():
            return batch
        positions = np.flatnonzero(bad)
        if not self._skip or bad.all():
            raise BadDataError(self._message(positions, every=bool(bad.all())))
        good = int(np.flatnonzero(~bad)[0])
        batch = {key: np.array(value, copy=True) for key, value in batch.items()}
        for value in batch.values():
            if value.ndim and len(value) == len(bad):
                value[bad] = value[good]
        self.skipped += len(positions)
        return batch

    def _message(self, positions: np.ndarray, every: bool) -> str:
        where = f"positions {positions.tolist()} of this process's batch"
        indices = example_indices(self._source, self._step)
        if indices is not None:
            where += f" (dataset examples {indices[positions].tolist()})"
        advice = (
            "every example of the batch is bad: fix or remove the data"
            if every
            else "fix or remove those examples, or rerun with "
            "--config.data.skip_non_finite=true to replace them by good examples of their "
            "batch (counted as data/skipped_examples)"
        )
        return f"the data ({self._name}) holds NaN or inf at step {self._step}, {where}: {advice}"
