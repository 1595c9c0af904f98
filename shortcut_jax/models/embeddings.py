"""Conditioning embeddings shared by every backbone: time t, step-size level, class label.

The conditioning vector of an example is `c = t_emb + d_emb + y_emb`, all of width `hidden_size`:

- `t_emb`: sinusoidal features of `t * 1000` (t in [0, 1]) through Dense-SiLU-Dense, as DiT embeds
  its integer timesteps; the scale makes t differences of 1/128 rotate the fastest features by
  about 8 radians, so neighbouring grid points are well separated.
- `d_emb`: the same construction, with its own weights, on the float step-size level
  `d_level = log2(M)` (0 = one step of size 1); integers are already well resolved, so no scale.
- `y_emb`: a learned table with `num_classes + 1` rows; row `num_classes` is the null class used for
  classifier-free guidance (with `num_classes == 0` the table has the single null row).

Kernels carry logical axis names (see `shortcut_jax.models` for the list) through
`nn.with_logical_partitioning`; biases are unboxed and replicated.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Scale applied to t in [0, 1] before the sinusoidal features (DiT's integer-timestep range).
TIME_SCALE = 1000.0


def sinusoidal_features(
    values: jax.Array, num_features: int, max_period: float = 10_000.0
) -> jax.Array:
    """Sin/cos features of one scalar per example at geometrically spaced frequencies.

    Args:
      values: (B,) float scalars (already scaled by the caller).
      num_features: even number of output features F; frequencies run from 1 to 1 / max_period.
      max_period: the slowest period.

    Returns:
      (B, F) float32 features `[cos(v * f_0..f_{F/2-1}), sin(v * f_0..f_{F/2-1})]`.
    """
    if num_features % 2:
        raise ValueError(f"num_features must be even, got {num_features}")
    half = num_features // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = values.astype(jnp.float32)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class ScalarEmbedder(nn.Module):
    """Embeds one scalar per example: sinusoidal features, then Dense-SiLU-Dense.

    Attributes:
      hidden_size: output width.
      scale: multiplies the scalar before the sinusoidal features.
      frequency_size: number of sinusoidal features.
      dtype: compute dtype of the Dense layers (parameters stay float32).
    """

    hidden_size: int
    scale: float = 1.0
    frequency_size: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, values: jax.Array) -> jax.Array:
        """Args: values: (B,) scalars. Returns: (B, hidden_size) in `dtype`."""
        features = sinusoidal_features(values * self.scale, self.frequency_size)
        init = nn.initializers.normal(stddev=0.02)
        h = nn.Dense(
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, ("frequency", "embed")),
            name="fc1",
        )(features)
        h = nn.silu(h)
        return nn.Dense(
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
            name="fc2",
        )(h)


class LabelEmbedder(nn.Module):
    """Class-label table with a null row: labels in [0, num_classes], num_classes = null class.

    Attributes:
      num_classes: number of real classes (0 = unconditional: only the null row exists).
      hidden_size: output width.
      dtype: compute dtype of the output (the table stays float32).
    """

    num_classes: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        """Args: labels: (B,) int. Returns: (B, hidden_size) in `dtype`."""
        return nn.Embed(
            self.num_classes + 1,
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), ("classes", "embed")
            ),
            name="table",
        )(labels)


class Conditioning(nn.Module):
    """Conditioning vector `c = t_emb + d_emb + y_emb` of width hidden_size.

    Attributes:
      hidden_size: output width.
      num_classes: number of real classes (label num_classes is the null class).
      dtype: compute dtype.
    """

    hidden_size: int
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array, d_level: jax.Array, labels: jax.Array) -> jax.Array:
        """Embeds the conditioning of each example.

        Args:
          t: (B,) float times in [0, 1].
          d_level: (B,) int step-size levels (d = 2 ** -d_level).
          labels: (B,) int labels in [0, num_classes].

        Returns:
          c: (B, hidden_size) in `dtype`.
        """
        t_emb = ScalarEmbedder(
            self.hidden_size, scale=TIME_SCALE, dtype=self.dtype, name="t_embedder"
        )(t)
        d_emb = ScalarEmbedder(self.hidden_size, scale=1.0, dtype=self.dtype, name="d_embedder")(
            d_level.astype(jnp.float32)
        )
        y_emb = LabelEmbedder(
            self.num_classes, self.hidden_size, dtype=self.dtype, name="y_embedder"
        )(labels)
        return t_emb + d_emb + y_emb
