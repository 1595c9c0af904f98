"""The train step's loss kinds (config.loss): squared error, pseudo-Huber, adaptive weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax import configs, objectives, steps


class _Identity:
    """A 'model' whose output is its first parameter, so the error is known exactly."""

    def apply(self, variables, x, t, d, labels):
        del x, t, d, labels
        return variables["params"]


def _regression(target, weight=None):
    batch = target.shape[0]
    return objectives.Regression(
        x_t=jnp.zeros_like(target),
        t=jnp.zeros((batch,)),
        d=jnp.ones((batch,)),
        labels=jnp.zeros((batch,), jnp.int32),
        target=target,
        is_bootstrap=jnp.zeros((batch,), bool),
        weight=jnp.ones((batch,)) if weight is None else weight,
    )


def _loss(config, prediction, target):
    loss_fn = steps.make_loss_fn(config, _Identity())
    return loss_fn(prediction, _regression(target))


def test_l2_is_the_weighted_mean_squared_error_and_is_the_default():
    config = configs.base_config()
    assert config.loss.kind == "auto" and config.loss.adaptive_p == 0.0
    assert objectives.loss_kind(config) == "l2"
    prediction = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    target = jnp.array([[0.0, 0.0], [3.0, 1.0]])
    loss, logged = _loss(config, prediction, target)
    np.testing.assert_allclose(logged, [2.5, 5.0])
    np.testing.assert_allclose(loss, 3.75)


def test_pseudo_huber_matches_its_formula_with_the_ict_constant():
    config = configs.base_config()
    config.loss.kind = "pseudo_huber"
    rng = np.random.default_rng(0)
    prediction = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
    loss, logged = _loss(config, prediction, target)
    c = 0.00054 * np.sqrt(16)
    squared = np.sum((np.asarray(prediction) - np.asarray(target)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, np.mean(np.sqrt(squared + c**2) - c), rtol=1e-5)
    np.testing.assert_allclose(logged, squared / 16, rtol=1e-5)  # logged: still the MSE
    config.loss.huber_c = 0.5
    loss, _ = _loss(config, prediction, target)
    np.testing.assert_allclose(loss, np.mean(np.sqrt(squared + 0.25) - 0.5), rtol=1e-5)


def test_adaptive_weighting_is_a_stop_gradient_weight():
    config = configs.base_config()
    config.loss.adaptive_p = 1.0
    config.loss.adaptive_c = 1e-3
    target = jnp.zeros((2, 3))
    prediction = jnp.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    loss_fn = steps.make_loss_fn(config, _Identity())
    loss, _ = loss_fn(prediction, _regression(target))
    mse = np.array([1.0, 4.0 / 3.0])
    np.testing.assert_allclose(loss, np.mean(mse / (mse + 1e-3)), rtol=1e-6)
    grad = jax.grad(lambda p: loss_fn(p, _regression(target))[0])(prediction)
    # d/dp of w * mse with w frozen: w * 2 (p - y) / dim / batch.
    expected = (2.0 / 3.0 / 2.0) * np.asarray(prediction) / (mse + 1e-3)[:, None]
    np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_unknown_loss_kind_is_named():
    with pytest.raises(ValueError, match="config.loss.kind = 'huber'"):
        steps.per_example_loss(jnp.ones((2,)), 4, "huber")
