"""Conditioning embeddings shared by every backbone: time t, step size d, class label.

The conditioning vector of an example is `c = t_emb + d_emb + y_emb`, all of width `hidden_size`:

- `t_emb`: sinusoidal features of `t * 1000` (t in [0, 1]) through Dense-SiLU-Dense, as DiT embeds
  its integer timesteps; the scale makes t differences of 1/128 rotate the fastest features by
  about 8 radians, so neighbouring grid points are well separated.
- `d_emb`: the same construction, with its own weights, on the continuous step-size level
  `-log2(d)` (`timesteps.level_of`: 0 = one step of size 1; exact for the dyadic sizes, so a
  float d = 2**-k embeds bit for bit as the integer level k did before d became a float; integers
  are already well resolved, so no scale). Sizes below 2**-max_level, including d = 0 (MeanFlow's
  r = t, the instantaneous velocity), embed as the finest level max_level = log2(denoise_timesteps):
  shortcut and flow-matching runs train that level on the instantaneous velocity x1 - x0 already,
  so d = 0 and d = d_min mean the same thing to every objective.
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

from shortcut_jax import timesteps

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
      max_level: the finest level log2(denoise_timesteps); smaller step sizes embed as it.
      dtype: compute dtype.
      time_scale: t is multiplied by it before the sinusoidal features (TIME_SCALE; the
        official code's DiT, and checkpoints imported from it, use 1.0).
    """

    hidden_size: int
    num_classes: int
    max_level: float = 7.0
    dtype: Dtype = jnp.float32
    time_scale: float = TIME_SCALE

    @nn.compact
    def __call__(self, t: jax.Array, d: jax.Array, labels: jax.Array) -> jax.Array:
        """Embeds the conditioning of each example.

        Args:
          t: (B,) float times in [0, 1].
          d: (B,) float step sizes in [0, 1] (integer levels k are d = 2**-k:
            `timesteps.step_size`).
          labels: (B,) int labels in [0, num_classes].

        Returns:
          c: (B, hidden_size) in `dtype`.

        Raises:
          TypeError: for an integer d (the step-size levels models took before d became a float).
        """
        if not jnp.issubdtype(jnp.asarray(d).dtype, jnp.floating):
            raise TypeError(
                f"the model's d is a float step size in [0, 1], got dtype {jnp.asarray(d).dtype}: "
                "integer levels k are d = timesteps.step_size(k) = 2**-k"
            )
        t_emb = ScalarEmbedder(
            self.hidden_size, scale=self.time_scale, dtype=self.dtype, name="t_embedder"
        )(t)
        d_emb = ScalarEmbedder(self.hidden_size, scale=1.0, dtype=self.dtype, name="d_embedder")(
            timesteps.level_of(d, self.max_level)
        )
        y_emb = LabelEmbedder(
            self.num_classes, self.hidden_size, dtype=self.dtype, name="y_embedder"
        )(labels)
        return t_emb + d_emb + y_emb
