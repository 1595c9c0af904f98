"""Rematerialisation (config.model.remat) and the activations' logical layout.

Remat changes neither the parameter tree (the checkpoint format) nor outputs or gradients. Inside
`sharding.activation_context` the models keep their activations split over the batch axes, so an
FSDP mesh costs about the temporaries and FLOPs per device of data parallelism (before, XLA followed
the FSDP-sharded kernels and replicated the batch); outside it nothing changes. The train step
lowers with abstract frozen inputs (a VAE or a teacher run without weights), for ahead-of-time
compilation.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tiny import run_on_cpu_devices, tiny_mnist_config

from shortcut_jax import (
    compiled_step,
    config_lib,
    models,
    objectives,
    optim,
    resume_policy,
    sharding,
    steps,
)
from shortcut_jax.models import vae as vae_lib
from shortcut_jax.state import sharded_abstract_state


def _dit_config():
    config = tiny_mnist_config()
    config.model.depth = 2
    return config


def _mlp_config():
    config = tiny_mnist_config()
    config.model.name = "mlp"
    config.data.name = "toy2d"
    config.data.num_classes = 0
    config.model.depth = 2
    return config


def _inputs(config, batch: int = 4):
    x, _, _, labels = models.example_inputs(config, batch)
    x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    t = jnp.linspace(0.0, 1.0, batch)
    d = jnp.full((batch,), 0.25)
    return x, t, d, labels


def _nonzero_params(model, inputs):
    """Initial parameters, perturbed so that the zero-initialised layers do not hide anything."""
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *inputs))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = [
        leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


@pytest.mark.parametrize("make_config", [_dit_config, _mlp_config], ids=["dit", "mlp"])
def test_remat_keeps_the_parameter_tree_outputs_and_gradients(make_config):
    config = make_config()
    inputs = _inputs(config)
    params = None
    results = {}
    for remat in ("none", "dots", "full"):
        config.model.remat = remat
        model = models.get_model(config)
        assert model.remat == remat
        # The boxed tree: names, shapes, dtypes and logical axes of every parameter.
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
        if params is None:
            params = _nonzero_params(model, inputs)

        def loss(params, model=model):
            return jnp.mean(model.apply({"params": params}, *inputs) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        results[remat] = (boxed, nn.get_partition_spec(boxed), value, grads)

    reference_boxed, reference_specs, reference_value, reference_grads = results["none"]
    assert {"block_0", "block_1"} <= set(reference_boxed["params"])
    for remat in ("dots", "full"):
        boxed, specs, value, grads = results[remat]
        assert jax.tree.structure(boxed) == jax.tree.structure(reference_boxed), remat
        assert jax.tree.leaves(boxed) == jax.tree.leaves(reference_boxed), remat
        assert specs == reference_specs, remat
        np.testing.assert_allclose(float(value), float(reference_value), rtol=1e-6)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_a_bad_remat_is_refused_naming_the_field_and_the_allowed_values():
    config = _dit_config()
    config.model.remat = "selective"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.remat.*'dots'"):
        config_lib.validate(config, device_count=1)
    with pytest.raises(ValueError, match=r"config\.model\.remat='selective'.*'full'"):
        models.get_model(config)
    del config.model["remat"]  # a config saved before the field existed: no remat
    config_lib.validate(config, device_count=1)
    assert models.get_model(config).remat == "none"


def test_remat_may_change_on_resume():
    old = {"model.remat": "none", "model.depth": 2}
    for new_remat in ("dots", "full"):
        changes = resume_policy.compare(old, {**old, "model.remat": new_remat}, step=10)
        assert [(c.field, c.safe) for c in changes] == [("model.remat", True)]
    # A run saved before the field existed resumes with it set.
    changes = resume_policy.compare({"model.depth": 2}, old, step=10)
    assert [(c.field, c.safe) for c in changes] == [("model.remat", True)]


def test_rules_of_configs_without_activation_names_get_the_defaults():
    config = _dit_config()
    assert sharding.logical_rules(config) == tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes)
        for name, axes in config.sharding_rules
    )
    config.sharding_rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"))
    rules = dict(sharding.logical_rules(config))
    assert rules["activation_batch"] == ("data", "fsdp")
    assert rules["activation_embed"] is None and rules["activation_mlp"] == "tensor"
    # A config's own activation rule wins over the default (a config.json holds lists).
    config.sharding_rules = (("embed", "fsdp"), ("activation_batch", ["data"]))
    rules = sharding.logical_rules(config)
    assert [axes for name, axes in rules if name == "activation_batch"] == [("data",)]


def _constraints(jaxpr) -> int:
    return str(jaxpr).count("sharding_constraint")


def test_without_a_mesh_the_models_are_unchanged_and_with_one_device_equal():
    config = _dit_config()
    model = models.get_model(config)
    inputs = _inputs(config)
    params = _nonzero_params(model, inputs)

    def forward(params, *inputs):
        return model.apply({"params": params}, *inputs)

    assert _constraints(jax.make_jaxpr(forward)(params, *inputs)) == 0
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    with sharding.activation_context(None, sharding.logical_rules(config)):
        assert _constraints(jax.make_jaxpr(forward)(params, *inputs)) == 0

    def laid_out(params, *inputs):
        with sharding.activation_context(mesh, sharding.logical_rules(config)):
            return forward(params, *inputs)

    assert _constraints(jax.make_jaxpr(laid_out)(params, *inputs)) > 10
    np.testing.assert_array_equal(
        np.asarray(jax.jit(laid_out)(params, *inputs)),
        np.asarray(jax.jit(forward)(params, *inputs)),
    )
    # The context ends with the traced function: later traces are unconstrained again.
    assert _constraints(jax.make_jaxpr(forward)(params, *inputs)) == 0


# MNIST digits (28x28x1) -> 7x7x4 latents, as tests/test_latent_training.py.
_ARCH = vae_lib.VaeArch(
    in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
    norm_num_groups=4,
)  # fmt: skip


def test_the_step_lowers_with_an_abstract_vae_and_an_abstract_teacher_run():
    config = _dit_config()
    config.vae.path = "unused.npz"  # never read: the VAE below has no weights
    config.vae.downsample_factor = 4
    config.vae.latent_channels = 4
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    abstract, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    shapes = vae_lib.param_shapes(_ARCH)
    flat = {path: jax.ShapeDtypeStruct(shape, jnp.float32) for path, shape in shapes.items()}
    vae = vae_lib.Vae(
        _ARCH, traverse_util.unflatten_dict(flat, sep="/"), 0.5, "abstract", "abstract"
    )
    step = compiled_step.build(config, mesh, model, optimizer, state_sharding, vae=vae)
    replicated = sharding.replicated(mesh)
    leaves = jax.tree.leaves(step.frozen["vae"])
    assert len(leaves) == len([p for p in shapes if p.split("/")[0] in vae_lib.ENCODER_GROUPS])
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert all(leaf.sharding == replicated for leaf in leaves)
    batch_sharding = sharding.batch_sharding(mesh)
    pixels = {
        "image": jax.ShapeDtypeStruct((16, 28, 28, 1), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch_sharding),
    }
    text = step.lower(abstract, pixels).as_text()
    assert "28x28x1" in text and "7x7x4" in text  # images in, latents for the model

    config = _dit_config()
    config.objective = "progressive_distillation"
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    abstract, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    bare = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), abstract.params)
    for params in (abstract.params, bare):  # with the run's shardings, and without (replicated)
        teacher_run = objectives.TeacherRun(
            params=params, student=None, apply_fn=steps.make_apply_fn(model), denoise_timesteps=8
        )
        step = compiled_step.build(
            config, mesh, model, optimizer, state_sharding, teacher_run=teacher_run
        )
        assert all(leaf.sharding is not None for leaf in jax.tree.leaves(step.frozen["teacher"]))
        latents = {
            "image": jax.ShapeDtypeStruct((16, 28, 28, 1), jnp.float32, sharding=batch_sharding),
            "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch_sharding),
        }
        step.lower(abstract, latents)


_MESH_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from shortcut_jax import compiled_step, configs, models, optim, sharding, state, steps

def config_for(data, fsdp):
    config = configs.base_config()
    config.model.update(hidden_size=64, depth=2, num_heads=4, patch_size=4)
    config.batch_size = 32
    config.mesh.update(data=data, fsdp=fsdp, tensor=1)
    return config

result = {}
for name, (data, fsdp) in {"data": (8, 1), "fsdp": (1, 8)}.items():
    config = config_for(data, fsdp)
    mesh = sharding.make_mesh(config)
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    abstract, shardings = state.sharded_abstract_state(config, model, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((32, 28, 28, 1), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((32,), jnp.int32, sharding=batch_sharding),
    }
    step = compiled_step.build(config, mesh, model, optimizer, shardings)
    compiled = step.lower(abstract, batch).compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result[name] = {
        "arguments": memory.argument_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "flops": cost["flops"],
    }

# The FSDP model's forward (params sharded, batch split 8 ways, and a batch of 4 that 8 devices
# do not divide) equals the unsharded one (relative to the outputs' scale: float round-off).
config = config_for(1, 8)
mesh = sharding.make_mesh(config)
model = models.get_model(config)
x, _, _, labels = models.example_inputs(config, 16)
x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
t, d = jnp.linspace(0.0, 1.0, 16), jnp.full((16,), 0.5)
boxed = model.init(jax.random.PRNGKey(0), x, t, d, labels)
params = jax.tree.map(lambda p: p + 0.05, nn.unbox(boxed)["params"])
specs = sharding.mesh_specs(boxed, sharding.logical_rules(config))["params"]
placed = jax.tree.map(
    lambda p, s: jax.device_put(p, jax.sharding.NamedSharding(mesh, s)), params, specs,
    is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec),
)
apply_fn = steps.make_apply_fn(model)
expected = np.asarray(jax.jit(apply_fn)(params, x, t, d, labels))

def laid_out(params, x, t, d, labels):
    with sharding.activation_context(mesh, sharding.logical_rules(config)):
        return apply_fn(params, x, t, d, labels)

errors = {}
for rows in (16, 4):
    inputs = [sharding.shard_batch(mesh, np.asarray(a[:rows])) if rows == 16 else a[:rows]
              for a in (x, t, d, labels)]
    got = np.asarray(jax.jit(laid_out)(placed, *inputs))
    errors[rows] = float(np.max(np.abs(got - expected[:rows])) / np.max(np.abs(expected)))
result["forward_error"] = errors
print("RESULT " + json.dumps(result))
"""


def test_fsdp_keeps_activations_split_over_the_batch_on_8_devices():
    stdout = run_on_cpu_devices(_MESH_SCRIPT, timeout=300)
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    data, fsdp = result["data"], result["fsdp"]
    # The state is split 8 ways ...
    assert fsdp["arguments"] < data["arguments"] / 4, result
    # ... while each device computes on its eighth of the batch, as in data parallelism (before
    # the activations were constrained: 5.2x the temporaries and 1.8x the FLOPs).
    assert fsdp["temporaries"] < 2 * data["temporaries"], result
    assert fsdp["flops"] < 1.1 * data["flops"], result
    assert max(result["forward_error"].values()) < 1e-5, result
