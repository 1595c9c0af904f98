"""Batches put on the devices ahead of the train step that uses them."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator

import jax
import numpy as np

from shortcut_jax import sharding


def to_devices(
    batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Yields the global batches of `batches` (this process's shares) in order, placed ahead.

    Each host batch becomes a global array split over the mesh's batch axes
    (`sharding.global_batch`: `jax.make_array_from_process_local_data` per key, so it works on
    many hosts). `depth` placed batches are held: the one yielded and the next depth - 1, each
    placed while the steps before it run. Nothing is read beyond those.

    Raises:
      ValueError: if depth < 1.
    """
    if depth < 1:
        raise ValueError(f"depth={depth}: at least one batch must be placed ahead.")
    queue: collections.deque = collections.deque()

    def enqueue(count: int) -> None:
        for batch in itertools.islice(batches, count):
            queue.append(sharding.global_batch(mesh, batch))

    enqueue(depth)
    while queue:
        yield queue.popleft()
        enqueue(1)
