"""The reproduction study script end to end on toy data at a tiny budget: a distillation method
trains its flow-matching teacher on half the budget, reflow draws pairs from it, and the scores,
table and plot come out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import REPO


@pytest.mark.slow
def test_objectives_study_runs_a_two_stage_method_and_reports_it(tmp_path):
    command = [
        sys.executable,
        "benchmarks/objectives_study.py",
        "--suite=toy2d",
        "--budget=40",
        "--only=reflow",
        "--pairs=512",
        "--pair_steps=4",
        "--warmup_steps=5",
        f"--workdir={tmp_path / 'runs'}",
        f"--results_dir={tmp_path / 'results'}",
        f"--figures_dir={tmp_path / 'figures'}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "objectives_toy2d.json").read_text())
    assert results["_teacher"]["steps"] == 20
    entry = results["reflow"]
    assert entry["teacher_steps"] == 20 and entry["student_steps"] == 20
    assert entry["pairs"]["num"] == 512 and entry["pairs"]["steps"] == 4
    floor, ceiling = entry["sw2_floor"], entry["sw2_ceiling"]
    assert 0 < floor < 0.1 < ceiling
    assert sorted(entry["sw2"], key=int) == ["1", "2", "4", "8", "128"]
    assert all(0 < value < 10 * ceiling for value in entry["sw2"].values())
    assert (tmp_path / "figures" / "objectives_toy2d.png").stat().st_size > 10_000

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "reflow: done already" in rerun.stdout  # resumable

    report = subprocess.run(
        [*command[:3], "--report", f"--results_dir={tmp_path / 'results'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| reflow | 20 teacher + 20 |" in report.stdout
