"""What the benchmarks measure: the experiment configs, random batches and the train step.

Not a script. The configs are the repository's experiments (`experiments/mnist.py`,
`experiments/imagenet256.py`), optionally with a tiny DiT for --quick smoke runs; the state and
step are built exactly as the train loop builds them (`compiled_step.build`).
Random arrays stand in for data: {'image': (B, H, W, C) float32 in [-1, 1], 'label': (B,) int32}.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from shortcut_jax import compiled_step, models, optim, sharding
from shortcut_jax.state import init_state, sharded_abstract_state

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name: str) -> ml_collections.ConfigDict:
    """`get_config()` of experiments/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / f"experiments/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def shrink_model(config: ml_collections.ConfigDict, patch_size: int) -> ml_collections.ConfigDict:
    """The same config with a tiny DiT (width 32, depth 1, 2 heads): for --quick smoke runs."""
    config.model.preset = ""
    config.model.hidden_size = 32
    config.model.depth = 1
    config.model.num_heads = 2
    config.model.patch_size = patch_size
    return config


def mnist_config(quick: bool = False) -> ml_collections.ConfigDict:
    """experiments/mnist.py as is (batch 32); with `quick` a tiny DiT at batch 16."""
    config = load_experiment("mnist")
    if quick:
        shrink_model(config, patch_size=7)
        config.batch_size = 16
    return config


def imagenet_config(
    preset: str, batch_size: int, dtype: str | None = None, quick: bool = False
) -> ml_collections.ConfigDict:
    """experiments/imagenet256.py with a DiT preset, a batch size and optionally a compute dtype.

    The data are 32x32x4 latents (what the denoiser sees after the VAE) and no VAE is loaded.
    """
    config = load_experiment("imagenet256")
    config.vae.path = ""
    config.data.image_size = 32
    config.data.channels = 4
    config.model.preset = preset
    config.batch_size = batch_size
    if dtype:
        config.model.dtype = dtype
    if quick:
        shrink_model(config, patch_size=8)
    return config


def single_device_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over the first device only."""
    mesh_config = ml_collections.ConfigDict(config.to_dict())
    mesh_config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    return sharding.make_mesh(mesh_config, jax.devices()[:1])


def random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
    """{'image': (B, H, W, C) float32 uniform in [-1, 1], 'label': (B,) int32} as numpy."""
    rng = np.random.default_rng(seed)
    size, channels = config.data.image_size, config.data.channels
    num_classes = max(int(config.data.num_classes), 1)
    return {
        "image": rng.uniform(-1, 1, (batch_size, size, size, channels)).astype(np.float32),
        "label": rng.integers(0, num_classes, (batch_size,)).astype(np.int32),
    }


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
    """ShapeDtypeStructs of a global batch sharded over the batch axes of `mesh`."""
    size, channels, batch = config.data.image_size, config.data.channels, config.batch_size
    batch_sharding = sharding.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct(
            (batch, size, size, channels), jnp.float32, sharding=batch_sharding
        ),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding),
    }


def build_state_and_step(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, abstract: bool = False
) -> tuple[Any, compiled_step.CompiledStep, Any, Any, Any]:
    """The train state on `mesh` and the train step of `config` as the train loop builds them.

    With `abstract` the state is ShapeDtypeStructs (for lowering only; nothing is allocated).

    Returns:
      (state, step, model, optimizer, state_sharding).
    """
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    abstract_state, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    if abstract:
        state = abstract_state
    else:
        state = jax.jit(
            functools.partial(init_state, config, model, optimizer), out_shardings=state_sharding
        )()
    step = compiled_step.build(config, mesh, model, optimizer, state_sharding)
    return state, step, model, optimizer, state_sharding


def random_inception_params(seed: int = 0) -> Any:
    """He-scaled kernels, unit batch-norm variances, zero means and offsets: finite features."""
    from flax import traverse_util

    from shortcut_jax.evaluators import inception

    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in inception.param_shapes().items():
        if name.endswith("/kernel"):
            fan_in = int(np.prod(shape[:-1]))
            flat[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            flat[name] = np.full(shape, 1.0 if name.endswith("/var") else 0.0, np.float32)
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))
