"""Tests for the velocity networks: shapes, conditioning, presets, dtypes and parameter counts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from shortcut_jax import models, timesteps
from shortcut_jax.configs import base_config


def _tiny_config(name: str = "dit", num_classes: int = 10) -> ml_collections.ConfigDict:
    """A very small model on 8x8x3 images (DiT) or 2-D points (MLP)."""
    config = base_config()
    config.model.name = name
    config.model.hidden_size = 32
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.patch_size = 2
    config.model.mlp_ratio = 2.0
    config.data.image_size = 8
    config.data.channels = 3
    config.data.num_classes = num_classes
    return config


def _random_inputs(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0):
    """(x, t, d, labels) with random values in their valid ranges (d on the dyadic levels)."""
    x, t, d, labels = models.example_inputs(config, batch_size)
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], x.shape)
    t = jax.random.uniform(keys[1], t.shape)
    d = timesteps.step_size(jax.random.randint(keys[2], d.shape, 0, 8))
    labels = jax.random.randint(keys[3], labels.shape, 0, config.data.num_classes + 1)
    return x, t, d, labels


def _perturbed_params(model: nn.Module, config: ml_collections.ConfigDict, seed: int = 0):
    """Plain float32 params with small noise added, so zero-initialised layers are non-zero."""
    params = nn.unbox(model.init(jax.random.key(seed), *models.example_inputs(config, 1)))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [
        leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


@pytest.mark.parametrize("name", ["dit", "mlp"])
def test_output_has_input_shape_and_is_float32(name):
    config = _tiny_config(name)
    model = models.get_model(config)
    inputs = _random_inputs(config, batch_size=3)
    variables = model.init(jax.random.key(0), *models.example_inputs(config, 1))
    out = model.apply(variables, *inputs)
    assert out.shape == inputs[0].shape
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["dit", "mlp"])
def test_untrained_output_is_zero(name):
    config = _tiny_config(name)
    model = models.get_model(config)
    variables = model.init(jax.random.key(0), *models.example_inputs(config, 1))
    out = model.apply(variables, *_random_inputs(config, batch_size=3))
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_mlp_point_dimension_comes_from_config_data_dim():
    config = _tiny_config("mlp")
    assert models.example_inputs(config, 5)[0].shape == (5, 2)
    config.data.dim = 3
    model = models.get_model(config)
    params = _perturbed_params(model, config)
    inputs = _random_inputs(config, batch_size=5)
    assert inputs[0].shape == (5, 3)
    assert model.apply({"params": params}, *inputs).shape == (5, 3)


@pytest.mark.parametrize("name", ["dit", "mlp"])
@pytest.mark.parametrize("changed", ["x", "t", "d", "d_between_levels", "labels"])
def test_output_depends_on_each_input(name, changed):
    config = _tiny_config(name)
    model = models.get_model(config)
    params = _perturbed_params(model, config)
    x, t, d, labels = _random_inputs(config, batch_size=4)
    base = model.apply({"params": params}, x, t, d, labels)
    if changed == "x":
        x = x + 0.5
    elif changed == "t":
        t = t + 1.0 / 128.0  # one grid step of the finest level
    elif changed == "d":
        d = jnp.where(d < 1.0, 2.0 * d, 0.5)
    elif changed == "d_between_levels":
        d = 1.5 * jnp.minimum(d, 0.5)  # a continuous step size between two dyadic ones
    else:
        labels = (labels + 1) % (config.data.num_classes + 1)
    moved = model.apply({"params": params}, x, t, d, labels)
    per_example = np.abs(np.asarray(moved - base)).reshape(4, -1).max(axis=1)
    assert np.all(per_example > 1e-4), per_example


def test_unconditional_model_has_a_single_null_label_row():
    config = _tiny_config("dit", num_classes=0)
    model = models.get_model(config)
    params = _perturbed_params(model, config)
    table = params["conditioning"]["y_embedder"]["table"]["embedding"]
    assert table.shape == (1, config.model.hidden_size)
    out = model.apply({"params": params}, *_random_inputs(config, batch_size=2))
    assert np.all(np.isfinite(np.asarray(out)))


def test_apply_accepts_boxed_and_plain_params_alike():
    config = _tiny_config("dit")
    model = models.get_model(config)
    variables = model.init(jax.random.key(0), *models.example_inputs(config, 1))
    boxed = jax.tree.map(lambda a: a + 0.05, variables)  # maps through the boxes
    plain = nn.unbox(boxed)
    inputs = _random_inputs(config, batch_size=2)
    np.testing.assert_array_equal(model.apply(boxed, *inputs), model.apply(plain, *inputs))
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["block_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["block_0"]["attn"]["qkv"]["kernel"]) == ("embed", "qkv", "heads", "kv")


def test_parameter_tree_has_named_blocks():
    config = _tiny_config("dit")
    params = _perturbed_params(models.get_model(config), config)
    assert set(params) == {"patch_embed", "conditioning", "block_0", "block_1", "final_layer"}
    assert set(params["block_0"]) == {"ada_ln", "attn", "mlp"}
    assert set(params["conditioning"]) == {"t_embedder", "d_embedder", "y_embedder"}


def test_presets_resolve_and_override_the_size_fields():
    assert models.dit_preset("DiT-B/2") == (768, 12, 12, 2)
    assert models.dit_preset("DiT-S/8") == (384, 12, 6, 8)
    assert models.dit_preset("DiT-XL/4") == (1152, 28, 16, 4)
    assert models.PRESETS["DiT-L/2"] == (1024, 24, 16, 2)
    config = base_config()
    config.data.image_size = 32
    config.model.preset = "DiT-S/4"
    model = models.get_model(config)
    assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (384, 12, 6, 4)


def test_unknown_preset_raises_and_lists_allowed_presets():
    with pytest.raises(ValueError, match="DiT-B/2"):
        models.dit_preset("DiT-M/2")
    config = base_config()
    config.model.preset = "DiT-M/2"
    with pytest.raises(ValueError, match="config.model.preset"):
        models.get_model(config)


def test_preset_with_mlp_model_raises():
    config = _tiny_config("mlp")
    config.model.preset = "DiT-S/2"
    with pytest.raises(ValueError, match="config.model.preset"):
        models.get_model(config)


def test_unknown_model_name_raises_naming_the_field():
    config = base_config()
    config.model.name = "unet"
    with pytest.raises(ValueError, match=r"config\.model\.name.*'dit'.*'mlp'"):
        models.get_model(config)
    with pytest.raises(ValueError, match=r"config\.model\.name"):
        models.example_inputs(config, 1)


def test_patch_size_that_does_not_divide_the_image_raises():
    config = base_config()
    config.model.patch_size = 8  # 28 % 8 != 0
    with pytest.raises(ValueError, match="patch"):
        models.get_model(config)


def test_bfloat16_compute_keeps_float32_params_and_output():
    config = _tiny_config("dit")
    model_32 = models.get_model(config)
    params = _perturbed_params(model_32, config)
    config.model.dtype = "bfloat16"
    model_16 = models.get_model(config)
    variables_16 = model_16.init(jax.random.key(0), *models.example_inputs(config, 1))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables_16)} == {jnp.dtype(jnp.float32)}
    inputs = _random_inputs(config, batch_size=4)
    out_32 = model_32.apply({"params": params}, *inputs)
    out_16 = model_16.apply({"params": params}, *inputs)
    assert out_16.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(out_32)))
    assert scale > 0
    assert float(jnp.max(jnp.abs(out_16 - out_32))) < 0.05 * scale


def test_dit_b2_on_imagenet_latents_has_about_130m_params():
    config = base_config()
    config.model.preset = "DiT-B/2"
    config.data.image_size = 32
    config.data.channels = 4
    config.data.num_classes = 1000
    model = models.get_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *models.example_inputs(config, 1))
    count = models.count_params(shapes)
    assert 125e6 < count < 135e6, count


def test_default_mnist_config_runs_a_forward_pass():
    config = base_config()
    model = models.get_model(config)
    variables = model.init(jax.random.key(0), *models.example_inputs(config, 1))
    x, t, d, labels = _random_inputs(config, batch_size=4)
    assert x.shape == (4, 28, 28, 1)
    out = jax.jit(model.apply)(variables, x, t, d, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert 1.0e6 < models.count_params(variables) < 1.6e6


# ----------------------------------------------------------------------------- continuous d


def test_dyadic_step_sizes_embed_bit_for_bit_as_the_integer_levels_did():
    """Runs saved before d became a float sample the same: the old model embedded float(level)."""
    hidden, num_classes = 32, 10
    conditioning = models.embeddings.Conditioning(hidden, num_classes, max_level=7.0)
    level = jnp.arange(8, dtype=jnp.int32)
    t = jnp.linspace(0.0, 1.0, 8)
    labels = jnp.arange(8) % (num_classes + 1)
    variables = conditioning.init(jax.random.key(0), t, timesteps.step_size(level), labels)
    params = nn.unbox(variables)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), params)
    new = conditioning.apply({"params": params}, t, timesteps.step_size(level), labels)

    embedder = models.embeddings.ScalarEmbedder
    old = (
        embedder(hidden, scale=models.embeddings.TIME_SCALE).apply(
            {"params": params["t_embedder"]}, t
        )
        + embedder(hidden).apply({"params": params["d_embedder"]}, level.astype(jnp.float32))
        + models.embeddings.LabelEmbedder(num_classes, hidden).apply(
            {"params": params["y_embedder"]}, labels
        )
    )
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_level_of_is_exact_on_powers_of_two_and_clamps_small_steps():
    levels = np.arange(0, 24)
    d = timesteps.step_size(jnp.asarray(levels))
    np.testing.assert_array_equal(np.asarray(timesteps.level_of(d, 30.0)), levels)
    clamped = np.asarray(timesteps.level_of(jnp.array([0.0, 1e-9, 2.0**-7, 0.75]), 7.0))
    np.testing.assert_allclose(clamped, [7.0, 7.0, 7.0, -np.log2(0.75)], rtol=1e-6)
    slope = jax.grad(lambda x: timesteps.level_of(x, 7.0))(0.3)
    np.testing.assert_allclose(slope, -1.0 / (0.3 * np.log(2.0)), rtol=1e-5)


@pytest.mark.parametrize("name", ["dit", "mlp"])
def test_zero_step_size_is_the_finest_level(name):
    config = _tiny_config(name)
    config.denoise_timesteps = 8
    model = models.get_model(config)
    params = _perturbed_params(model, config)
    x, t, _, labels = _random_inputs(config, batch_size=3)
    at_zero = model.apply({"params": params}, x, t, jnp.zeros(3), labels)
    at_finest = model.apply({"params": params}, x, t, jnp.full((3,), 1 / 8), labels)
    np.testing.assert_array_equal(np.asarray(at_zero), np.asarray(at_finest))


def test_integer_levels_are_refused_with_the_conversion_named():
    config = _tiny_config("mlp")
    model = models.get_model(config)
    params = _perturbed_params(model, config)
    x, t, _, labels = _random_inputs(config, batch_size=2)
    with pytest.raises(TypeError, match="step_size"):
        model.apply({"params": params}, x, t, jnp.array([0, 3]), labels)


def test_dit_and_mlp_keep_their_parameter_names():
    """Checkpoints name parameters by path: the shared adaLN code must not rename any."""
    mlp = _perturbed_params(models.get_model(_tiny_config("mlp")), _tiny_config("mlp"))
    block = {"ada_ln", "norm", "fc1", "fc2"}
    assert set(mlp) == {"conditioning", "input_proj", "block_0", "block_1", "final_layer"}
    assert set(mlp["block_0"]) <= block and {"ada_ln", "fc1", "fc2"} <= set(mlp["block_0"])
    assert set(mlp["final_layer"]) == {"ada_ln", "proj"}
    dit = _perturbed_params(models.get_model(_tiny_config("dit")), _tiny_config("dit"))
    assert set(dit) == {"patch_embed", "conditioning", "block_0", "block_1", "final_layer"}
    assert set(dit["block_0"]) == {"ada_ln", "attn", "mlp"}
    assert set(dit["final_layer"]) == {"ada_ln", "proj"}
    assert set(dit["conditioning"]) == {"t_embedder", "d_embedder", "y_embedder"}
