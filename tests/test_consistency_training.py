"""Consistency training on hand-computed cases: the parametrisation's boundary condition, the
curriculum N(k) and mu(k), targets made by the target network, the weighted loss being the L2
distance of the two consistency values, and multistep sampling."""

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax import configs, objectives, optim, sampling
from shortcut_jax.objectives import consistency_training as ct
from shortcut_jax.state import init_state


def make_settings(**overrides) -> objectives.ObjectiveConfig:
    config = configs.base_config()
    config.objective = "consistency_training"
    config.data.num_classes = 0
    config.total_steps = 1000
    settings = objectives.ObjectiveConfig.from_config(config)
    return settings.__class__(**{**settings.__dict__, **overrides})


def scaled_network(params, x, t, d, labels):
    """F = a * x + t: depends on its parameters, so student and target network differ."""
    return params * x + t[:, None]


def test_noise_levels_span_sigma_max_to_sigma_min_and_the_boundary_is_the_identity():
    settings = make_settings()
    sigma = np.asarray(ct.sigma_of(jnp.array([0.0, 1.0]), settings))
    np.testing.assert_allclose(sigma, [80.0, 0.002], rtol=1e-5)
    x = jnp.array([[0.3, -1.0]])
    f = ct.consistency_function(lambda x, t, d: 100.0 + x, x, jnp.ones(1), settings)
    np.testing.assert_allclose(f, x, rtol=1e-6)  # c_skip(sigma_min) = 1, c_out(sigma_min) = 0


def test_curriculum_grows_from_s0_to_s1_plus_one_scales():
    settings = make_settings(total_steps=1000, consistency_s0=2, consistency_s1=150)
    np.testing.assert_array_equal(ct.num_scales(jnp.array(0), settings), 2)
    np.testing.assert_array_equal(ct.num_scales(jnp.array(1000), settings), 151)
    # k = K / 2: ceil(sqrt(0.5 * (151^2 - 4) + 4) - 1) + 1 = ceil(106.78 - 1) + 1 = 107.
    np.testing.assert_array_equal(ct.num_scales(jnp.array(500), settings), 107)
    np.testing.assert_allclose(ct.target_ema_rate(jnp.array(0), settings), 0.9, rtol=1e-6)
    np.testing.assert_allclose(
        ct.target_ema_rate(jnp.array(1000), settings), np.exp(2 * np.log(0.9) / 151), rtol=1e-6
    )


def test_targets_use_the_target_network_and_the_loss_is_the_l2_of_the_two_f_values():
    settings = make_settings()
    batch = {"image": jax.random.normal(jax.random.PRNGKey(0), (16, 2)), "label": jnp.zeros(16)}
    rng = jax.random.PRNGKey(1)
    step = jnp.array(600)
    student, target_params = 0.3, 0.9
    regression, metrics = objectives.get("consistency_training").build_targets(
        scaled_network, target_params, batch, rng, settings, step
    )
    # By hand: the same z at two adjacent Karras levels, the target from the target network.
    z = jax.random.normal(jax.random.split(rng, 3)[0], (16, 2))
    scales = int(ct.num_scales(step, settings))
    assert float(metrics["consistency_scales"]) == scales
    t_student = np.asarray(regression.t)
    t_target = t_student + 1.0 / (scales - 1)
    assert np.all(t_target <= 1.0 + 1e-6) and np.all(t_student >= -1e-6)
    x = np.asarray(batch["image"])
    x_target = x + np.asarray(ct.sigma_of(t_target, settings))[:, None] * z
    x_student = x + np.asarray(ct.sigma_of(t_student, settings))[:, None] * z

    def f(params, x, t):
        return ct.consistency_function(
            lambda x, t, d: scaled_network(params, x, t, d, None), x, jnp.asarray(t), settings
        )

    f_target = f(target_params, x_target, t_target)
    prediction = scaled_network(student, regression.x_t, regression.t, regression.d, None)
    weighted = regression.weight * jnp.mean((prediction - regression.target) ** 2, axis=1)
    direct = jnp.mean((f(student, x_student, t_student) - f_target) ** 2, axis=1)
    np.testing.assert_allclose(weighted, direct, rtol=2e-3, atol=1e-6)
    # A different target network gives different targets; the student's parameters do not enter.
    other, _ = objectives.get("consistency_training").build_targets(
        scaled_network, 0.5, batch, rng, settings, step
    )
    assert not np.allclose(other.target, regression.target)


def test_the_train_state_keeps_an_ema_target_network_whatever_bootstrap_teacher_says():
    config = configs.base_config()
    config.objective = "consistency_training"
    config.bootstrap_teacher = "params"
    config.model.name = "mlp"
    config.data.name = "toy2d"
    config.data.num_classes = 0
    config.model.hidden_size = 8
    config.model.depth = 1
    from shortcut_jax import models

    objective = objectives.get("consistency_training")
    assert objectives.uses_ema_teacher(objective, "params")
    assert objective.teacher_ema_rate is ct.target_ema_rate
    state = jax.eval_shape(
        lambda: init_state(config, models.get_model(config), optim.make_optimizer(config))
    )
    assert state.teacher_params is not None


