"""Each newer objective trains end to end from the training CLI on toy 2-D data, and its saved run
samples through its own sampler at 1 and 4 steps (one network evaluation per step)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from tiny import run_module

from shortcut_jax import checkpoint, models, objectives, sampling, steps

TOTAL_STEPS = 300


def dark_cell_fraction(points: np.ndarray) -> float:
    """Share of points on the 8 dark cells of the 4x4 checkerboard over [-1, 1]^2 (the data: 1)."""
    cells = np.floor((points + 1.0) / 0.5).astype(int)
    inside = np.all((cells >= 0) & (cells < 4), axis=1)
    return float(np.mean(inside & (cells.sum(axis=1) % 2 == 0)))


def logged_losses(stderr: str) -> dict[int, float]:
    return {
        int(step): float(loss)
        for step, loss in re.findall(r"\[(\d+)\][^\n]*?\bloss_flow=([-+.\deE]+)", stderr)
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective", ["meanflow", "diffusion", "live_reflow", "consistency_training"]
)
def test_objective_trains_from_the_cli_and_samples_at_one_and_four_steps(objective, tmp_path):
    workdir = tmp_path / objective
    result = run_module(
        "shortcut_jax.main",
        "--config",
        "experiments/toy2d.py",
        f"--workdir={workdir}",
        f"--config.objective={objective}",
        f"--config.total_steps={TOTAL_STEPS}",
        "--config.batch_size=128",
        "--config.model.hidden_size=64",
        "--config.model.depth=2",
        "--config.denoise_timesteps=8",
        "--config.optim.warmup_steps=20",
        "--config.log_every_steps=100",
        f"--config.checkpoint_every_steps={TOTAL_STEPS}",
        "--config.sample_steps=(1,4)",
        "--config.sample_num=16",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    if objective != "consistency_training":  # its loss_flow is 0: every example is a CT pair
        losses = logged_losses(result.stderr)
        assert sorted(losses) == list(range(100, TOTAL_STEPS + 1, 100)), result.stderr[-2000:]
        assert losses[TOTAL_STEPS] < losses[100], losses

    config, state = checkpoint.load_run(str(workdir))
    assert config.objective == objective
    apply_fn = steps.make_apply_fn(models.get_model(config))
    noise = sampling.example_noise(jax.random.PRNGKey(0), 1000, (2,))
    for num_steps in (1, 4):
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
        if objective == "diffusion" and num_steps == 1:
            # One DDIM step from pure noise with epsilon prediction divides by sqrt(abar(1)): the
            # clipped x0_hat sits on the corners (the weakness shortcut models address).
            assert np.all(np.abs(samples) <= config.diffusion.clip_x0 + 1e-6)
            continue
        # Noise has about 0.23 of its mass on the dark cells, the data 1.
        assert dark_cell_fraction(samples) > dark_cell_fraction(np.asarray(noise)) + 0.15, (
            num_steps,
            dark_cell_fraction(samples),
        )


# On images, the objectives with their own samplers; the Euler-sampled ones (meanflow, live_reflow)
# learn from the CLI above and train on image meshes in test_sharding.
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["diffusion", "consistency_training"])
def test_objective_trains_on_mnist_from_the_cli_and_samples_images(objective, tmp_path):
    workdir = tmp_path / objective
    result = run_module(
        "shortcut_jax.main",
        "--config",
        "tests/tiny.py",
        f"--workdir={workdir}",
        f"--config.objective={objective}",
        "--config.total_steps=4",
        "--config.checkpoint_every_steps=4",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    config, state = checkpoint.load_run(str(workdir))
    apply_fn = steps.make_apply_fn(models.get_model(config))
    for num_steps in (1, 3):
        images, labels = sampling.sample_batch(
            apply_fn,
            state.ema_params,
            jax.random.PRNGKey(0),
            num=4,
            shape=(28, 28, 1),
            num_steps=num_steps,
            denoise_timesteps=config.denoise_timesteps,
            cfg_scale=1.5,
            num_classes=10,
            objective=objectives.ObjectiveConfig.from_config(config),
        )
        assert images.shape == (4, 28, 28, 1) and np.all(np.isfinite(images))
        np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    if objective in ("diffusion", "consistency_training"):  # samplers other than Euler steps
        # The sample CLI samples through the run's own sampler: the same images (clipped) as above.
        out = tmp_path / "samples.npz"
        args = ["--steps=3", "--num=4", "--cfg=1.5", "--seed=0", "--batch_size=4", f"--out={out}"]
        args.append("--format=npz_float")
        result = run_module("shortcut_jax.sample", f"--workdir={workdir}", *args, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        np.testing.assert_allclose(
            np.load(out)["images"], np.clip(images, -1, 1), rtol=1e-5, atol=1e-5
        )
