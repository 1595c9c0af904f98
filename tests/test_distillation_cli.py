"""Distillation end to end from the CLIs on toy 2-D data: one flow-matching teacher run, then
progressive distillation, consistency distillation and reflow (pairs tool, then training) from it,
and shortcut started from it with init_from; every saved student samples at 1 and 4 steps through
its own sampler onto the checkerboard."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from test_objectives_cli import dark_cell_fraction
from tiny import run_module

from shortcut_jax import checkpoint, models, objectives, sampling, steps
from shortcut_jax.data import pairs

TEACHER_STEPS = 200
STUDENT_STEPS = 100


def train_args(workdir, objective: str, total_steps: int, *extra: str) -> list[str]:
    return [
        "--config",
        "experiments/toy2d.py",
        f"--workdir={workdir}",
        f"--config.objective={objective}",
        f"--config.total_steps={total_steps}",
        "--config.batch_size=128",
        "--config.model.hidden_size=64",
        "--config.model.depth=2",
        "--config.denoise_timesteps=8",
        "--config.optim.warmup_steps=20",
        "--config.log_every_steps=50",
        f"--config.checkpoint_every_steps={total_steps}",
        "--config.sample_steps=(1,4)",
        "--config.sample_num=16",
        *extra,
    ]


def logged(stderr: str, name: str) -> dict[int, float]:
    pattern = rf"\[(\d+)\][^\n]*?\b{name}=([-+.\deE]+)"
    return {int(step): float(value) for step, value in re.findall(pattern, stderr)}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("distill") / "teacher"
    result = run_module(
        "shortcut_jax.main", *train_args(workdir, "flow_matching", TEACHER_STEPS), timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return str(workdir)


def samples_at(workdir: str, num_steps: int) -> np.ndarray:
    config, state = checkpoint.load_run(workdir)
    apply_fn = steps.make_apply_fn(models.get_model(config))
    samples, _ = sampling.sample_batch(
        apply_fn,
        state.ema_params,
        jax.random.PRNGKey(0),
        num=1000,
        shape=(2,),
        num_steps=num_steps,
        denoise_timesteps=config.denoise_timesteps,
        objective=objectives.ObjectiveConfig.from_config(config),
    )
    assert np.all(np.isfinite(samples))
    return samples


def assert_samples_on_the_checkerboard(workdir: str, steps: tuple[int, ...] = (1, 4)) -> None:
    noise = np.asarray(sampling.example_noise(jax.random.PRNGKey(0), 1000, (2,)))
    for num_steps in steps:
        fraction = dark_cell_fraction(samples_at(workdir, num_steps))
        # Noise has about 0.23 of its mass on the dark cells, the data 1.
        assert fraction > dark_cell_fraction(noise) + 0.15, (workdir, num_steps, fraction)


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, extra",
    [
        (
            "progressive_distillation",
            (
                "--config.teacher.stage_steps=(4,2,1)",
                "--config.teacher.steps_per_stage=25",
                "--config.log_every_steps=25",
            ),
        ),
        ("consistency_distillation", ()),
    ],
)
def test_distillation_trains_from_the_cli_and_samples(teacher_run, tmp_path, objective, extra):
    workdir = tmp_path / objective
    args = train_args(workdir, objective, STUDENT_STEPS, f"--config.teacher.workdir={teacher_run}")
    result = run_module("shortcut_jax.main", *args, *extra, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((workdir / "teacher.json").read_text())
    assert record["workdir"] == teacher_run and record["step"] == TEACHER_STEPS
    losses = logged(result.stderr, "loss")
    every = 25 if objective == "progressive_distillation" else 50
    assert sorted(losses) == list(range(every, STUDENT_STEPS + 1, every)), result.stderr[-2000:]
    if objective == "progressive_distillation":  # 4 steps, then 2, then 1 from step 51 on
        stages = logged(result.stderr, "distill_student_steps")
        assert stages == {25: 4.0, 50: 2.0, 75: 1.0, 100: 1.0}, stages
    assert_samples_on_the_checkerboard(str(workdir))


@pytest.mark.slow
def test_reflow_pairs_then_reflow_training_from_the_cli(teacher_run, tmp_path):
    out = tmp_path / "pairs"
    result = run_module(
        "shortcut_jax.tools.reflow_pairs",
        f"--workdir={teacher_run}",
        f"--out={out}",
        "--num=2048",
        "--steps=8",
        "--shard_size=1024",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2048 pairs in 2 shards" in result.stdout
    metadata = json.loads((out / "pairs.json").read_text())
    assert metadata["teacher"]["step"] == TEACHER_STEPS and metadata["steps"] == 8

    workdir = tmp_path / "reflow"
    args = train_args(workdir, "reflow", STUDENT_STEPS, f"--config.data.pairs_dir={out}")
    result = run_module("shortcut_jax.main", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = logged(result.stderr, "loss")
    assert losses[STUDENT_STEPS] < losses[50], losses
    assert_samples_on_the_checkerboard(str(workdir), steps=(4,))
    # The point of reflow: one step from a pair's noise lands nearer the teacher's ODE end point
    # than one step of the teacher itself does.
    _, stored = pairs.load_pairs(str(out))
    noise, end = stored["noise"][:1000], stored["sample"][:1000]
    errors = {}
    for name, run in (("reflow", str(workdir)), ("teacher", teacher_run)):
        config, state = checkpoint.load_run(run)
        one_step = sampling.sample(
            steps.make_apply_fn(models.get_model(config)),
            state.ema_params,
            noise,
            np.zeros(len(noise), np.int32),
            num_steps=1,
            denoise_timesteps=config.denoise_timesteps,
        )
        errors[name] = float(np.mean(np.sum((np.asarray(one_step) - end) ** 2, axis=1)))
    assert errors["reflow"] < 0.8 * errors["teacher"], errors


@pytest.mark.slow
def test_shortcut_starts_from_a_flow_matching_run_with_init_from(teacher_run, tmp_path):
    workdir = tmp_path / "shortcut"
    args = train_args(workdir, "shortcut", 50, f"--config.init_from={teacher_run}")
    args.append("--config.log_every_steps=10")
    result = run_module("shortcut_jax.main", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    # A fresh model's flow loss starts near 2 (the variance of x1 - x0); the pretrained one is
    # already at the teacher's level.
    assert logged(result.stderr, "loss_flow")[10] < 1.2, result.stderr[-2000:]
    noise = np.asarray(sampling.example_noise(jax.random.PRNGKey(0), 1000, (2,)))
    fraction = dark_cell_fraction(samples_at(str(workdir), 8))
    assert fraction > dark_cell_fraction(noise) + 0.15, fraction
