"""The recipe study: equal-wall-time step conversion, guidance tuning, the report's refusal of
stale result files, and a quick run through the real training and evaluation CLIs."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import recipe_study  # noqa: E402
import study_runs  # noqa: E402


def test_a_slower_variant_gets_fewer_steps_in_the_same_wall_time():
    assert recipe_study.converted_steps(1750, 0.2, 0.4) == 875
    assert recipe_study.converted_steps(1750, 0.2, 0.1) == 3500
    assert recipe_study.converted_steps(1750, 0.2, 0.2, fraction=0.25) == 438
    assert recipe_study.converted_steps(10, 0.1, 100.0) == 1  # never zero
    with pytest.raises(ValueError, match="step times"):
        recipe_study.converted_steps(1750, 0.0, 0.2)


def test_two_phases_split_the_budget_each_at_its_own_step_cost():
    variant = recipe_study.VARIANTS["fm_first_25"]
    steps = recipe_study.plan_steps(variant, 1000, {"default": 0.3, "phase1": 0.2, "train": 0.3})
    assert steps == {"phase1": 375, "train": 750}  # 250 x 1.5 flow-matching steps, then 750
    single = recipe_study.plan_steps(
        recipe_study.VARIANTS["batch_64"], 1000, {"default": 0.3, "train": 0.6}
    )
    assert single == {"train": 500}


def test_only_configs_with_their_own_step_are_timed():
    def timed(name):
        return set(recipe_study.calibration_configs(recipe_study.VARIANTS[name], False, 0.25))

    assert timed("default") == {"default"}
    assert timed("batch_64") == {"default", "train"}
    assert timed("fm_first_50") == {"default", "phase1"}  # phase 2 trains the default's config
    assert timed("ema_0.99") == {"default"}  # the default's program: the default's steps
    assert timed("levels_coarse") == timed("loss_pseudo_huber") == {"default"}
    assert timed("teacher_ema_0.99") == {"default", "train"}  # keeps a second EMA buffer
    assert timed("boot_1_2") == timed("w96_d6") == {"default", "train"}


def test_the_queue_kinds_split_the_variants_by_what_their_budget_needs(capsys):
    kinds = {}
    for kind in ("sampling", "neutral", "timed"):
        assert recipe_study.main(["--list", "--kind", kind]) == 0
        kinds[kind] = capsys.readouterr().out.split()
    assert kinds["sampling"] == ["sample_cfg_1.5_fixed", "sample_raw_params"]
    assert {"levels_coarse", "lr_1e-3", "ema_0.99"} <= set(kinds["neutral"])
    assert {"batch_64", "boot_1_2", "fm_first_50", "cfg_in_targets"} <= set(kinds["timed"])
    everything = [name for names in kinds.values() for name in names] + ["default"]
    assert sorted(everything) == sorted(recipe_study.VARIANTS)  # each variant once


def test_a_finished_phase_is_reused_unless_its_training_would_change():
    recorded = {"total_steps": 1750, "checkpoint_every_steps": 2000, "ema_rate": 0.996}
    same = dict(recorded, checkpoint_every_steps=500, sample_num=8)
    assert recipe_study._same_training(recorded, same)
    assert not recipe_study._same_training(recorded, dict(recorded, ema_rate=0.99))
    assert not recipe_study._same_training(recorded, dict(recorded, total_steps=1751))


def test_each_step_count_gets_its_best_scale_and_one_evaluation_per_scale():
    tuning = {1.0: {1: 40.0, 2: 20.0, 128: 9.0}, 2.0: {1: 30.0, 2: 25.0, 128: 9.0}}
    scales = recipe_study.tuned_scales(tuning)
    assert scales == {1: 2.0, 2: 1.0, 128: 1.0}  # a tie goes to the smaller scale
    assert recipe_study.score_groups(scales, fid=False) == [
        (1.0, (2, 128), "fd_mnist"),
        (2.0, (1,), "fd_mnist"),
    ]
    assert recipe_study.score_groups(scales, fid=True) == [
        (1.0, (2, 128), "fd_mnist"),
        (2.0, (1,), "fd_mnist,fid"),
    ]


def test_the_local_guidance_search_finds_the_grid_minimum_of_unimodal_scores():
    grid = (1.0, 1.5, 2.0, 3.0, 4.5)
    counts = (1, 2, 4, 8, 128)
    best_scale = {1: 4.5, 2: 3.0, 4: 2.0, 8: 1.5, 128: 1.0}  # every position on the grid

    def score(scale: float, count: int) -> float:
        return 100.0 + count + (scale - best_scale[count]) ** 2

    tuning: dict[float, dict[int, float]] = {}
    rounds = []
    while requests := recipe_study.next_tuning(grid, counts, tuning):
        rounds.append(requests)
        for scale, asked in requests.items():
            assert not set(asked) & set(tuning.get(scale, {})), "a scale is tried twice"
            tuning.setdefault(scale, {}).update({c: score(scale, c) for c in asked})
    assert rounds[0] == {1.5: counts, 2.0: counts, 3.0: counts}
    assert recipe_study.tuned_scales(tuning) == best_scale
    # Counts whose best lies inside never reach the far scales: 4 stops after the first round.
    assert 4 not in tuning[1.0] and 4 not in tuning[4.5]
    assert 1 not in tuning[1.0] and 128 not in tuning[4.5]
    tried = sum(len(scores) for scores in tuning.values())
    assert tried < len(grid) * len(counts)


def test_combinations_merge_overrides_and_refuse_conflicts():
    combined = recipe_study.resolve("lr_4e-3+boot_1_2")
    assert combined.overrides == {"optim.learning_rate": 4e-3, "bootstrap_every": 2}
    with pytest.raises(ValueError, match="sets optim.learning_rate twice"):
        recipe_study.combine(["lr_4e-3", "lr_1e-3"])
    with pytest.raises(ValueError, match="not a single-phase"):
        recipe_study.combine(["lr_4e-3", "fm_first_25"])
    with pytest.raises(ValueError, match="unknown variant"):
        recipe_study.resolve("lr_5e-3")


def test_config_values_round_trip_through_the_command_line():
    assert study_runs.cli_value((2.0, 1.5)) == "(2.0,1.5)"
    assert study_runs.cli_value((1,)) == "(1,)"
    assert study_runs.cli_value(True) == "true"
    config = study_runs.load_config({"bootstrap_level_weights": [2.0] * 7, "optim.warmup_steps": 9})
    assert config.bootstrap_level_weights == (2.0,) * 7 and config.optim.warmup_steps == 9
    with pytest.raises(KeyError, match="config.optim.no_such_field"):
        study_runs.load_config({"optim.no_such_field": 1})


def _args(**changes) -> argparse.Namespace:
    args = recipe_study.parse_args(["--quick", "--workdir", "/unused"])
    vars(args).update(changes)
    return args


def _result(name: str, args: argparse.Namespace, phase: str = "screen") -> dict:
    """A result file as `run` writes it, for a run that trained exactly what the script says."""
    variant = recipe_study.resolve(name)
    fraction = recipe_study.PHASES[phase][0]
    steps = round(recipe_study.QUICK_STEPS * fraction)
    overrides = {
        **recipe_study.training_overrides(variant, True, fraction),
        "total_steps": steps,
        "seed": 0,
    }
    from shortcut_jax import resume_policy

    return {
        "variant": name,
        "seed": 0,
        "definition": variant.definition(),
        "protocol": recipe_study.protocol(phase, args, steps),
        "training_configs": {"train": resume_policy.flatten(study_runs.load_config(overrides))},
        "steps": {"train": steps},
        "calibration": {"seconds_per_step": {"default": 0.1, "train": 0.1}},
        "training": {"train": {"wall_seconds": 60.0}},
        "cfg_by_steps": {"1": 1.0, "2": 2.0},
        "scores": {"1": {"fd_mnist": 50.0}, "2": {"fd_mnist": 30.0}},
    }


def test_a_screening_run_has_the_full_runs_schedule_shape():
    default = recipe_study.training_overrides(recipe_study.VARIANTS["default"], False, 0.25)
    assert default["optim.warmup_steps"] == 50  # 200 of 7,000 steps -> 50 of 1,750
    assert default["ema_rate"] == pytest.approx(0.996)  # a horizon of 1,000 -> 250 steps
    ema = recipe_study.training_overrides(recipe_study.VARIANTS["ema_0.99"], False, 0.25)
    assert ema["ema_rate"] == pytest.approx(0.96)
    teacher = recipe_study.VARIANTS["teacher_ema_0.999"]
    scaled = recipe_study.training_overrides(teacher, False, 0.25)
    assert scaled["teacher_ema_rate"] == scaled["ema_rate"]  # still one shared EMA buffer
    assert recipe_study.training_overrides(teacher, False, 1.0)["teacher_ema_rate"] == 0.999
    assert "ema_rate" not in recipe_study.training_overrides(teacher, False, 1.0)
    assert recipe_study.scale_rate(0.5, 0.25) == 0.0


def test_the_report_refuses_results_whose_settings_differ_from_the_script(tmp_path):
    args = _args(results_dir=str(tmp_path))
    expected = recipe_study.protocol("screen", args, 10)
    good = _result("lr_4e-3", args)
    assert recipe_study.refusals(good, expected) == []

    stale_definition = copy.deepcopy(good)
    stale_definition["definition"]["overrides"]["optim.learning_rate"] = 3e-3
    stale_protocol = copy.deepcopy(good)
    stale_protocol["protocol"]["tune_num"] = 8
    stale_config = copy.deepcopy(good)
    stale_config["training_configs"]["train"]["bootstrap_every"] = 8  # the base config moved
    for stale, reason in [
        (stale_definition, "variant definition"),
        (stale_protocol, "protocol"),
        (stale_config, "bootstrap_every"),
    ]:
        assert any(reason in problem for problem in recipe_study.refusals(stale, expected))

    # Only the study's own per-run fields and fields that do not change training may differ.
    harmless = copy.deepcopy(good)
    harmless["training_configs"]["train"].update(total_steps=99, seed=3, sample_num=64)
    assert recipe_study.refusals(harmless, expected) == []

    (tmp_path / "screen").mkdir()
    (tmp_path / "screen" / "lr_4e-3_seed0.json").write_text(json.dumps(good))
    (tmp_path / "screen" / "default_seed0.json").write_text(json.dumps(_result("default", args)))
    other_seed = _result("default", args) | {"seed": 1}
    other_seed["scores"] = copy.deepcopy(other_seed["scores"])
    other_seed["scores"]["1"]["fd_mnist"] = 90.0
    (tmp_path / "screen" / "default_seed1.json").write_text(json.dumps(other_seed))
    table = recipe_study.report("screen", args)
    assert "| lr_4e-3 | optimisation | 1 | 10 | 1.00 | 50.0 | 30.0 |" in table
    assert "| default | default | 2 | 10 | 1.00 | 70.0 ± 20.0 |" in table
    assert "| +0.0 / +0.0 |" in table  # against the default of the same seed, not its mean
    (tmp_path / "screen" / "boot_1_8_seed0.json").write_text(
        json.dumps(stale_config | {"variant": "boot_1_8"})
    )
    with pytest.raises(SystemExit, match="boot_1_8_seed0.json"):
        recipe_study.report("screen", args)


@pytest.mark.slow
def test_a_new_workdir_reuses_the_step_times_kept_beside_the_results(tmp_path, monkeypatch):
    """A sitting on a new machine starts with an empty --workdir: the timed variant's step times
    come from results/<phase>/calibration/ (no quiet spell, no worker), are copied into the run's
    directory, and a request that no longer matches is measured again."""
    args = argparse.Namespace(
        quick=False, phase="screen", results_dir=str(tmp_path / "results"), require_calibrated=True
    )
    variant = recipe_study.VARIANTS["batch_16"]
    run_dir = tmp_path / "work" / "screen" / "batch_16_seed0"
    run_dir.mkdir(parents=True)
    configs = recipe_study.calibration_configs(variant, False, recipe_study.PHASES["screen"][0])
    request = {"configs": configs, "default_steps": 1750, "quick": False}
    kept = {
        "request": json.loads(json.dumps(request)),
        "seconds_per_step": {"default": 0.2, "train": 0.1},
    }
    shared = recipe_study.calibration_path(Path(args.results_dir), "screen", "batch_16")
    shared.parent.mkdir(parents=True)
    shared.write_text(json.dumps(kept))

    def no_worker(*_args, **_kwargs):
        raise AssertionError("measured again although a matching calibration was kept")

    monkeypatch.setattr(study_runs, "run_timed", no_worker)
    assert recipe_study.calibrate(variant, run_dir, args, 1750) == kept
    assert json.loads((run_dir / "calibration.json").read_text()) == kept
    (run_dir / "calibration.json").unlink()
    with pytest.raises(RuntimeError, match="--require_calibrated"):
        recipe_study.calibrate(variant, run_dir, args, 3500)  # another budget: stale


def test_step_times_are_measured_back_to_back_and_a_bigger_model_is_slower():
    small = study_runs.load_config({**recipe_study.QUICK_OVERRIDES, "total_steps": 10})
    big = study_runs.load_config(
        {
            **recipe_study.QUICK_OVERRIDES,
            "total_steps": 10,
            "model.depth": 4,
            "model.hidden_size": 128,
        }
    )
    timed = study_runs.time_configs({"small": small, "big": big}, rounds=2, burst=3)
    assert set(timed["bursts"]) == {"small", "big"} and all(
        len(v) == 2 for v in timed["bursts"].values()
    )
    seconds = timed["seconds_per_step"]
    assert 0 < seconds["small"] < seconds["big"]


@pytest.mark.slow
def test_the_quick_study_trains_tunes_scores_reports_and_skips_finished_runs(tmp_path):
    base = [sys.executable, "benchmarks/recipe_study.py", "--quick", f"--workdir={tmp_path}"]
    command = base + ["--only", "default", "sample_cfg_1.5_fixed"]
    measure = subprocess.run(
        command + ["--calibrate_only"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert measure.returncode == 0, measure.stdout[-3000:] + measure.stderr[-3000:]
    calibration = tmp_path / "screen" / "default_seed0" / "calibration.json"
    measured = calibration.read_text()
    screen_results = tmp_path / "results" / "screen"
    assert not list(screen_results.glob("*.json"))  # measured only: nothing trained or scored
    assert (screen_results / "calibration" / "default.json").read_text() == measured
    unmeasured = subprocess.run(
        base + ["--only", "boot_1_2", "--require_calibrated"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unmeasured.returncode == 1 and "--calibrate_only while nothing else" in unmeasured.stdout
    assert not (tmp_path / "screen" / "sample_cfg_1.5_fixed_seed0").exists()
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = tmp_path / "results" / "screen"
    assert (results / "sample_cfg_1.5_fixed_seed0.json").exists(), first.stdout[-3000:]
    default = json.loads((results / "default_seed0.json").read_text())
    assert default["steps"] == {"train": 10}  # a quarter of the quick budget of 40
    assert default["matmul_gflops"]["before"] > 0
    assert calibration.read_text() == measured  # the run read the quiet spell's measurement
    assert default["matmul_gflops"] == json.loads(measured)["matmul_gflops"]
    assert set(default["tuning_fd_mnist"]) == {"1.0", "2.0"}
    for count in ("1", "2"):
        best = min(default["tuning_fd_mnist"], key=lambda s: default["tuning_fd_mnist"][s][count])
        assert default["cfg_by_steps"][count] == float(best)
        assert (
            default["scores"][count]["cfg"] == float(best)
            and default["scores"][count]["fd_mnist"] > 0
        )
    assert default["training_configs"]["train"]["total_steps"] == 10
    fixed = json.loads((results / "sample_cfg_1.5_fixed_seed0.json").read_text())
    assert fixed["cfg_by_steps"] == {"1": 1.5, "2": 1.5} and fixed["tuning_fd_mnist"] == {}
    assert fixed["training"]["reused"] == "default_seed0"

    rerun = subprocess.run(
        base + ["--only", "default"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0 and "done already" in rerun.stdout
    report = subprocess.run(
        base + ["--report"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| default | default | 1 | 10 | 1 |" in report.stdout
    assert "| sample_cfg_1.5_fixed | sampling |" in report.stdout


def test_results_scored_by_other_feature_weights_are_named():
    def metrics(floor: float, digest: str | None) -> dict:
        return {"fd_mnist": {"floor": floor, "weights_digest": digest}, "fid": {"floor": 4.86}}

    shipped = "2d287acf9eaed4e0"
    assert not study_runs.network_mismatches(
        [("default", metrics(3.3517, shipped)), ("boot_1_2", metrics(3.35171, None))]
    )
    problems = study_runs.network_mismatches(
        [("default", metrics(3.3517, shipped)), ("boot_1_2", metrics(3.3182, None))]
    )
    assert len(problems) == 1 and problems[0].startswith("boot_1_2: its fd_mnist comes from")
    problems = study_runs.network_mismatches(
        [("default", metrics(3.3517, shipped)), ("batch_64", metrics(3.3517, "f" * 16))]
    )
    assert len(problems) == 1 and f"weights {'f' * 16} vs {shipped}" in problems[0]


def test_the_plots_hold_every_variant_and_the_minutes_frontier(tmp_path):
    args = _args(results_dir=str(tmp_path / "results"))
    for phase, minutes in (("screen", 1.0), ("full", 4.0)):
        (tmp_path / "results" / phase).mkdir(parents=True)
        for name, fd_1 in (("default", 50.0), ("lr_4e-3", 40.0)):
            result = _result(name, args, phase)
            result["training"]["train"]["wall_seconds"] = 60.0 * minutes
            result["scores"]["1"]["fd_mnist"] = fd_1 / minutes
            path = tmp_path / "results" / phase / f"{name}_seed0.json"
            path.write_text(json.dumps(result))
    means = recipe_study._seed_means(
        [json.loads(p.read_text()) for p in (tmp_path / "results" / "full").glob("*.json")]
    )
    assert means["lr_4e-3"]["fd"] == {1: 10.0, 2: 30.0} and means["default"]["minutes"] == 4.0
    written = recipe_study.plot(args, tmp_path / "figures")
    assert [p.name for p in written] == ["recipe_fd_vs_steps.png", "recipe_fd_vs_minutes.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_a_resumed_training_run_is_timed_over_all_its_sittings(tmp_path, monkeypatch):
    monkeypatch.setattr(study_runs, "HEARTBEAT_SECONDS", 0.1)
    log = tmp_path / "train.log"
    ledger = tmp_path / "train.log.sittings.json"
    # The first sitting sees its own heartbeat in the ledger, then is cut off (exit status 1).
    cut_off = (
        "import os, sys, time; time.sleep(0.6); "
        f"print('ledger during the run:', os.path.exists({str(ledger)!r})); sys.exit(1)"
    )
    with pytest.raises(RuntimeError, match="train.log"):
        study_runs.run_timed([sys.executable, "-c", cut_off], log, resumable=True)
    first = json.loads(ledger.read_text())
    assert first["sittings"] == 1 and first["wall_seconds"] >= 0.6
    finish = "import time; time.sleep(0.3); print('resumed')"
    timing = study_runs.run_timed([sys.executable, "-c", finish], log, resumable=True)
    assert timing["sittings"] == 2 and timing["wall_seconds"] >= first["wall_seconds"] + 0.3
    assert not ledger.exists()  # the total now lives in the caller's record
    text = log.read_text()
    assert "ledger during the run: True" in text and "resumed" in text
    assert "=== sitting 1," in text and "=== sitting 2," in text
    # A one-off command (an evaluation) is timed alone and its log rewritten.
    once = study_runs.run_timed([sys.executable, "-c", "print('once')"], log)
    assert "sittings" not in once and log.read_text().strip() == "once"
