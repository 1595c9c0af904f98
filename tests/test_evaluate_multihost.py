"""`python -m shortcut_jax.evaluate` on two processes (jax.distributed on localhost, gloo): each
process samples its share of every chunk, the float64 feature moments are merged across the
processes, process 0 alone writes the report, and the scores equal a one-process run's."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import free_port, run_processes, tiny_mnist_config

from shortcut_jax import train


def evaluate_command(workdir: Path, out: Path, *extra: str) -> list[str]:
    # 20 samples in chunks of 8: the last chunk is half padding, and all of process 1's rows of
    # it are padding; precision/recall features span two chunks.
    return [
        sys.executable,
        "-m",
        "shortcut_jax.evaluate",
        f"--workdir={workdir}",
        "--steps=1,2",
        "--num=20",
        "--batch_size=8",
        "--metrics=fd_mnist",
        "--cfg=1.0",
        "--ref_num=100",
        "--pr_num=10",
        f"--out={out}",
        f"--cache_dir={out}_cache",
        *extra,
    ]


def environment(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


@pytest.mark.slow
def test_two_processes_give_the_one_process_scores_and_one_report(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_mnist_config(3), str(workdir))

    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    port = free_port()
    distributed = ("--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
    outputs = run_processes(  # the one-process run alongside, to save time
        [
            *(
                evaluate_command(workdir, multi_out, *distributed, f"--process_id={index}")
                for index in range(2)
            ),
            evaluate_command(workdir, single_out),
        ],
        env=environment(1),
        timeout=300,
    )
    assert "| steps | NFE | CFG | fd_mnist |" in outputs[0][0]
    assert "fd_mnist" not in outputs[1][0]  # process 1 computes, but reports nothing

    single = json.loads((single_out / "results.json").read_text())
    multi = json.loads((multi_out / "results.json").read_text())
    assert multi["settings"]["processes"] == 2 and single["settings"]["processes"] == 1
    assert [row["steps"] for row in multi["rows"]] == [row["steps"] for row in single["rows"]]
    for one, two in zip(single["rows"], multi["rows"], strict=True):
        assert np.isfinite(one["fd_mnist"]) and one["fd_mnist"] > 0
        np.testing.assert_allclose(two["fd_mnist"], one["fd_mnist"], rtol=1e-4)
        for key in ("fd_mnist/precision", "fd_mnist/recall"):
            assert two[key] == pytest.approx(one[key], abs=0.11)  # one of 10 may flip
    assert multi["metrics"]["fd_mnist"]["floor"] == pytest.approx(
        single["metrics"]["fd_mnist"]["floor"], rel=1e-6
    )
