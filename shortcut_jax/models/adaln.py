"""adaLN-Zero building blocks shared by the DiT and the MLP (Peebles & Xie, 2023).

A block's residual branch is `x + gate * sublayer(modulate(layer_norm(x), shift, scale))`, with
shift, scale and gate produced from the conditioning vector c by the zero-initialised Dense
`ada_ln`; the final layer is `proj(modulate(layer_norm(h), shift, scale))` with `proj` zero
initialised too, so an untrained network outputs exactly zero. Parameter names (`ada_ln`, `norm*`,
`proj`) are part of the checkpoint format: keep them.

Also shared: the activation layout (`constrain_stream`, logical names 'activation_*', which
`shortcut_jax.sharding` maps to mesh axes inside a sharded program and ignores elsewhere) and
rematerialisation of blocks (`remat_block`, `config.model.remat`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from shortcut_jax import sharding

Dtype = Any

# config.model.remat -> what a rematerialised block keeps for the backward pass ('none': no remat,
# everything is kept). 'dots': the outputs of the weight matmuls (no batch dimensions), so the
# backward pass recomputes norms, activations and attention; 'full': only the block's inputs.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_block(block: type[nn.Module], remat: str) -> type[nn.Module]:
    """`block` itself for remat 'none', else `nn.remat(block)` with the policy of `remat`.

    Parameter names and shapes are the same either way (a lifted transform keeps the module's
    name), so checkpoints do not depend on this choice.

    Raises:
      ValueError: for a remat not in `REMAT_POLICIES`.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"config.model.remat={remat!r} is not allowed; allowed: {list(REMAT_POLICIES)}"
        )
    if remat == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=True)


def constrain_stream(x: jax.Array) -> jax.Array:
    """Lays out a residual stream (B, D) or (B, N, D): batch split, tokens and width whole."""
    names = ("activation_batch",) + ("activation_length",) * (x.ndim - 2) + ("activation_embed",)
    return sharding.constrain(x, names)


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
    mod = dense((count, hidden), ("embed", None, "modulation"), dtype, "ada_ln", True)(nn.silu(c))
    return sharding.constrain(mod, ("activation_batch", None, "activation_embed"))


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
        h = constrain_stream(h)
        out = dense(self.out_features, ("embed", self.out_axis), self.dtype, "proj", True)(h)
        names = ("activation_batch",) + ("activation_length",) * (out.ndim - 2) + (None,)
        return sharding.constrain(out, names)
