"""SIGTERM in every phase: training, the final save, the final grids and evaluation, `sample` and
`evaluate`. Each ends cleanly (exit 0 with what is saved, or one line and exit 143 saying nothing
was written), and rerunning the same command completes what is missing without training again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from tiny import REPO, HookedRun, handles_sigterm

pytestmark = pytest.mark.slow

TOTAL = 6
EVAL = ["--config.eval_every_steps=6", "--config.eval_steps=(1,)", "--config.eval_num=16",
        "--config.eval_metrics=fd_mnist", "--config.eval_batch_size=16"]  # fmt: skip


def _args(workdir) -> list[str]:
    return ["--config", "tests/tiny.py", "--workdir", str(workdir),
            f"--config.total_steps={TOTAL}", *EVAL]  # fmt: skip


def test_sigterm_in_the_final_evaluation_then_a_rerun_completes_it_without_training(tmp_path):
    workdir = tmp_path / "run"
    hooks = {"SHORTCUT_JAX_TEST_EVAL_SECONDS": "30"}
    with HookedRun(_args(workdir), tmp_path / "first.log", hooks) as run:
        run.wait_for(lambda: run.evals == [TOTAL], timeout=300, what="the final evaluation")
        run.send(signal.SIGTERM)
        assert run.wait(timeout=60) == 0, run.stderr_tail()
    assert "SIGTERM during the final sample grids and evaluation" in run.stderr_tail()
    assert (workdir / "checkpoints" / str(TOTAL)).is_dir()
    assert not (workdir / "final.json").exists()

    with HookedRun(_args(workdir), tmp_path / "rerun.log") as rerun:
        assert rerun.wait(timeout=300) == 0, rerun.stderr_tail()
    assert "First step" not in rerun.log.read_text() and rerun.saves == []  # nothing trained
    assert json.loads((workdir / "final.json").read_text()) == {"evaluated": True, "step": TOTAL}
    assert "eval/fd_mnist/steps_1" in rerun.log.read_text()


def test_sigterm_while_the_final_checkpoint_is_written_keeps_it_whole(tmp_path):
    workdir = tmp_path / "run"
    hooks = {"SHORTCUT_JAX_TEST_SAVE_DELAY_SECONDS": "3", "SHORTCUT_JAX_TEST_STEP_SECONDS": "0.05"}
    with HookedRun(_args(workdir), tmp_path / "first.log", hooks) as run:
        run.wait_for(lambda: TOTAL in run.saves, timeout=300, what="the final save")
        run.send(signal.SIGTERM)  # inside the 3 s the save is held before its commit
        assert run.wait(timeout=60) == 0, run.stderr_tail()
    assert (workdir / "checkpoints" / str(TOTAL) / "commit_success.txt").exists() or (
        workdir / "checkpoints" / str(TOTAL) / "_CHECKPOINT_METADATA"
    ).exists()
    with HookedRun(_args(workdir), tmp_path / "rerun.log") as rerun:
        assert rerun.wait(timeout=300) == 0, rerun.stderr_tail()
    assert "First step" not in rerun.log.read_text() and rerun.saves == []
    assert json.loads((workdir / "final.json").read_text())["step"] == TOTAL


@pytest.mark.parametrize("cli", ["sample", "evaluate"])
def test_sigterm_stops_sample_and_evaluate_with_one_line_and_no_output(tmp_path, cli):
    workdir = tmp_path / "run"
    with HookedRun(_args(workdir), tmp_path / "train.log") as run:
        assert run.wait(timeout=300) == 0, run.stderr_tail()
    out = tmp_path / ("samples.npz" if cli == "sample" else "report")
    args = {
        "sample": ["--num=100000", "--batch_size=16", "--steps=8", f"--out={out}"],
        "evaluate": ["--num=100000", "--batch_size=16", "--steps=8", "--metrics=fd_mnist",
                     "--pr_num=0", f"--out={out}"],
    }[cli]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", f"shortcut_jax.{cli}", f"--workdir={workdir}", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not handles_sigterm(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, "never got ready"
            time.sleep(0.05)
        time.sleep(2.0)  # into the work (restore, compile or sampling)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM: ")
    assert not out.exists() or not any(out.iterdir())  # evaluate makes its --out folder first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".samples")]
