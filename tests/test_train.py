"""The train loop: exact resume, NaN guard, corrupt checkpoints, and the CLIs end to end."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import run_module, tiny_mnist_config

from shortcut_jax import checkpoint, data, train

REPO = Path(__file__).resolve().parents[1]


def losses(history: dict[int, dict[str, float]]) -> dict[int, float]:
    return {step: summary["loss"] for step, summary in history.items()}


def test_resume_gives_the_same_losses_and_state_as_an_uninterrupted_run(tmp_path):
    uninterrupted = train.train_and_evaluate(tiny_mnist_config(6), str(tmp_path / "a"))

    first_half = train.train_and_evaluate(tiny_mnist_config(3), str(tmp_path / "b"))
    second_half = train.train_and_evaluate(tiny_mnist_config(6), str(tmp_path / "b"))

    assert sorted(first_half) == [1, 2, 3] and sorted(second_half) == [4, 5, 6]
    resumed = {**losses(first_half), **losses(second_half)}
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 7)],
        [losses(uninterrupted)[s] for s in range(1, 7)],
        rtol=1e-6,
    )
    # Optimizer state, EMA and step were restored too: the final states are identical.
    _, state_a = checkpoint.load_run(str(tmp_path / "a"))
    _, state_b = checkpoint.load_run(str(tmp_path / "b"))
    assert int(state_a.step) == int(state_b.step) == 6
    for leaf_a, leaf_b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_allclose(np.asarray(leaf_a), np.asarray(leaf_b), rtol=1e-6, atol=1e-7)


def test_flow_matching_and_ema_teacher_run_through_the_same_loop(tmp_path):
    config = tiny_mnist_config(2)
    config.objective = "flow_matching"
    history = train.train_and_evaluate(config, str(tmp_path / "fm"))
    assert "loss_bootstrap" not in history[2] and np.isfinite(history[2]["loss_flow"])

    config = tiny_mnist_config(2)
    config.bootstrap_teacher = "ema"
    config.teacher_ema_rate = 0.5
    history = train.train_and_evaluate(config, str(tmp_path / "ema"))
    _, state = checkpoint.load_run(str(tmp_path / "ema"))
    assert state.teacher_params is not None
    assert np.isfinite(history[2]["loss_bootstrap"])


def test_metrics_report_flow_bootstrap_and_each_step_size(tmp_path):
    config = tiny_mnist_config(3)
    config.batch_size = 64
    config.log_every_steps = 3
    history = train.train_and_evaluate(config, str(tmp_path / "run"))
    summary = history[3]
    for name in ("loss", "loss_flow", "loss_bootstrap", "grad_norm", "learning_rate"):
        assert np.isfinite(summary[name]), name
    # 3 steps x 8 bootstrap examples over 3 levels (denoise_timesteps 8): every level is seen.
    assert {"loss_bootstrap/d=1_1", "loss_bootstrap/d=1_2", "loss_bootstrap/d=1_4"} <= set(summary)
    assert (tmp_path / "run" / "config.json").exists()
    assert list((tmp_path / "run" / "samples").glob("step_0000003.png"))
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


class _NaNAfter:
    """Wraps a data source so that batches from `step` on make the loss overflow to inf/NaN.

    The values are finite (the data check lets them through; NaN data is `test_bad_data`'s), but
    their squares overflow float32.
    """

    def __init__(self, source, step: int):
        self.source, self.step = source, step
        self.element_shape, self.num_classes = source.element_shape, source.num_classes

    def iterate(self, start_step: int = 0):
        for index, batch in enumerate(self.source.iterate(start_step), start=start_step):
            if index >= self.step:
                batch = {**batch, "image": np.full_like(batch["image"], 3e38)}
            yield batch


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_get_source = data.get_source
    monkeypatch.setattr(
        train.data, "get_source", lambda *args: _NaNAfter(real_get_source(*args), step=4)
    )
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint is step 3"):
        train.train_and_evaluate(tiny_mnist_config(6), workdir)
    _, state = checkpoint.load_run(workdir)
    assert int(state.step) == 3
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))


def test_corrupt_checkpoint_is_named_and_not_deleted(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_mnist_config(3), str(workdir))
    step_dir = workdir / "checkpoints" / "3"
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"corrupt")
    with pytest.raises(checkpoint.CheckpointError, match=str(step_dir)):
        train.train_and_evaluate(tiny_mnist_config(6), str(workdir))
    assert step_dir.exists()


def test_train_and_sample_clis_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    overrides = [
        "--config.total_steps=4",
        "--config.batch_size=8",
        "--config.model.hidden_size=32",
        "--config.model.depth=1",
        "--config.model.num_heads=2",
        "--config.model.patch_size=7",
        "--config.optim.warmup_steps=1",
        "--config.log_every_steps=2",
        "--config.sample_steps=(1,2)",
        "--config.sample_num=10",
        "--config.eval_every_steps=0",
    ]
    result = run_module(
        "shortcut_jax.main", "--config", "experiments/mnist.py", f"--workdir={workdir}", *overrides
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "checkpoints" / "4").is_dir()

    out = tmp_path / "samples" / "s.npz"
    result = run_module(
        "shortcut_jax.sample",
        f"--workdir={workdir}",
        "--steps=3",
        "--num=12",
        "--cfg=1.5",
        "--format=npz_float",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as samples:
        images, labels = samples["images"], samples["labels"]
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(labels, np.arange(12) % 10)
    assert out.with_suffix(".png").exists()

    result = run_module(
        "shortcut_jax.sample", f"--workdir={workdir}", "--steps=200", f"--out={out}"
    )
    assert result.returncode == 2 and "--steps=200" in result.stderr


def test_bucket_workdirs_are_kept_as_bucket_paths(tmp_path, monkeypatch):
    assert str(checkpoint.workdir_path("gs://bucket/runs/in256")) == "gs://bucket/runs/in256"
    assert str(checkpoint.checkpoint_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert str(checkpoint.workdir_path("runs/mnist")) == str(tmp_path / "runs" / "mnist")


def test_runs_saved_before_a_config_field_existed_still_load(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_mnist_config(2), str(workdir))
    saved = checkpoint.config_lib.from_json((workdir / "config.json").read_text())
    del saved["mesh"]
    del saved.data["toy_name"]
    filled = checkpoint._with_defaults(saved)
    assert filled.mesh.fsdp == 1 and filled.data.toy_name == "checkerboard"
    assert filled.model.hidden_size == 32  # saved values are kept