def test_one_step_sample_is_f_at_sigma_max_and_steps_renoise():
    settings = make_settings()
    noise = jax.random.normal(jax.random.PRNGKey(2), (3, 2))
    labels = jnp.zeros(3, jnp.int32)
    kwargs = dict(denoise_timesteps=8, objective=settings)
    one = sampling.sample(scaled_network, 0.5, noise, labels, num_steps=1, **kwargs)

    def network(x, t, d):
        return scaled_network(0.5, x, t, d, None)

    expected = ct.consistency_function(network, 80.0 * noise, jnp.zeros(3), settings)
    np.testing.assert_allclose(one, expected, rtol=1e-5)
    two = sampling.sample(scaled_network, 0.5, noise, labels, num_steps=2, **kwargs)
    fresh = sampling.step_noise(noise, jnp.int32(0))
    sigma_half = ct.sigma_of(jnp.full((3,), 0.5), settings)
    renoised = expected + jnp.sqrt(sigma_half**2 - 0.002**2)[:, None] * fresh
    second = ct.consistency_function(network, renoised, jnp.full((3,), 0.5), settings)
    np.testing.assert_allclose(two, second, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------ improved consistency training (iCT)
def ict_settings(**overrides) -> objectives.ObjectiveConfig:
    return make_settings(
        name="improved_consistency_training",
        consistency_s0=10,
        consistency_s1=1280,
        total_steps=800,
        **overrides,
    )


def test_ict_curriculum_doubles_from_s0_to_s1():
    settings = ict_settings()
    # K' = floor(800 / (log2(128) + 1)) = 100: N = 11, 21, 41, ..., 1281 from step 700 on.
    counts = [int(ct.improved_num_scales(jnp.array(k), settings)) for k in (0, 99, 100, 650, 799)]
    assert counts == [11, 11, 21, 641, 1281]


def test_ict_noise_levels_follow_the_lognormal_schedule():
    settings = ict_settings()
    scales = jnp.array(41)
    logits = ct.lognormal_index_logits(scales, 1281, settings)
    assert np.all(np.isneginf(np.asarray(logits[40:])))  # only n = 1 ... N - 1 = 40
    sigma = np.sort(np.asarray(ct.sigma_of(np.linspace(1.0, 0.0, 41), settings)))
    from scipy.special import erf

    cdf = erf((np.log(sigma) + 1.1) / (np.sqrt(2.0) * 2.0))
    expected = np.diff(cdf) / np.sum(np.diff(cdf))
    probs = np.exp(np.asarray(logits[:40]))
    np.testing.assert_allclose(probs / probs.sum(), expected, rtol=1e-4)


def test_ict_loss_is_the_weighted_pseudo_huber_of_the_two_f_values():
    settings = ict_settings()
    batch = {"image": jax.random.normal(jax.random.PRNGKey(0), (16, 2)), "label": jnp.zeros(16)}
    rng, step = jax.random.PRNGKey(1), jnp.array(300)
    objective = objectives.get("improved_consistency_training")
    assert objective.loss == "pseudo_huber" and objective.target_network
    assert float(objective.teacher_ema_rate(step, settings)) == 0.0  # no EMA: a copy each step
    student, target_params = 0.3, 0.9
    regression, _ = objective.build_targets(
        scaled_network, target_params, batch, rng, settings, step
    )
    t_student = np.asarray(regression.t)
    scales = int(ct.improved_num_scales(step, settings))
    t_target = t_student + 1.0 / (scales - 1)
    z = jax.random.normal(jax.random.split(rng, 3)[0], (16, 2))
    x = np.asarray(batch["image"])
    sigma_s = np.asarray(ct.sigma_of(t_student, settings))
    sigma_t = np.asarray(ct.sigma_of(t_target, settings))

    def f(params, x, t):
        return ct.consistency_function(
            lambda x, t, d: scaled_network(params, x, t, d, None), x, jnp.asarray(t), settings
        )

    difference = f(student, x + sigma_s[:, None] * z, t_student) - f(
        target_params, x + sigma_t[:, None] * z, t_target
    )
    c = 0.00054 * np.sqrt(2)
    direct = (np.sqrt(np.sum(difference**2, axis=1) + c**2) - c) / (sigma_s - sigma_t)
    prediction = scaled_network(student, regression.x_t, regression.t, regression.d, None)
    mean_square = np.square(regression.error_scale) * np.mean(
        (prediction - regression.target) ** 2, axis=1
    )
    from shortcut_jax import steps

    loss = regression.weight * steps.per_example_loss(mean_square, 2, "pseudo_huber", c)
    np.testing.assert_allclose(loss, direct, rtol=5e-3, atol=1e-6)
