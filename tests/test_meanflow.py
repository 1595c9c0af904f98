"""MeanFlow targets on hand-computed cases: r = t gives v, the jvp is the total derivative, the
exact average velocity of a known flow is a fixed point, and the time and loss-weight rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax import configs, objectives
from shortcut_jax.objectives import meanflow


def make_settings(**overrides) -> objectives.ObjectiveConfig:
    config = configs.base_config()
    config.objective = "meanflow"
    config.data.num_classes = 0
    settings = objectives.ObjectiveConfig.from_config(config)
    return settings.__class__(**{**settings.__dict__, **overrides})


def smooth_network(params, x, t, d, labels):
    """A nonlinear function of every input, so the jvp has all three parts."""
    del labels
    column = (slice(None),) + (None,) * (x.ndim - 1)
    return jnp.tanh(params * x + t[column]) * (1.0 + d[column] ** 2) + jnp.sin(3.0 * d)[column]


def test_target_is_the_conditional_velocity_when_r_equals_t():
    rng = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(rng[0], (6, 3))
    velocity = jax.random.normal(rng[1], (6, 3))
    s = jax.random.uniform(rng[2], (6,))
    target = meanflow.meanflow_target(
        smooth_network, 0.7, x, s, jnp.zeros(6), jnp.zeros(6, jnp.int32), velocity
    )
    np.testing.assert_array_equal(np.asarray(target), np.asarray(velocity))


def test_jvp_matches_finite_differences_along_the_path_with_the_end_point_fixed():
    rng = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(rng[0], (5, 2))
    velocity = jax.random.normal(rng[1], (5, 2))
    s = jnp.linspace(0.1, 0.5, 5)
    d = jnp.linspace(0.05, 0.4, 5)
    labels = jnp.zeros(5, jnp.int32)
    target = meanflow.meanflow_target(smooth_network, 0.7, x, s, d, labels, velocity)
    h = 1e-3

    def along(step):  # the point moves with velocity w, s by +step, d by -step (s + d fixed)
        return smooth_network(0.7, x + step * velocity, s + step, d - step, labels)

    finite_difference = (along(h) - along(-h)) / (2 * h)
    expected = velocity + d[:, None] * finite_difference
    np.testing.assert_allclose(target, expected, rtol=2e-3, atol=2e-4)


def test_exact_average_velocity_of_a_known_flow_is_a_fixed_point():
    """dx/ds = x moves x to x e^d over a step d: u = x (e^d - 1) / d, and u_tgt must equal u."""

    def average_velocity(params, x, t, d, labels):
        return x * ((jnp.exp(d) - 1.0) / d)[:, None]

    x = jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]])
    d = jnp.array([0.1, 0.5, 1.0])
    s = 1.0 - d
    target = meanflow.meanflow_target(
        average_velocity, None, x, s, d, jnp.zeros(3, jnp.int32), velocity=x
    )
    np.testing.assert_allclose(target, average_velocity(None, x, s, d, None), rtol=1e-5)


def test_times_follow_the_logit_normal_rule_with_a_fraction_of_r_equal_t():
    settings = make_settings()
    s, d = meanflow.sample_times(jax.random.PRNGKey(2), 20_000, settings)
    s, d = np.asarray(s), np.asarray(d)
    assert np.all((s > 0) & (s < 1)) and np.all(d >= 0) and np.all(s + d <= 1 + 1e-6)
    assert abs(np.mean(d > 0) - settings.meanflow_ratio_r_neq_t) < 0.02
    t_paper = 1.0 - s[d == 0]  # with r = t the paper's t is one logit-normal draw's maximum
    logits = np.log(t_paper / (1 - t_paper))
    # max of two N(-0.4, 1) draws has mean -0.4 + 1/sqrt(pi).
    assert abs(np.mean(logits) - (-0.4 + 1 / np.sqrt(np.pi))) < 0.05


def test_adaptive_weight_is_one_over_error_plus_c_to_the_p():
    settings = make_settings(meanflow_adaptive_p=1.0, meanflow_adaptive_c=1e-3)
    error = jnp.array([0.0, 1.0, 3.0])
    np.testing.assert_allclose(
        meanflow.adaptive_weight(error, settings), 1.0 / (np.asarray(error) + 1e-3), rtol=1e-6
    )
    half = make_settings(meanflow_adaptive_p=0.5)
    np.testing.assert_allclose(
        meanflow.adaptive_weight(error, half), 1.0 / np.sqrt(np.asarray(error) + 1e-3), rtol=1e-6
    )
    assert objectives.get("meanflow").loss_weighting is meanflow.adaptive_weight


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_regression_batch_interpolates_and_regresses_v_where_r_equals_t(ratio):
    settings = make_settings(meanflow_ratio_r_neq_t=ratio)
    batch = {"image": jax.random.normal(jax.random.PRNGKey(3), (64, 2)), "label": jnp.zeros(64)}
    rng = jax.random.PRNGKey(4)
    regression, metrics = objectives.get("meanflow").build_targets(
        smooth_network, 0.7, batch, rng, settings
    )
    x0 = jax.random.normal(jax.random.split(rng, 3)[0], (64, 2))
    velocity = batch["image"] - x0
    np.testing.assert_allclose(
        regression.x_t, x0 + regression.t[:, None] * velocity, rtol=1e-5, atol=1e-6
    )
    equal = np.asarray(regression.d == 0)
    assert equal.mean() == 1.0 if ratio == 0.0 else 0.3 < equal.mean() < 0.7
    np.testing.assert_allclose(regression.target[equal], velocity[equal], rtol=1e-6)
    np.testing.assert_array_equal(regression.is_bootstrap, ~equal)
    assert np.isfinite(float(metrics["meanflow_target_rms"]))


def test_target_carries_no_gradient():
    settings = make_settings(meanflow_ratio_r_neq_t=1.0)
    batch = {"image": jnp.ones((8, 2)), "label": jnp.zeros(8, jnp.int32)}

    def target_sum(params):
        regression, _ = objectives.get("meanflow").build_targets(
            smooth_network, params, batch, jax.random.PRNGKey(0), settings
        )
        return jnp.sum(regression.target)

    assert float(jax.grad(target_sum)(0.7)) == 0.0
