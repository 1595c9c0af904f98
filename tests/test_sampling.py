"""Tests for the step schedule, the pure sampler, CFG mixing and the image-grid helpers."""

from __future__ import annotations

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from shortcut_jax import images as images_lib
from shortcut_jax import sampling

DENOISE_TIMESTEPS = 128


def _broadcast(values: jax.Array, x: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return values.reshape(values.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


# --- step_schedule --------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", range(1, DENOISE_TIMESTEPS + 1))
def test_schedule_is_power_of_two_steps_that_sum_to_one(num_steps):
    t_start, step_size, d_level = sampling.step_schedule(num_steps, DENOISE_TIMESTEPS)
    assert t_start.shape == step_size.shape == d_level.shape == (num_steps,)
    assert t_start.dtype == np.float32 and step_size.dtype == np.float32
    assert d_level.dtype == np.int32
    assert np.all((d_level >= 0) & (d_level <= 7))
    np.testing.assert_array_equal(step_size, np.exp2(-d_level.astype(np.float32)))
    sizes = [Fraction(1, 2 ** int(level)) for level in d_level]
    assert sum(sizes) == 1
    assert float(np.sum(step_size, dtype=np.float32)) == 1.0
    running = np.concatenate([[0.0], np.cumsum(step_size.astype(np.float64))[:-1]])
    np.testing.assert_array_equal(t_start, running.astype(np.float32))
    assert np.all(np.diff(step_size) <= 0), "larger steps come first"
    if num_steps & (num_steps - 1) == 0:
        np.testing.assert_array_equal(step_size, np.full(num_steps, 1.0 / num_steps, np.float32))
        np.testing.assert_array_equal(d_level, np.full(num_steps, np.log2(num_steps), np.int32))
        np.testing.assert_array_equal(t_start, np.arange(num_steps, dtype=np.float32) / num_steps)


def test_schedule_examples_split_the_largest_step():
    t_start, step_size, d_level = sampling.step_schedule(3, DENOISE_TIMESTEPS)
    np.testing.assert_array_equal(step_size, [0.5, 0.25, 0.25])
    np.testing.assert_array_equal(d_level, [1, 2, 2])
    np.testing.assert_array_equal(t_start, [0.0, 0.5, 0.75])
    _, step_size, _ = sampling.step_schedule(5, DENOISE_TIMESTEPS)
    np.testing.assert_array_equal(step_size, [0.25, 0.25, 0.25, 0.125, 0.125])
    _, step_size, d_level = sampling.step_schedule(1, DENOISE_TIMESTEPS)
    np.testing.assert_array_equal(step_size, [1.0])
    np.testing.assert_array_equal(d_level, [0])


@pytest.mark.parametrize("num_steps", [0, -1, 129, 256, 2.0, True])
def test_schedule_rejects_counts_outside_range(num_steps):
    with pytest.raises(ValueError, match=r"num_steps.*\[1, denoise_timesteps=128\]"):
        sampling.step_schedule(num_steps, DENOISE_TIMESTEPS)


@pytest.mark.parametrize("denoise_timesteps", [0, 3, 100, -4])
def test_schedule_rejects_non_power_of_two_denoise_timesteps(denoise_timesteps):
    with pytest.raises(ValueError, match="denoise_timesteps must be a power of two"):
        sampling.step_schedule(1, denoise_timesteps)


def test_make_sampler_validates_before_compiling():
    with pytest.raises(ValueError, match="num_steps"):
        sampling.make_sampler(lambda p, x, t, d, y: x, num_steps=200, denoise_timesteps=128)


# --- sample: analytic velocities --------------------------------------------------------------


def _constant_velocity(params, x, t, d, labels):
    return jnp.broadcast_to(params["c"], x.shape).astype(x.dtype)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 128])
def test_constant_velocity_moves_noise_by_exactly_c(num_steps):
    noise = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    labels = jnp.zeros((3,), jnp.int32)
    params = {"c": jnp.float32(0.75)}
    x1 = sampling.sample(
        _constant_velocity,
        params,
        noise,
        labels,
        num_steps=num_steps,
        denoise_timesteps=DENOISE_TIMESTEPS,
    )
    np.testing.assert_allclose(x1, noise + 0.75, rtol=0, atol=1e-6)


