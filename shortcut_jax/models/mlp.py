"""Residual MLP velocity network for low-dimensional points (2-D toy data).

x: (B, D) -> Dense `input_proj` to hidden_size -> `depth` adaLN-Zero residual blocks `block_{i}`
(LayerNorm without affine, shift/scale from the conditioning, Dense-SiLU-Dense, gated residual) ->
`final_layer` (adaLN + zero-initialised Dense to D). The conditioning `c = t_emb + d_emb + y_emb`
and the adaLN pieces (`models.adaln`) are the ones the DiT uses. An untrained model outputs
exactly zero.

As in the DiT, kernels carry logical axis names via `nn.with_logical_partitioning`; `model.apply`
accepts the boxed `model.init` output or its `nn.unbox`-ed plain tree; activations carry the same
logical names (`adaln.constrain_stream`) and blocks rematerialise as `remat` says.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from shortcut_jax import sharding
from shortcut_jax.models.adaln import (
    FinalLayer,
    constrain_stream,
    dense,
    gate,
    layer_norm,
    modulate,
    modulation,
    remat_block,
)
from shortcut_jax.models.embeddings import Conditioning

Dtype = Any


class MlpBlock(nn.Module):
    """adaLN-Zero residual block: x + gate * fc2(silu(fc1(modulate(norm(x), c)))).

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
        x = constrain_stream(x)
        mod = modulation(c, 3, hidden, self.dtype)  # (B, 3, D)
        h = modulate(layer_norm(self.dtype, "norm")(x), mod[:, 0], mod[:, 1])
        h = nn.silu(dense(self.inner_size, ("embed", "mlp"), self.dtype, "fc1")(h))
        h = sharding.constrain(h, ("activation_batch", "activation_mlp"))
        h = dense(hidden, ("mlp", "embed"), self.dtype, "fc2")(h)
        return constrain_stream(x + gate(h, mod[:, 2]))


class MLP(nn.Module):
    """Velocity network s(x_t, t, d, y) for points.

    Attributes:
      hidden_size: residual-stream width.
      depth: number of residual blocks.
      num_classes: real classes; label num_classes is the null class (0 = unconditional).
      mlp_ratio: inner width of a block / hidden_size.
      dtype: compute dtype; parameters are float32.
      max_level: the finest step-size level log2(denoise_timesteps); smaller d embed as it.
      remat: 'none', 'dots' or 'full' (`adaln.REMAT_POLICIES`), per block.
    """

    hidden_size: int
    depth: int
    num_classes: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    max_level: float = 7.0
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        d: jax.Array,
        labels: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        """Predicts the velocity of a batch of points.

        Args:
          x: (B, D) noisy points x_t.
          t: (B,) float32 times in [0, 1].
          d: (B,) float32 step sizes in [0, 1] (see `embeddings.Conditioning`).
          labels: (B,) int32 labels in [0, num_classes] (num_classes = null class).
          train: unused (no dropout); kept for the common model signature.

        Returns:
          (B, D) float32 velocity.
        """
        del train
        dim = x.shape[-1]
        c = Conditioning(
            self.hidden_size,
            self.num_classes,
            max_level=self.max_level,
            dtype=self.dtype,
            name="conditioning",
        )(t, d, labels)
        c = constrain_stream(c)
        h = dense(self.hidden_size, ("data", "embed"), self.dtype, "input_proj")(
            x.astype(self.dtype)
        )
        h = constrain_stream(h)
        inner = int(self.hidden_size * self.mlp_ratio)
        block = remat_block(MlpBlock, self.remat)
        for i in range(self.depth):
            h = block(inner, self.dtype, name=f"block_{i}")(h, c)
        out = FinalLayer(dim, "data", self.dtype, name="final_layer")(h, c)
        return out.astype(jnp.float32)
