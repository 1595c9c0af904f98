"""Diffusion targets and DDIM on hand-computed cases: the DDPM forward process and its eps / v
targets, DDIM at eta = 1 on the full schedule is the DDPM posterior mean, and an exact denoiser
reaches its data point at any step count through the library's sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax import configs, objectives, sampling
from shortcut_jax.objectives import diffusion


def make_settings(**overrides) -> objectives.ObjectiveConfig:
    config = configs.base_config()
    config.objective = "diffusion"
    config.data.num_classes = 0
    config.denoise_timesteps = 16
    settings = objectives.ObjectiveConfig.from_config(config)
    return settings.__class__(**{**settings.__dict__, **overrides})


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_schedules_start_at_one_and_decrease(schedule):
    tau = jnp.linspace(0.0, 1.0, 1001)
    abar = np.asarray(diffusion.alpha_bar(tau, schedule))
    assert abar[0] == 1.0
    assert np.all(np.diff(abar) <= 0) and abar[-1] < 1e-4 and abar[-1] >= diffusion.ALPHA_BAR_MIN
    if schedule == "linear":  # DDPM's 1000 betas 1e-4 ... 0.02 give abar_1000 = 4.0e-5
        betas = np.linspace(1e-4, 0.02, 1000)
        np.testing.assert_allclose(abar[-1], np.prod(1 - betas), rtol=0.1)


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_ddim_at_eta_one_on_the_full_schedule_is_the_ddpm_posterior_mean(schedule):
    steps = 1000
    tau = np.arange(steps + 1) / steps
    abar = diffusion.alpha_bar(jnp.asarray(tau), schedule)
    abar_a, abar_b = abar[1:], abar[:-1]  # each step goes from tau_i to tau_{i-1}
    rng = jax.random.split(jax.random.PRNGKey(0), 2)
    x0 = jax.random.uniform(rng[0], (steps, 3), minval=-1, maxval=1)
    x_a = jax.random.normal(rng[1], (steps, 3))
    eps = (x_a - jnp.sqrt(abar_a)[:, None] * x0) / jnp.sqrt(1 - abar_a)[:, None]
    ddim = diffusion.ddim_update(x0, eps, abar_a, abar_b, 1.0, jnp.zeros_like(x0))
    mean = diffusion.ddpm_posterior_mean(x_a, x0, abar_a, abar_b)
    np.testing.assert_allclose(ddim, mean, rtol=1e-4, atol=1e-5)
    # Hand check of one step: abar_a = 0.5, abar_b = 0.8, x0 = 1, x_a = 0.
    alpha, beta = 0.5 / 0.8, 1 - 0.5 / 0.8
    expected = np.sqrt(0.8) * beta / 0.5 * 1.0 + np.sqrt(alpha) * 0.2 / 0.5 * 0.0
    got = diffusion.ddpm_posterior_mean(
        jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.array([0.5]), jnp.array([0.8])
    )
    np.testing.assert_allclose(got, [[expected]], rtol=1e-6)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_targets_follow_the_forward_process(prediction):
    settings = make_settings(diffusion_prediction=prediction)
    batch = {
        "image": jax.random.uniform(jax.random.PRNGKey(1), (32, 4, 4, 1)),
        "label": jnp.zeros(32),
    }
    rng = jax.random.PRNGKey(2)
    regression, _ = objectives.get("diffusion").build_targets(None, None, batch, rng, settings)
    eps = jax.random.normal(jax.random.split(rng, 3)[0], batch["image"].shape)
    abar = np.asarray(diffusion.alpha_bar(1.0 - regression.t, "cosine"))[:, None, None, None]
    x = np.asarray(batch["image"])
    np.testing.assert_allclose(
        regression.x_t, np.sqrt(abar) * x + np.sqrt(1 - abar) * eps, rtol=1e-5, atol=1e-6
    )
    expected = eps if prediction == "eps" else np.sqrt(abar) * eps - np.sqrt(1 - abar) * x
    np.testing.assert_allclose(regression.target, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(regression.d, 0.0)
    assert float(regression.t.min()) >= 0.0 and float(regression.t.max()) < 1.0


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_predictions_invert_the_forward_process(prediction):
    x0 = jnp.array([[0.3, -0.8]])
    eps = jnp.array([[1.2, 0.4]])
    abar = jnp.array([0.36])
    x = 0.6 * x0 + 0.8 * eps
    output = eps if prediction == "eps" else 0.6 * eps - 0.8 * x0
    x0_hat, eps_hat = diffusion.predictions(output, x, abar, prediction, clip_x0=0.0)
    np.testing.assert_allclose(x0_hat, x0, rtol=1e-5)
    np.testing.assert_allclose(eps_hat, eps, rtol=1e-5)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize("num_steps", [1, 3, 16])
def test_ddim_sampler_with_an_exact_denoiser_reaches_the_data_point(prediction, num_steps):
    """For data = one point x*, the exact network output puts x0_hat = x* at every step."""
    settings = make_settings(diffusion_prediction=prediction, diffusion_clip_x0=0.0)
    point = jnp.array([0.5, -0.25])

    def exact(params, x, t, d, labels):
        abar = diffusion.alpha_bar(1.0 - t, "cosine")[:, None]
        eps = (x - jnp.sqrt(abar) * point) / jnp.sqrt(1.0 - abar)
        return eps if prediction == "eps" else jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * point

    noise = jax.random.normal(jax.random.PRNGKey(3), (4, 2))
    samples = sampling.sample(
        exact,
        None,
        noise,
        jnp.zeros(4, jnp.int32),
        num_steps=num_steps,
        denoise_timesteps=16,
        objective=settings,
    )
    np.testing.assert_allclose(samples, jnp.broadcast_to(point, (4, 2)), atol=2e-4)


def test_clipping_bounds_the_predicted_data():
    x0_hat, eps_hat = diffusion.predictions(
        jnp.array([[-5.0]]), jnp.array([[0.0]]), jnp.array([0.25]), "eps", clip_x0=1.0
    )
    # Unclipped x0_hat = (0 - sqrt(0.75) * -5) / 0.5 = 8.66; clipped to 1, eps recomputed.
    np.testing.assert_allclose(x0_hat, [[1.0]])
    np.testing.assert_allclose(eps_hat, [[(0.0 - 0.5 * 1.0) / np.sqrt(0.75)]], rtol=1e-6)
