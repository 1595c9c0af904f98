"""The reproduction study end to end on toy data at a tiny budget (3 methods: one-stage, live
reflow, and progressive distillation with its teacher), and its report's refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import REPO

METHODS = "shortcut,live_reflow,progressive_distillation"


def study(tmp_path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "benchmarks/objectives_study.py",
        "--suite=toy2d",
        f"--workdir={tmp_path / 'runs'}",
        f"--results_dir={tmp_path / 'results'}",
        f"--figures_dir={tmp_path / 'figures'}",
        *args,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_study_plans_equal_flops_runs_each_method_and_reports_only_matching_files(tmp_path):
    planned = study(tmp_path, "--plan", "--reference_steps=40", f"--only={METHODS}")
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads((tmp_path / "results" / "plan.json").read_text())
    flops = plan["flops_per_step"]
    # Every method spends the budget of 40 shortcut steps (to a step's rounding).
    assert plan["budget_flops"] == pytest.approx(40 * flops["shortcut"])
    live = plan["runs"]["live_reflow"]["steps"] * flops["live_reflow"]
    assert abs(live - plan["budget_flops"]) <= flops["live_reflow"]
    assert flops["live_reflow"] > flops["shortcut"]  # its own flow behind every reflow target
    distil = plan["runs"]["progressive_distillation"]
    spent = (
        distil["teacher_steps"] * flops["flow_matching"]
        + distil["steps"] * flops["progressive_distillation"]
    )
    assert abs(spent - plan["budget_flops"]) <= 2 * flops["progressive_distillation"]

    ran = study(tmp_path, f"--only={METHODS}")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "live_reflow_seed0.json").read_text())
    assert result["plan_digest"] == plan["digest"]
    assert result["commands"][0][:3] == ["python", "-m", "shortcut_jax.main"]
    assert "--workdir=$WORK/live_reflow_seed0" in result["commands"][0]
    assert sorted(result["scores"]["sw2"], key=int) == ["1", "2", "4", "8", "128"]
    distilled = json.loads(
        (tmp_path / "results" / "progressive_distillation_seed0.json").read_text()
    )
    assert [c[4].split("=")[1] for c in distilled["commands"]] == [
        "$WORK/teacher_seed0",
        "$WORK/progressive_distillation_seed0",
    ]

    again = study(tmp_path, f"--only={METHODS}")
    assert again.returncode == 0 and "live_reflow seed 0: done already" in again.stdout

    report = study(tmp_path, "--report")
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"| progressive_distillation | {distil['teacher_steps']} teacher + " in report.stdout
    assert "python benchmarks/objectives_study.py --suite toy2d --plan" in report.stdout

    # A hand-edited command, or a file from another plan, is refused by name.
    path = tmp_path / "results" / "shortcut_seed0.json"
    edited = json.loads(path.read_text())
    edited["commands"][0].append("--config.ema_rate=0.99")
    path.write_text(json.dumps(edited))
    refused = study(tmp_path, "--report")
    assert refused.returncode != 0 and "shortcut_seed0.json: its commands differ" in refused.stderr
    edited["plan_digest"] = "0" * 16
    path.write_text(json.dumps(edited))
    refused = study(tmp_path, "--report")
    assert refused.returncode != 0 and "ran with plan 0000000000000000" in refused.stderr
