"""Batches placed on the devices ahead of the step: order, read-ahead bound, sharding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from shortcut_jax import prefetch, sharding


def _mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh(sharding.single_device_config())


def _host_batches(read: list[int]):
    step = 0
    while True:
        read.append(step)
        yield {"image": np.full((4, 2), step, np.float32), "label": np.arange(4, dtype=np.int32)}
        step += 1


def test_batches_come_in_order_with_the_batch_sharding():
    mesh = _mesh()
    batches = prefetch.to_devices(_host_batches([]), mesh, depth=2)
    for step in range(5):
        batch = next(batches)
        assert isinstance(batch["image"], jax.Array)
        assert batch["image"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
        np.testing.assert_array_equal(np.asarray(batch["image"]), np.full((4, 2), step))
        np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(4))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_reads_at_most_depth_minus_one_batches_beyond_the_one_yielded(depth):
    read: list[int] = []
    batches = prefetch.to_devices(_host_batches(read), _mesh(), depth=depth)
    for step in range(4):
        next(batches)
        assert max(read) == step + depth - 1


def test_a_finite_source_ends_after_its_last_batch():
    host = ({"image": np.full((2,), value, np.float32)} for value in range(3))
    values = [float(np.asarray(batch["image"])[0]) for batch in prefetch.to_devices(host, _mesh())]
    assert values == [0.0, 1.0, 2.0]


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth=0"):
        next(prefetch.to_devices(_host_batches([]), _mesh(), depth=0))
