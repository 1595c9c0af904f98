"""A checkpoint that fails to restore is named with the reason; `restore_fallback` moves it aside
(never deletes it) and resumes from the newest older checkpoint that restores."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tiny import tiny_mnist_config

from shortcut_jax import checkpoint, train


def _corrupt(step_dir) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"corrupt")


def _config(total_steps: int, fallback: bool = False):
    config = tiny_mnist_config(total_steps)
    config.restore_fallback = fallback
    return config


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(_config(6), str(workdir))
    newest = workdir / "checkpoints" / "6"
    _corrupt(newest)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        train.train_and_evaluate(_config(9), str(workdir))
    assert str(newest) in str(refused.value) and "restore_fallback=true" in str(refused.value)
    assert newest.exists()  # nothing moved without the switch

    history = train.train_and_evaluate(_config(9, fallback=True), str(workdir))
    assert min(history) == 4 and max(history) == 9  # resumed after step 3, the previous one
    kept = workdir / "failed_checkpoints" / "6"
    assert kept.is_dir() and any((kept / "state").rglob("*"))  # kept, not deleted
    _, state = checkpoint.load_run(str(workdir))
    _, expected = checkpoint.load_run(_uninterrupted(tmp_path))
    assert int(state.step) == 9
    for got, want in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(expected.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _uninterrupted(tmp_path) -> str:
    workdir = str(tmp_path / "reference")
    train.train_and_evaluate(_config(9), workdir)
    return workdir


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PermissionError("[Errno 13] Permission denied: 'x'"), "permission denied"),
        (ValueError("Requested shape (4, 8) does not match stored (4, 16)"), "shape mismatch"),
        (FileNotFoundError("no such file: _METADATA"), "missing item"),
        (ValueError("Unsupported checkpoint version 9"), "incompatible version"),
        (ValueError("zarr: invalid chunk header"), "corrupt or unreadable"),
    ],
)
def test_restore_failures_are_named_by_kind(error, reason):
    assert checkpoint.why(error).startswith(reason)
