"""Residual MLP velocity network for low-dimensional points (2-D toy data).

x: (B, D) -> Dense `input_proj` to hidden_size -> `depth` adaLN-Zero residual blocks `block_{i}`
(LayerNorm without affine, shift/scale from the conditioning, Dense-SiLU-Dense, gated residual) ->
`final_layer` (adaLN + zero-initialised Dense to D). The conditioning `c = t_emb + d_emb + y_emb` is
the one the DiT uses. An untrained model outputs exactly zero.

As in the DiT, kernels carry logical axis names via `nn.with_logical_partitioning`; `model.apply`
accepts the boxed `model.init` output or its `nn.unbox`-ed plain tree.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from shortcut_jax.models.embeddings import Conditioning

Dtype = Any


def _dense(
    features: int | tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: Dtype,
    name: str,
    zero: bool = False,
) -> nn.DenseGeneral:
    """A float32-parameter DenseGeneral whose kernel carries logical axis names `axes`."""
    init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
    return nn.DenseGeneral(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(init, axes),
        name=name,
    )


def _film(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Dtype, name: str) -> jax.Array:
    """LayerNorm without affine, then x * (1 + scale) + shift. x, shift, scale: (B, D)."""
    normed = nn.LayerNorm(
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)
    return normed * (1.0 + scale) + shift


class MlpBlock(nn.Module):
    """adaLN-Zero residual block: x + gate * fc2(silu(fc1(film(x, c)))).

    Attributes:
      inner_size: width of the inner layer.
      dtype: compute dtype.
    """

    inner_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """Args: x: (B, D); c: (B, D). Returns: (B, D)."""
        hidden = x.shape[-1]
        modulation = _dense((3, hidden), ("embed", None, "modulation"), self.dtype, "ada_ln", True)(
            nn.silu(c)
        )  # (B, 3, D)
        h = _film(x, modulation[:, 0], modulation[:, 1], self.dtype, "norm")
        h = nn.silu(_dense(self.inner_size, ("embed", "mlp"), self.dtype, "fc1")(h))
        h = _dense(hidden, ("mlp", "embed"), self.dtype, "fc2")(h)
        return x + modulation[:, 2] * h


class MlpFinalLayer(nn.Module):
    """adaLN + zero-initialised projection back to the point dimension.

    Attributes:
      out_features: point dimension D.
      dtype: compute dtype.
    """

    out_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        """Args: h: (B, hidden); c: (B, hidden). Returns: (B, out_features)."""
        hidden = h.shape[-1]
        modulation = _dense((2, hidden), ("embed", None, "modulation"), self.dtype, "ada_ln", True)(
            nn.silu(c)
        )
        h = _film(h, modulation[:, 0], modulation[:, 1], self.dtype, "norm")
        return _dense(self.out_features, ("embed", "data"), self.dtype, "proj", True)(h)


class MLP(nn.Module):
    """Velocity network s(x_t, t, d_level, y) for points.

    Attributes:
      hidden_size: residual-stream width.
      depth: number of residual blocks.
      num_classes: real classes; label num_classes is the null class (0 = unconditional).
      mlp_ratio: inner width of a block / hidden_size.
      dtype: compute dtype; parameters are float32.
    """

    hidden_size: int
    depth: int
    num_classes: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        d_level: jax.Array,
        labels: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        """Predicts the velocity of a batch of points.

        Args:
          x: (B, D) noisy points x_t.
          t: (B,) float32 times in [0, 1].
          d_level: (B,) int32 step-size levels in [0, log2(denoise_timesteps)].
          labels: (B,) int32 labels in [0, num_classes] (num_classes = null class).
          train: unused (no dropout); kept for the common model signature.

        Returns:
          (B, D) float32 velocity.
        """
        del train
        dim = x.shape[-1]
        c = Conditioning(self.hidden_size, self.num_classes, self.dtype, name="conditioning")(
            t, d_level, labels
        )
        h = _dense(self.hidden_size, ("data", "embed"), self.dtype, "input_proj")(
            x.astype(self.dtype)
        )
        inner = int(self.hidden_size * self.mlp_ratio)
        for i in range(self.depth):
            h = MlpBlock(inner, self.dtype, name=f"block_{i}")(h, c)
        out = MlpFinalLayer(dim, self.dtype, name="final_layer")(h, c)
        return out.astype(jnp.float32)