def _linear_velocity(params, x, t, d, labels):
    """v = x + t + 10 level (level = -log2 d): Euler results depend on every t and d."""
    return x + _broadcast(t, x) + 10.0 * _broadcast(-jnp.log2(d), x)


@pytest.mark.parametrize(
    ("num_steps", "expected"),
    [
        # x1 = x0 + 1 * (x0 + 0 + 0) = 2 x0
        (1, lambda x0: 2.0 * x0),
        # x = x0 + 0.5 (x0 + 0 + 10) = 1.5 x0 + 5; x1 = x + 0.5 (x + 0.5 + 10)
        (2, lambda x0: 1.5 * (1.5 * x0 + 5.0) + 5.25),
        # d = 1/2, 1/4, 1/4 at t = 0, 1/2, 3/4 and levels 1, 2, 2
        (
            3,
            lambda x0: (
                lambda a: (lambda b: b + 0.25 * (b + 0.75 + 20.0))(a + 0.25 * (a + 0.5 + 20.0))
            )(x0 + 0.5 * (x0 + 0.0 + 10.0)),
        ),
    ],
)
def test_euler_steps_match_hand_computation(num_steps, expected):
    noise = jnp.array([[0.0, 1.0], [-2.0, 0.5]], jnp.float32)
    labels = jnp.zeros((2,), jnp.int32)
    x1 = sampling.sample(
        _linear_velocity,
        {},
        noise,
        labels,
        num_steps=num_steps,
        denoise_timesteps=DENOISE_TIMESTEPS,
    )
    np.testing.assert_allclose(x1, expected(np.asarray(noise)), rtol=1e-6, atol=1e-6)


def test_one_and_two_step_results_differ_as_computed():
    noise = jnp.ones((1, 2), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32)
    kwargs = {"denoise_timesteps": DENOISE_TIMESTEPS}
    one = sampling.sample(_linear_velocity, {}, noise, labels, num_steps=1, **kwargs)
    two = sampling.sample(_linear_velocity, {}, noise, labels, num_steps=2, **kwargs)
    np.testing.assert_allclose(one, 2.0)
    np.testing.assert_allclose(two, 1.5 * 6.5 + 5.25)


def test_sample_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels must have shape"):
        sampling.sample(
            _linear_velocity,
            {},
            jnp.zeros((2, 3)),
            jnp.zeros((3,), jnp.int32),
            num_steps=1,
            denoise_timesteps=DENOISE_TIMESTEPS,
        )


# --- sample: classifier-free guidance -------------------------------------------------------


def _label_velocity(params, x, t, d, labels):
    """v = label + 1 per example: the null class (label 3) gives 4."""
    return jnp.broadcast_to(_broadcast(labels + 1, x), x.shape)


def test_cfg_mixes_conditional_and_null_velocities():
    num_classes, cfg_scale = 3, 2.5
    noise = jnp.zeros((3, 2), jnp.float32)
    labels = jnp.array([0, 1, 2], jnp.int32)
    x1 = sampling.sample(
        _label_velocity,
        {},
        noise,
        labels,
        num_steps=4,
        denoise_timesteps=DENOISE_TIMESTEPS,
        cfg_scale=cfg_scale,
        num_classes=num_classes,
    )
    v_cond = np.array([1.0, 2.0, 3.0])[:, None]
    v_null = 4.0
    np.testing.assert_allclose(x1, np.broadcast_to(v_null + cfg_scale * (v_cond - v_null), (3, 2)))


def _recording_velocity(calls):
    def apply_fn(params, x, t, d, labels):
        calls.append((x.shape[0], np.asarray(labels).tolist()))
        return _label_velocity(params, x, t, d, labels)

    return apply_fn


