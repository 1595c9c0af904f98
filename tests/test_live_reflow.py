"""Live reflow on hand-computed cases: the reflow part regresses the straight line from its noise
to the end point of the model's own Euler flow at d = 1; the rest is flow matching."""

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax import configs, objectives
from shortcut_jax.objectives import live_reflow


def make_settings(**overrides) -> objectives.ObjectiveConfig:
    config = configs.base_config()
    config.objective = "live_reflow"
    config.data.num_classes = 0
    config.denoise_timesteps = 8
    config.bootstrap_every = 4
    config.target_clip = 0.0
    settings = objectives.ObjectiveConfig.from_config(config)
    return settings.__class__(**{**settings.__dict__, **overrides})


def linear_teacher(params, x, t, d, labels):
    """v = a x + d: the flow it integrates is queried at the smallest step size."""
    return params * x + d[:, None]


def test_own_flow_is_integrated_with_euler_steps_at_the_smallest_step_size():
    settings = make_settings(live_reflow_steps=4)
    x0 = jnp.array([[1.0, -2.0]])
    end = live_reflow.integrate_own_flow(linear_teacher, 0.5, x0, jnp.zeros(1), settings)
    x = np.asarray(x0)
    for _ in range(4):
        x = x + 0.25 * (0.5 * x + 1 / 8)
    np.testing.assert_allclose(end, x, rtol=1e-6)


def test_reflow_part_regresses_the_straight_line_at_d_one_and_the_rest_is_flow_matching():
    settings = make_settings()
    batch = {"image": jax.random.normal(jax.random.PRNGKey(0), (16, 2)), "label": jnp.zeros(16)}
    rng = jax.random.PRNGKey(1)
    regression, metrics = objectives.get("live_reflow").build_targets(
        linear_teacher, 0.5, batch, rng, settings
    )
    x0 = jax.random.normal(jax.random.split(rng, 4)[0], (16, 2))
    reflow, flow = slice(0, 4), slice(4, None)
    end = live_reflow.integrate_own_flow(linear_teacher, 0.5, x0[reflow], jnp.zeros(4), settings)
    np.testing.assert_allclose(regression.target[reflow], end - x0[reflow], rtol=1e-5)
    t = regression.t[reflow, None]
    np.testing.assert_allclose(
        regression.x_t[reflow], (1 - t) * x0[reflow] + t * end, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(regression.d[reflow], 1.0)
    np.testing.assert_array_equal(regression.d[flow], 1 / 8)
    np.testing.assert_allclose(regression.target[flow], (batch["image"] - x0)[flow], rtol=1e-6)
    np.testing.assert_array_equal(regression.is_bootstrap, np.arange(16) < 4)
    assert np.isfinite(float(metrics["reflow_target_rms"]))


def test_reflow_targets_carry_no_gradient_to_the_teacher():
    settings = make_settings()
    batch = {"image": jnp.ones((8, 2)), "label": jnp.zeros(8, jnp.int32)}

    def target_sum(params):
        regression, _ = objectives.get("live_reflow").build_targets(
            linear_teacher, params, batch, jax.random.PRNGKey(0), settings
        )
        return jnp.sum(regression.target[:2])

    assert float(jax.grad(target_sum)(0.5)) == 0.0
