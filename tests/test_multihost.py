"""Two processes on localhost, 4 CPU devices each, through jax.distributed (gloo collectives):
the same losses and evaluation scores as one process with 8 devices, and one checkpoint a single
process restores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import free_port, run_processes

from shortcut_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def main_command(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shortcut_jax.main",
        "--config",
        "tests/tiny.py",
        f"--workdir={workdir}",
        f"--config.total_steps={STEPS}",
        "--config.checkpoint_every_steps=3",
        # The periodic evaluation at the last step: sampling and features on the global mesh.
        f"--config.eval_every_steps={STEPS}",
        "--config.eval_steps=(1,2)",
        "--config.eval_num=24",
        "--config.eval_ref_num=200",
        "--config.eval_metrics=fd_mnist",
        *extra,
    ]


def environment(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def scalar_history(workdir: Path, tag: str) -> dict[int, float]:
    """Reads one scalar from the TensorBoard event files process 0 wrote (no TensorFlow)."""
    from shortcut_jax import tensorboard_events

    return tensorboard_events.read_scalars(str(workdir), tag)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
    port = free_port()
    multi = tmp_path / "two_processes"
    outputs = run_processes(
        [
            main_command(
                multi,
                "--distributed",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            )
            for index in range(2)
        ],
        env=environment(4),
    )
    assert "Process 1 of 2; 4 local of 8 devices" in outputs[1][1]

    single = tmp_path / "one_process"
    result = subprocess.run(
        main_command(single),
        cwd=REPO,
        env=environment(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    multi_losses = scalar_history(multi, "loss")
    single_losses = scalar_history(single, "loss")
    assert sorted(multi_losses) == sorted(single_losses) == list(range(1, STEPS + 1))
    for step, loss in single_losses.items():
        np.testing.assert_allclose(multi_losses[step], loss, rtol=1e-5)

    # The evaluation sampled and took features across both processes: the same scores.
    for tag in ("eval/fd_mnist/steps_1", "eval/fd_mnist/steps_2", "eval/fd_mnist_floor"):
        multi_score, single_score = scalar_history(multi, tag), scalar_history(single, tag)
        assert sorted(multi_score) == sorted(single_score) == [STEPS], tag
        np.testing.assert_allclose(multi_score[STEPS], single_score[STEPS], rtol=1e-4)

    # One checkpoint, written by both processes, restores in this single-device process.
    _, state = checkpoint.load_run(str(multi))
    assert int(state.step) == STEPS


# One objective per input that reaches the step in its own way across processes: a target network
# in the state (consistency_training), a frozen teacher run put on the mesh
# (consistency_distillation) and a pairs source read by each process (reflow). The math of every
# objective on a mesh is checked in one process by test_sharding (all of them).
OBJECTIVES = ("consistency_training", "consistency_distillation", "reflow")


def objectives_command(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "tests" / "mesh_worker.py"),
        "--mesh=data=4,fsdp=2",
        f"--workdir={workdir}",
        f"--steps={STEPS}",
        f"--objectives={','.join(OBJECTIVES)}",
        *extra,
    ]


def worker_losses(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])["objective_losses"]


@pytest.mark.slow
def test_every_objective_trains_in_two_processes_like_in_one(tmp_path):
    # The one-process run trains the distillation teacher and writes its pairs; the two
    # processes then load that same teacher onto their mesh.
    teacher = f"--teacher_dir={tmp_path / 'teacher'}"
    single = run_processes(
        [objectives_command(tmp_path / "one_process", teacher)], env=environment(8)
    )
    reference = worker_losses(single[0][0])
    port = free_port()
    outputs = run_processes(
        [
            objectives_command(
                tmp_path / "two_processes",
                teacher,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            )
            for index in range(2)
        ],
        env=environment(4),
    )
    for stdout, _ in outputs:
        losses = worker_losses(stdout)
        assert sorted(losses) == sorted(OBJECTIVES)
        for objective in OBJECTIVES:
            assert sorted(losses[objective]) == sorted(reference[objective]), objective
            for step, loss in reference[objective].items():
                np.testing.assert_allclose(losses[objective][step], loss, rtol=1e-5)


@pytest.mark.slow
def test_a_config_refused_on_one_process_ends_every_process_with_its_message(tmp_path):
    """Process 1 alone is given a bad value: both processes stop at once, saying the same."""
    port = free_port()
    commands = [
        [
            *main_command(tmp_path / "run", *([] if rank == 0 else ["--config.total_steps=-1"])),
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={rank}",
        ]
        for rank in range(2)
    ]
    processes = [
        subprocess.Popen(command, cwd=REPO, env=environment(1), stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    try:
        errors = [process.communicate(timeout=240)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, stderr in zip(processes, errors, strict=True):
        assert process.returncode == 2, stderr[-2000:]  # a usage error, on every process
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: process 1: Invalid config:") or (
            "process 1: Invalid config:" in stderr and "config.total_steps = -1" in stderr
        ), stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before the workdir was touched