@pytest.mark.parametrize(
    ("cfg_scale", "num_classes", "batches"),
    [(1.0, 3, [2]), (2.0, 0, [2]), (2.0, 3, [4])],
)
def test_cfg_uses_one_model_call_per_step(cfg_scale, num_classes, batches):
    calls = []
    labels = jnp.array([0, 1], jnp.int32) if num_classes else jnp.zeros((2,), jnp.int32)
    with jax.disable_jit():
        sampling.sample(
            _recording_velocity(calls),
            {},
            jnp.zeros((2, 5), jnp.float32),
            labels,
            num_steps=3,
            denoise_timesteps=DENOISE_TIMESTEPS,
            cfg_scale=cfg_scale,
            num_classes=num_classes,
        )
    assert [batch for batch, _ in calls] == batches * 3
    if batches == [4]:
        assert calls[0][1] == [0, 1, 3, 3]  # conditional half, then the null class


# --- make_sampler, sample_batch ---------------------------------------------------------------


class _TinyModel(nn.Module):
    """A flax module with the model signature: a dense layer over x, t, d and labels."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, t, d, labels, train: bool = False):
        flat = x.reshape(x.shape[0], -1)
        cond = jnp.stack([t, d], axis=-1)
        label_embedding = nn.Embed(self.num_classes + 1, 4)(labels)
        hidden = jnp.concatenate([flat, cond, label_embedding], axis=-1)
        return nn.Dense(flat.shape[-1])(jnp.tanh(hidden)).reshape(x.shape)


@pytest.fixture(scope="module")
def tiny_model():
    model = _TinyModel()
    x = jnp.zeros((1, 4, 4, 1))
    params = model.init(
        jax.random.key(0),
        x,
        jnp.zeros((1,)),
        jnp.ones((1,)),
        jnp.zeros((1,), jnp.int32),
    )
    return model, params


def test_make_sampler_matches_sample_and_reuses_compilation(tiny_model):
    model, params = tiny_model
    kwargs = {"num_steps": 3, "denoise_timesteps": 8, "cfg_scale": 1.5, "num_classes": 3}
    noise = jax.random.normal(jax.random.key(1), (4, 4, 4, 1))
    labels = jnp.array([0, 1, 2, 3], jnp.int32)
    sampler = sampling.make_sampler(model.apply, **kwargs)
    expected = sampling.sample(model.apply, params, noise, labels, **kwargs)
    np.testing.assert_allclose(sampler(params, noise, labels), expected, rtol=1e-5, atol=1e-5)
    before = sampling._jitted_sample._cache_size()
    sampling.make_sampler(model.apply, **kwargs)(params, noise, labels)
    assert sampling._jitted_sample._cache_size() == before


class _UnhashableApply:
    """A callable with __eq__ and no __hash__, like a bound method of an unhashable module."""

    __hash__ = None

    def __eq__(self, other):
        return self is other

    def __call__(self, params, x, t, d, labels):
        return _linear_velocity(params, x, t, d, labels)


def test_make_sampler_accepts_unhashable_apply_fn():
    noise = jnp.ones((1, 2), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32)
    sampler = sampling.make_sampler(_UnhashableApply(), num_steps=2, denoise_timesteps=8)
    np.testing.assert_allclose(sampler({}, noise, labels), 1.5 * 6.5 + 5.25)


def test_sample_batch_is_deterministic_per_rng(tiny_model):
    model, params = tiny_model
    kwargs = {"num": 5, "shape": (4, 4, 1), "num_steps": 2, "denoise_timesteps": 8}
    kwargs |= {"num_classes": 3, "cfg_scale": 2.0}
    first, labels = sampling.sample_batch(model.apply, params, jax.random.key(7), **kwargs)
    again, _ = sampling.sample_batch(model.apply, params, jax.random.key(7), **kwargs)
    other, _ = sampling.sample_batch(model.apply, params, jax.random.key(8), **kwargs)
    assert first.shape == (5, 4, 4, 1) and first.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_sample_batch_does_not_depend_on_chunk_size():
    kwargs = {"num": 7, "shape": (3,), "num_steps": 5, "denoise_timesteps": 8}
    params = {}
    rng = jax.random.key(3)
    whole, _ = sampling.sample_batch(_linear_velocity, params, rng, **kwargs)
    for batch_size in (1, 3, 4, 7, 100):
        chunked, _ = sampling.sample_batch(
            _linear_velocity, params, rng, batch_size=batch_size, **kwargs
        )
        np.testing.assert_array_equal(chunked, whole)


def test_sample_batch_labels_given_or_unconditional():
    kwargs = {"num": 4, "shape": (2,), "num_steps": 1, "denoise_timesteps": 8}
    rng = jax.random.key(0)
    _, labels = sampling.sample_batch(_label_velocity, {}, rng, **kwargs)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0])
    given = np.array([2, 2, 1, 0])
    images, labels = sampling.sample_batch(
        _label_velocity, {}, rng, labels=given, num_classes=3, **kwargs
    )
    np.testing.assert_array_equal(labels, given)
    noise = np.asarray(sampling.example_noise(rng, 4, (2,)))
    np.testing.assert_allclose(images, noise + (given + 1)[:, None], atol=1e-6)
    with pytest.raises(ValueError, match="labels must have shape"):
        sampling.sample_batch(_label_velocity, {}, rng, labels=given[:3], **kwargs)


# --- images ---------------------------------------------------------------------------------


def test_to_uint8_maps_range_and_clips():
    values = np.array([[-2.0, -1.0, 0.0, 1.0, 3.0, np.nan]], np.float32)[..., None]
    out = images_lib.to_uint8(values)
    assert out.dtype == np.uint8 and out.shape == values.shape
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 128, 255, 255, 128])


@pytest.mark.parametrize(
    ("num", "ncols", "padding", "expected"),
    [
        (64, None, 2, (8 * 30 + 2, 8 * 30 + 2, 1)),
        (10, 4, 2, (3 * 30 + 2, 4 * 30 + 2, 1)),
        (3, 8, 0, (28, 3 * 28, 1)),
        (5, None, 1, (2 * 29 + 1, 3 * 29 + 1, 1)),
    ],
)
def test_make_grid_shape_arithmetic(num, ncols, padding, expected):
    grid = images_lib.make_grid(np.zeros((num, 28, 28, 1)), ncols=ncols, padding=padding)
    assert grid.shape == expected and grid.dtype == np.uint8


def test_make_grid_places_images_row_major():
    images = np.stack([np.full((2, 2, 3), value) for value in (-1.0, 0.0, 1.0)])
    grid = images_lib.make_grid(images, ncols=2, padding=1, pad_value=7)
    assert grid.shape == (7, 7, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 128 and grid[4, 1, 0] == 255
    assert grid[4, 4, 0] == 7 and grid[0, 0, 0] == 7  # empty cell and border


def test_save_grid_writes_readable_png(tmp_path):
    path = tmp_path / "nested" / "dir" / "grid.png"
    images_lib.save_grid(path, np.zeros((6, 8, 8, 1)), ncols=3)
    with Image.open(path) as image:
        assert image.size == (3 * 10 + 2, 2 * 10 + 2) and image.mode == "L"
    rgb_path = tmp_path / "rgb.png"
    images_lib.save_grid(rgb_path, np.zeros((4, 8, 8, 3)))
    with Image.open(rgb_path) as image:
        assert image.size == (22, 22) and image.mode == "RGB"


def test_save_labeled_grids_and_scatter_png_write_files(tmp_path):
    grids = {
        "1 step": np.random.uniform(-1, 1, (4, 8, 8, 1)),
        "4 steps": np.random.uniform(-1, 1, (4, 8, 8, 1)),
        "128 steps": np.random.uniform(-1, 1, (4, 8, 8, 1)),
    }
    path = tmp_path / "out" / "labeled.png"
    written = images_lib.save_labeled_grids(path, grids, scale=2)
    with Image.open(path) as image:
        assert image.mode == "RGB"
        assert image.size == (written.shape[1], written.shape[0])
        assert image.size[1] >= 3 * (2 * 8 + 4)
        assert image.size[0] > 4 * (2 * 8 + 2)  # the label column adds width
    scatter_path = tmp_path / "out" / "toy.png"
    rng = np.random.default_rng(0)
    images_lib.scatter_png(
        scatter_path, {"data": rng.normal(size=(200, 2)), "1 step": rng.normal(size=(200, 2))}
    )
    with Image.open(scatter_path) as image:
        assert image.size[0] > image.size[1] > 0


def test_sample_batch_on_a_mesh_matches_the_local_sampler(tiny_model):
    from shortcut_jax import configs, sharding

    model, params = tiny_model
    mesh = sharding.make_mesh(configs.base_config())
    params = jax.device_put(params, sharding.replicated(mesh))
    kwargs = {"num": 5, "shape": (4, 4, 1), "num_steps": 3, "denoise_timesteps": 8}
    kwargs |= {"num_classes": 3, "cfg_scale": 2.0}
    local, _ = sampling.sample_batch(model.apply, params, jax.random.key(7), **kwargs)
    on_mesh, _ = sampling.sample_batch(
        model.apply, params, jax.random.key(7), mesh=mesh, batch_size=4, **kwargs
    )
    np.testing.assert_allclose(on_mesh, local, rtol=1e-5, atol=1e-6)


# --- objective-owned samplers -----------------------------------------------------------------


def _objective_settings(name: str):
    from shortcut_jax import configs, objectives

    config = configs.base_config()
    config.objective = name
    config.denoise_timesteps = DENOISE_TIMESTEPS
    return objectives.ObjectiveConfig.from_config(config)


@pytest.mark.parametrize("name", ["shortcut", "flow_matching", "live_reflow", "meanflow"])
def test_euler_objectives_sample_exactly_as_the_default(name):
    noise = jax.random.normal(jax.random.key(0), (3, 2))
    labels = jnp.zeros((3,), jnp.int32)
    kwargs = dict(num_steps=3, denoise_timesteps=DENOISE_TIMESTEPS)
    default = sampling.sample(_linear_velocity, {}, noise, labels, **kwargs)
    owned = sampling.sample(
        _linear_velocity, {}, noise, labels, objective=_objective_settings(name), **kwargs
    )
    np.testing.assert_array_equal(np.asarray(owned), np.asarray(default))


def test_stochastic_sampler_does_not_depend_on_chunk_size():
    settings = _objective_settings("consistency_training")
    kwargs = dict(num=6, shape=(2,), num_steps=4, denoise_timesteps=DENOISE_TIMESTEPS)
    rng = jax.random.key(3)
    whole, _ = sampling.sample_batch(_linear_velocity, {}, rng, objective=settings, **kwargs)
    chunked, _ = sampling.sample_batch(
        _linear_velocity, {}, rng, objective=settings, batch_size=4, **kwargs
    )
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    euler, _ = sampling.sample_batch(_linear_velocity, {}, rng, **kwargs)
    assert not np.allclose(euler, whole)


def test_objective_must_be_the_runs_objective_config():
    with pytest.raises(ValueError, match="ObjectiveConfig.from_config"):
        sampling.make_sampler(
            _linear_velocity,
            num_steps=2,
            denoise_timesteps=DENOISE_TIMESTEPS,
            objective="diffusion",
        )


@pytest.mark.parametrize("name", ["diffusion", "consistency_training"])
def test_objective_samplers_on_a_mesh_match_the_local_sampler(tiny_model, name):
    from shortcut_jax import configs, sharding

    model, params = tiny_model
    mesh = sharding.make_mesh(configs.base_config())
    params = jax.device_put(params, sharding.replicated(mesh))
    kwargs = {"num": 5, "shape": (4, 4, 1), "num_steps": 3, "denoise_timesteps": 8}
    kwargs |= {"num_classes": 3, "cfg_scale": 2.0, "objective": _objective_settings(name)}
    local, _ = sampling.sample_batch(model.apply, params, jax.random.key(7), **kwargs)
    on_mesh, _ = sampling.sample_batch(
        model.apply, params, jax.random.key(7), mesh=mesh, batch_size=4, **kwargs
    )
    np.testing.assert_allclose(on_mesh, local, rtol=1e-5, atol=1e-5)
