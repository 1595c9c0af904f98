"""The reproduction study end to end on toy data at a tiny budget (3 methods: one-stage, live
reflow, and progressive distillation with its teacher), and its report's refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from tiny import REPO

METHODS = "shortcut,live_reflow,progressive_distillation"


def load_study_module():
    """benchmarks/objectives_study.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "objectives_study", REPO / "benchmarks" / "objectives_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _scored(floor: float, digest: str | None) -> dict:
    return {"scores": {"fd_mnist_floor": floor, "fd_mnist_weights": digest, "fid_floor": 4.86}}


def test_report_refuses_rows_scored_by_another_feature_network(tmp_path):
    study_module = load_study_module()
    first, second = tmp_path / "shortcut_seed0.json", tmp_path / "diffusion_seed0.json"
    same = [(first, _scored(3.3517, "a" * 16)), (second, _scored(3.3517001, "a" * 16))]
    study_module.check_same_networks(same)
    old_file = [(first, _scored(3.3517, None)), (second, _scored(3.3517001, "a" * 16))]
    study_module.check_same_networks(old_file)  # no digest recorded: the floor decides
    retrained = [(first, _scored(3.3182, None)), (second, _scored(3.3517, "a" * 16))]
    with pytest.raises(study_module.StudyError, match="diffusion_seed0.json: its fd_mnist"):
        study_module.check_same_networks(retrained)
    swapped = [(first, _scored(3.3517, "a" * 16)), (second, _scored(3.3517, "b" * 16))]
    with pytest.raises(study_module.StudyError, match="weights b+ vs a+"):
        study_module.check_same_networks(swapped)


def test_a_training_run_resumed_before_its_sittings_were_timed_is_marked(tmp_path):
    study_module = load_study_module()
    (tmp_path / "starts.json").write_text(json.dumps([{"step": 0}, {"step": 5020}]))
    assert study_module._untimed_sittings(tmp_path, {"wall_seconds": 1360.0}) == 1
    assert study_module._untimed_sittings(tmp_path, {"wall_seconds": 3300.0, "sittings": 2}) == 0
    assert study_module._untimed_sittings(tmp_path / "pairs", {"wall_seconds": 9.0}) == 0


def test_distilled_students_start_as_their_seeds_teacher(tmp_path):
    """Reflow fine-tunes the teacher (config.init_from); PD and CD copy it (teacher.workdir with
    teacher.init_student); one-stage methods start fresh."""
    module = load_study_module()
    plan = {
        "reference": {"method": "shortcut", "steps": 5},
        "runs": {
            "reflow": {"teacher_steps": 4, "pairs": {"num": 8, "steps": 2}, "steps": 3},
            "consistency_distillation": {"teacher_steps": 4, "steps": 3},
            "progressive_distillation": {"teacher_steps": 4, "steps": 2},
            "shortcut": {"steps": 5},
        },
    }

    def train_command(method):
        steps = module.run_commands(plan, "toy2d", method, 1, tmp_path)
        return next(step["command"] for step in steps if step["role"] == "train")

    teacher = tmp_path / "teacher_seed1"
    assert f"--config.init_from={teacher}" in train_command("reflow")
    distilled = train_command("consistency_distillation")
    assert f"--config.teacher.workdir={teacher}" in distilled
    assert "--config.teacher.init_student=true" in distilled
    assert not any("init_from" in arg or "teacher." in arg for arg in train_command("shortcut"))


def test_students_that_start_as_their_teacher_average_over_the_same_fraction_of_their_run(
    tmp_path,
):
    """toy2d's EMA rate 0.99 spans 100 of the reference run's 3,000 steps; a 1,000-step student
    gets a 33-step horizon (0.97), PD none (its paper), the teacher and one-stage methods the
    suite's rate."""
    module = load_study_module()
    assert module.student_ema_rate("toy2d", 3000, 1000) == pytest.approx(0.97)
    assert module.student_ema_rate("toy2d", 3000, 3000) == pytest.approx(0.99)
    assert module.student_ema_rate("toy2d", 3000, 20) == 0.0  # never negative
    plan = {
        "reference": {"method": "shortcut", "steps": 3000},
        "runs": {
            "consistency_distillation": {"teacher_steps": 1500, "steps": 1000},
            "progressive_distillation": {"teacher_steps": 1500, "steps": 1000},
            "reflow": {"teacher_steps": 1500, "pairs": {"num": 8, "steps": 2}, "steps": 1000},
            "shortcut": {"steps": 3000},
        },
    }

    def ema_flags(method):
        steps = module.run_commands(plan, "toy2d", method, 0, tmp_path)
        return {
            step["role"]: [arg for arg in step["command"] if arg.startswith("--config.ema_rate")]
            for step in steps
            if step["role"] in ("teacher", "train")
        }

    assert ema_flags("consistency_distillation") == {
        "teacher": [],
        "train": ["--config.ema_rate=0.97"],
    }
    assert ema_flags("reflow")["train"] == ["--config.ema_rate=0.97"]
    assert ema_flags("progressive_distillation")["train"] == ["--config.ema_rate=0.0"]
    assert ema_flags("shortcut") == {"train": []}
