"""Velocity networks s(x_t, t, d, y): a DiT for images and a residual MLP for points.

Every model is a `flax.linen.Module` with
`__call__(x, t, d, labels, train=False) -> output` (shape of x, float32), d a float step size in
[0, 1] (integer levels k are d = 2**-k; see `embeddings.Conditioning`). Both share their
conditioning (`embeddings`) and adaLN-Zero pieces (`adaln`).

Parameters are float32 whatever `config.model.dtype` says. Kernels are boxed with logical axis
names (`nn.with_logical_partitioning`), so `model.init` returns `nn.Partitioned` leaves around the
kernels; `model.apply` accepts that tree or the plain one. To get plain arrays, e.g. for
`flax.traverse_util.flatten_dict`, call `nn.unbox(variables)`; for the logical axes call
`nn.get_partition_spec(jax.eval_shape(model.init, rng, *example_inputs(config, 1)))`.

Logical axis names used: 'embed' (hidden width), 'mlp' (MLP inner width), 'heads', 'kv' (head
dimension), 'qkv' (the 3 of q/k/v), 'modulation' (adaLN output width), 'frequency' (sinusoidal
features), 'classes' (label table rows), 'channels' (image channels into the patch embedding),
'patch' (pixels per patch out of the final layer), 'data' (point dimension). Biases are unboxed.

Typical use::

    model = get_model(config)
    variables = model.init(rng, *example_inputs(config, batch_size=1))
    params = nn.unbox(variables)["params"]
    velocity = model.apply({"params": params}, x_t, t, d, labels)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from shortcut_jax import latent_space
from shortcut_jax.models.adaln import REMAT_POLICIES
from shortcut_jax.models.dit import PRESETS, DiT, dit_preset
from shortcut_jax.models.embeddings import TIME_SCALE
from shortcut_jax.models.mlp import MLP

__all__ = [
    "DiT",
    "MLP",
    "MODEL_NAMES",
    "PRESETS",
    "REMAT_POLICIES",
    "count_params",
    "dit_preset",
    "example_inputs",
    "get_model",
]

MODEL_NAMES = ("dit", "mlp")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """Maps config.model.dtype to a jnp dtype, failing clearly on anything else."""
    name = config.model.dtype
    if name not in _DTYPES:
        raise ValueError(f"config.model.dtype={name!r} is not allowed; allowed: {sorted(_DTYPES)}")
    return _DTYPES[name]


def get_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the velocity network named by config.model.name.

    Reads config.model.{name, preset, hidden_size, depth, num_heads, patch_size, mlp_ratio, dtype,
    remat} and config.data.{image_size, channels, num_classes}. config.model.remat ('none',
    'dots', 'full'; absent in configs saved before it existed = 'none') rematerialises each block
    in the backward pass; it changes neither the parameters nor the results. A non-empty
    config.model.preset (e.g. "DiT-B/2") overrides hidden_size, depth, num_heads and patch_size.
    The step-size level -log2(d) is embedded sinusoidally; config.denoise_timesteps sets the
    finest level, the one smaller step sizes (d = 0 included) embed as.

    Args:
      config: the experiment config (see shortcut_jax.configs.base_config).

    Returns:
      An unbound flax.linen.Module.

    Raises:
      ValueError: for an unknown config.model.name, preset, dtype or remat, a preset with the
        'mlp' model, or shapes that do not fit (image size not divisible by the patch size,
        hidden size not divisible by the heads).
    """
    name = config.model.name
    dtype = _compute_dtype(config)
    remat = config.model.get("remat", "none")
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"config.model.remat={remat!r} is not allowed; allowed: {list(REMAT_POLICIES)}"
        )
    max_level = float(math.log2(int(config.denoise_timesteps)))
    num_classes = int(config.data.num_classes)
    if num_classes < 0:
        raise ValueError(f"config.data.num_classes={num_classes} must be >= 0")
    if name == "dit":
        hidden_size = config.model.hidden_size
        depth = config.model.depth
        num_heads = config.model.num_heads
        patch_size = config.model.patch_size
        if config.model.preset:
            hidden_size, depth, num_heads, patch_size = dit_preset(config.model.preset)
        side = latent_space.model_shape(config)[0]
        if side % patch_size:
            raise ValueError(
                f"the model's input side {side} (config.data.image_size"
                + (" / config.vae.downsample_factor" if latent_space.uses_vae(config) else "")
                + f") is not divisible by the patch size {patch_size} (config.model.patch_size "
                "or config.model.preset)"
            )
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden size {hidden_size} is not divisible by num_heads {num_heads} "
                "(config.model.hidden_size / num_heads or config.model.preset)"
            )
        if hidden_size % 4:
            raise ValueError(f"config.model.hidden_size={hidden_size} must be a multiple of 4")
        return DiT(
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            patch_size=patch_size,
            num_classes=num_classes,
            mlp_ratio=config.model.mlp_ratio,
            dtype=dtype,
            max_level=max_level,
            remat=remat,
            time_scale=float(config.model.get("time_scale", TIME_SCALE)),
        )
    if name == "mlp":
        if config.model.preset:
            raise ValueError(
                f"config.model.preset={config.model.preset!r} only applies to "
                "config.model.name='dit'; set it to '' for the 'mlp' model"
            )
        return MLP(
            hidden_size=config.model.hidden_size,
            depth=config.model.depth,
            num_classes=num_classes,
            mlp_ratio=config.model.mlp_ratio,
            dtype=dtype,
            max_level=max_level,
            remat=remat,
        )
    raise ValueError(f"config.model.name={name!r} is not a known model; allowed: {MODEL_NAMES}")


def example_inputs(
    config: ml_collections.ConfigDict, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Zero inputs of the right shapes and dtypes for `model.init` / `jax.eval_shape`.

    Args:
      config: the experiment config.
      batch_size: B.

    Returns:
      (x, t, d, labels): x (B, H, W, C) float32 for 'dit' (`latent_space.model_shape`:
      the pixel images, or their latents when config.vae.path is set) or (B, D) float32 for 'mlp'
      (D = config.data.dim if that field exists, else 2); t (B,) float32; d (B,) float32 (ones);
      labels (B,) int32.

    Raises:
      ValueError: for an unknown config.model.name.
    """
    name = config.model.name
    if name == "dit":
        x = jnp.zeros((batch_size, *latent_space.model_shape(config)), jnp.float32)
    elif name == "mlp":
        x = jnp.zeros((batch_size, int(config.data.get("dim", 2))), jnp.float32)
    else:
        raise ValueError(f"config.model.name={name!r} is not a known model; allowed: {MODEL_NAMES}")
    t = jnp.zeros((batch_size,), jnp.float32)
    d = jnp.ones((batch_size,), jnp.float32)
    labels = jnp.zeros((batch_size,), jnp.int32)
    return x, t, d, labels


def count_params(params: Any) -> int:
    """Number of scalar parameters in a pytree.

    Args:
      params: arrays, `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), boxed or plain.

    Returns:
      The total element count.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
