"""A short training on 2-D data: 1-step shortcut samples land on the data, 1-step flow does not.

Distances are sliced Wasserstein-2 distances between 2,000 samples and 2,000 fresh data points.
Two references make the thresholds readable: the floor (two independent data samples, ~0.02 on the
checkerboard) and the ceiling (every sample at the origin, ~0.57), which is where 1-step flow
matching must end up, since its one Euler step from noise lands on the mean E[x1]. Measured at
800 steps (width 128): shortcut 1-step 0.064, flow matching 1-step 0.53, both ~0.035 at 128 steps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from shortcut_jax import checkpoint, models, sampling, steps, train
from shortcut_jax.data import toy2d

REPO = Path(__file__).resolve().parents[1]


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 256) -> float:
    """SW2 distance between two equally sized point clouds (N, 2)."""
    directions = np.random.default_rng(0).normal(size=(num_projections, a.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    projected_a = np.sort(a @ directions.T, axis=0)
    projected_b = np.sort(b @ directions.T, axis=0)
    return float(np.sqrt(np.mean((projected_a - projected_b) ** 2)))


def toy_config(objective: str):
    spec = importlib.util.spec_from_file_location("toy2d_config", REPO / "experiments/toy2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.objective = objective
    config.model.hidden_size = 128  # a quarter of the default's FLOPs, the same verdicts
    config.total_steps = 800
    config.log_every_steps = 200
    config.checkpoint_every_steps = 800
    config.sample_num = 500
    return config


def trained_distances(config, workdir: Path, data: np.ndarray, step_counts) -> dict[int, float]:
    """Trains `config` in `workdir`; SW2 of its EMA samples to `data` at each step count."""
    train.train_and_evaluate(config, str(workdir))
    _, state = checkpoint.load_run(str(workdir))
    apply_fn = steps.make_apply_fn(models.get_model(config))
    distances = {}
    for num_steps in step_counts:
        samples, _ = sampling.sample_batch(
            apply_fn,
            state.ema_params,
            jax.random.PRNGKey(7),
            num=len(data),
            shape=(2,),
            num_steps=num_steps,
            denoise_timesteps=config.denoise_timesteps,
        )
        distances[num_steps] = sliced_wasserstein(np.asarray(samples), data)
    return distances


def one_and_many_step_distances(
    objective: str, workdir: Path, data: np.ndarray
) -> dict[int, float]:
    return trained_distances(toy_config(objective), workdir, data, (1, 128))


@pytest.mark.slow
def test_one_step_shortcut_samples_match_the_data_and_flow_matching_does_not(tmp_path):
    data = toy2d.sample_toy("checkerboard", 2000, np.random.default_rng(123))
    floor = sliced_wasserstein(
        toy2d.sample_toy("checkerboard", 2000, np.random.default_rng(9)), data
    )
    ceiling = sliced_wasserstein(np.zeros_like(data), data)
    assert floor < 0.05 and ceiling > 0.4

    shortcut = one_and_many_step_distances("shortcut", tmp_path / "shortcut", data)
    flow = one_and_many_step_distances("flow_matching", tmp_path / "flow", data)

    # Both learned the distribution with many steps.
    assert shortcut[128] < 0.1 and flow[128] < 0.1, (shortcut, flow)
    # One shortcut step is within a quarter of the ceiling; one flow step is near the ceiling.
    assert shortcut[1] < 0.25 * ceiling, (shortcut, ceiling)
    assert flow[1] > 0.7 * ceiling, (flow, ceiling)
    assert shortcut[1] < 0.3 * flow[1], (shortcut, flow)
