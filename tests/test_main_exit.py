"""How `python -m shortcut_jax.main` ends: one `error:` line, exit 2 for an empty --workdir, a
missing config file or variant (usage errors) and exit 1 for a checkpoint it must not train on,
never a traceback or a run in the current directory.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from tiny import REPO, run_module, tiny_mnist_config

from shortcut_jax import checkpoint, train


def run_main(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shortcut_jax.main", "--config", str(REPO / "tests/tiny.py"), *args],
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_empty_workdir_is_refused_not_taken_for_the_current_directory(tmp_path):
    with pytest.raises(ValueError, match="the workdir is empty"):
        checkpoint.workdir_path("  ")
    result = run_main(tmp_path, "--workdir=")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --workdir='' is empty")
    assert list(tmp_path.iterdir()) == []  # nothing trained or written here


def test_resuming_from_a_nan_checkpoint_ends_with_one_error_line(tmp_path):
    workdir = tmp_path / "run"
    config = tiny_mnist_config(3)
    train.train_and_evaluate(config, str(workdir))
    _, state = checkpoint.load_run(str(workdir))
    poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.inf, state.params))
    manager = checkpoint.make_manager(str(workdir))
    manager.save(
        4,
        args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardSave(poisoned),
            config=checkpoint.ocp.args.JsonSave(config.to_dict()),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    result = run_main(REPO, f"--workdir={workdir}", "--config.total_steps=3")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the checkpoint {workdir / 'checkpoints' / '4'} holds NaN")
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_ends_with_one_error_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config",
            "experiments/missing.py",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --config:") and "experiments/missing.py" in last


def test_an_unknown_config_variant_is_one_line_not_a_traceback(tmp_path):
    result = run_module(
        "shortcut_jax.main",
        "--config",
        "experiments/imagenet256.py:bogus",
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "error: flag --config=experiments/imagenet256.py:bogus: Error whilst parsing config "
        "file: ValueError: unknown config variant 'bogus'" in result.stderr
    )
