"""adaLN-Zero building blocks shared by the DiT and the MLP (Peebles & Xie, 2023).

A block's residual branch is `x + gate * sublayer(modulate(layer_norm(x), shift, scale))`, with
shift, scale and gate produced from the conditioning vector c by the zero-initialised Dense
`ada_ln`; the final layer is `proj(modulate(layer_norm(h), shift, scale))` with `proj` zero
initialised too, so an untrained network outputs exactly zero. Parameter names (`ada_ln`, `norm*`,
`proj`) are part of the checkpoint format: keep them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dense(
    features: int | tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: Dtype,
    name: str,
    zero: bool = False,
    in_axes: int | tuple[int, ...] = -1,
) -> nn.DenseGeneral:
    """A float32-parameter DenseGeneral whose kernel carries the logical axis names `axes`."""
    init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
    return nn.DenseGeneral(
        features,
        axis=in_axes,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.initializers.zeros_init(),
        name=name,
    )


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm without scale or bias (adaLN supplies them)."""
    return nn.LayerNorm(
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x * (1 + scale) + shift per example. x: (B, ..., D); shift, scale: (B, D)."""
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * (1.0 + scale[expand]) + shift[expand]


def gate(x: jax.Array, gate_values: jax.Array) -> jax.Array:
    """x * gate per example. x: (B, ..., D); gate_values: (B, D)."""
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * gate_values[expand]


def modulation(c: jax.Array, count: int, hidden: int, dtype: Dtype) -> jax.Array:
    """The zero-initialised `ada_ln` Dense on silu(c): (B, D) -> (B, count, hidden).

    Call it inside a compact module; the parameter is named `ada_ln` in that module.
    """
    return dense((count, hidden), ("embed", None, "modulation"), dtype, "ada_ln", True)(nn.silu(c))


class FinalLayer(nn.Module):
    """adaLN + zero-initialised projection: (B, ..., D) -> (B, ..., out_features).

    Attributes:
      out_features: output width (pixels per patch for the DiT, the point dimension for the MLP).
      out_axis: logical axis name of the output width ('patch' or 'data').
      dtype: compute dtype.
    """

    out_features: int
    out_axis: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        """Args: h: (B, ..., D); c: (B, D). Returns: (B, ..., out_features)."""
        shift_scale = modulation(c, 2, h.shape[-1], self.dtype)
        h = modulate(layer_norm(self.dtype, "norm")(h), shift_scale[:, 0], shift_scale[:, 1])
        return dense(self.out_features, ("embed", self.out_axis), self.dtype, "proj", True)(h)
