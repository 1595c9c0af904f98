"""Diffusion Transformer (DiT) with adaLN-Zero blocks, conditioned on t, step size d and class.

Layout: patchify (a strided convolution, `patch_embed`) + fixed 2-D sin-cos position embedding ->
`depth` blocks `block_{i}` (LayerNorm without affine, shift/scale modulation, multi-head
self-attention `attn`, gated residual; the same around the GELU(tanh) MLP `mlp`; the six
modulation vectors come from the zero-initialised Dense `ada_ln`) -> `final_layer` (adaLN +
zero-initialised Dense) -> unpatchify to (B, H, W, C). With every modulation and the final Dense
at zero, an untrained model outputs exactly zero and each block starts as the identity. The
adaLN pieces are shared with the MLP (`models.adaln`).

Compute runs in `dtype` (float32 or bfloat16); parameters are always float32 and the output is cast
to float32. Attention logits and softmax are computed in float32.

Activations carry logical axis names through `sharding.constrain` ('activation_batch', ...): inside
a sharded program (`sharding.activation_context`) they stay split over the batch axes whatever the
kernels' layout; elsewhere the calls do nothing. `remat` ('none', 'dots', 'full') rematerialises
each block in the backward pass (`adaln.remat_block`) without changing parameters or results.

Kernels are created with `nn.with_logical_partitioning`, so `model.init` returns `nn.Partitioned`
boxes around kernels. `model.apply` accepts the boxed tree or the plain tree
(`nn.unbox(variables)`); `nn.get_partition_spec(jax.eval_shape(model.init, ...))` gives the logical
axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
from shortcut_jax.models.embeddings import TIME_SCALE, Conditioning

Dtype = Any

# name -> (hidden_size, depth, num_heads); the patch size comes from the "/p" suffix.
_DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
_PATCH_SIZES = (2, 4, 8)

PRESETS: dict[str, tuple[int, int, int, int]] = {
    f"DiT-{size}/{patch}": (*_DIT_SIZES[size], patch)
    for size in _DIT_SIZES
    for patch in _PATCH_SIZES
}


def dit_preset(name: str) -> tuple[int, int, int, int]:
    """Resolves a named DiT preset.

    Args:
      name: e.g. "DiT-B/2" (sizes S, B, L, XL; patch sizes 2, 4, 8).

    Returns:
      (hidden_size, depth, num_heads, patch_size).

    Raises:
      ValueError: for an unknown name; the message lists the allowed presets.
    """
    if name not in PRESETS:
        raise ValueError(
            f"config.model.preset={name!r} is not a known DiT preset; allowed: {sorted(PRESETS)}"
        )
    return PRESETS[name]


def sincos_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of a height x width token grid.

    Half of the features encode the row, half the column, each as [sin, cos] over dim / 4
    geometrically spaced frequencies.

    Args:
      height: grid rows h.
      width: grid columns w.
      dim: embedding width, a multiple of 4.

    Returns:
      (h * w, dim) float32 numpy array, row-major over the grid (token index = row * w + col).
    """
    if dim % 4:
        raise ValueError(
            f"hidden_size must be a multiple of 4 for the 2-D position embedding: {dim}"
        )
    quarter = dim // 4
    frequencies = 1.0 / 10_000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    row_angles = rows.reshape(-1, 1) * frequencies[None, :]
    col_angles = cols.reshape(-1, 1) * frequencies[None, :]
    embedding = np.concatenate(
        [np.sin(row_angles), np.cos(row_angles), np.sin(col_angles), np.cos(col_angles)], axis=1
    )
    return embedding.astype(np.float32)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection.

    Attributes:
      num_heads: number of heads H (hidden_size D must divide by H).
      dtype: compute dtype; logits and softmax run in float32.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x: (B, N, D). Returns: (B, N, D) in `dtype`."""
        hidden = x.shape[-1]
        head_dim = hidden // self.num_heads
        qkv = dense(
            (3, self.num_heads, head_dim), ("embed", "qkv", "heads", "kv"), self.dtype, "qkv"
        )(x)  # (B, N, 3, H, Dh)
        qkv = sharding.constrain(
            qkv,
            ("activation_batch", "activation_length", None, "activation_heads", "activation_kv"),
        )
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = sharding.constrain(
            logits, ("activation_batch", "activation_heads", "activation_length", None)
        )
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, N, H, Dh)
        out = sharding.constrain(
            out, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        )
        out = dense(hidden, ("heads", "kv", "embed"), self.dtype, "out", in_axes=(-2, -1))(out)
        return constrain_stream(out)


class Mlp(nn.Module):
    """Transformer MLP: Dense -> GELU(tanh) -> Dense.

    Attributes:
      hidden_size: width of the inner layer.
      dtype: compute dtype.
    """

    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x: (B, N, D). Returns: (B, N, D) in `dtype`."""
        h = dense(self.hidden_size, ("embed", "mlp"), self.dtype, "fc1")(x)
        h = sharding.constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.gelu(h, approximate=True)
        return constrain_stream(dense(x.shape[-1], ("mlp", "embed"), self.dtype, "fc2")(h))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block.

    Attributes:
      num_heads: attention heads.
      mlp_ratio: MLP inner width / hidden size.
      dtype: compute dtype.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """Args: x: (B, N, D) tokens; c: (B, D) conditioning. Returns: (B, N, D)."""
        hidden = x.shape[-1]
        x = constrain_stream(x)
        mod = modulation(c, 6, hidden, self.dtype)  # (B, 6, D)
        shift_attn, scale_attn, gate_attn = mod[:, 0], mod[:, 1], mod[:, 2]
        shift_mlp, scale_mlp, gate_mlp = mod[:, 3], mod[:, 4], mod[:, 5]

        h = constrain_stream(modulate(layer_norm(self.dtype, "norm1")(x), shift_attn, scale_attn))
        x = constrain_stream(
            x + gate(Attention(self.num_heads, self.dtype, name="attn")(h), gate_attn)
        )
        h = constrain_stream(modulate(layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp))
        mlp = Mlp(int(hidden * self.mlp_ratio), self.dtype, name="mlp")
        return constrain_stream(x + gate(mlp(h), gate_mlp))


class DiT(nn.Module):
    """DiT velocity network s(x_t, t, d, y).

    Attributes:
      hidden_size: token width D.
      depth: number of blocks.
      num_heads: attention heads.
      patch_size: square patch side p (H and W must divide by p).
      num_classes: real classes; label num_classes is the null class (0 = unconditional).
      mlp_ratio: MLP inner width / D.
      dtype: compute dtype (jnp.float32 or jnp.bfloat16); parameters are float32.
      max_level: the finest step-size level log2(denoise_timesteps); smaller d embed as it.
      remat: 'none', 'dots' or 'full': what each block keeps for the backward pass
        (`adaln.REMAT_POLICIES`); parameters and results are the same for all three.
      time_scale: t is multiplied by it before its sinusoidal features (1000; 1.0 for checkpoints
        of the official code, `tools.import_official`).
    """

    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int
    num_classes: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    max_level: float = 7.0
    remat: str = "none"
    time_scale: float = TIME_SCALE

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        d: jax.Array,
        labels: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        """Predicts the velocity of a batch of images.

        Args:
          x: (B, H, W, C) noisy images x_t.
          t: (B,) float32 times in [0, 1].
          d: (B,) float32 step sizes in [0, 1] (see `embeddings.Conditioning`).
          labels: (B,) int32 labels in [0, num_classes] (num_classes = null class).
          train: unused (no dropout); kept for the common model signature.

        Returns:
          (B, H, W, C) float32 velocity.
        """
        del train
        batch, height, width, channels = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not divisible by config.model.patch_size={p}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"config.model.hidden_size={self.hidden_size} is not divisible by "
                f"config.model.num_heads={self.num_heads}"
            )
        grid_h, grid_w = height // p, width // p
        block = remat_block(DiTBlock, self.remat)
        x = sharding.constrain(x, ("activation_batch", None, None, None))

        tokens = nn.Conv(
            self.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                (None, None, "channels", "embed"),
            ),
            name="patch_embed",
        )(x.astype(self.dtype))  # (B, h, w, D)
        tokens = tokens.reshape(batch, grid_h * grid_w, self.hidden_size)
        position = sincos_position_embedding(grid_h, grid_w, self.hidden_size)
        tokens = constrain_stream(tokens + jnp.asarray(position, self.dtype)[None])

        c = Conditioning(
            self.hidden_size,
            self.num_classes,
            max_level=self.max_level,
            time_scale=self.time_scale,
            dtype=self.dtype,
            name="conditioning",
        )(t, d, labels)
        c = constrain_stream(c)  # (B, D)
        for i in range(self.depth):
            tokens = block(self.num_heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(tokens, c)
        out = FinalLayer(p * p * channels, "patch", self.dtype, name="final_layer")(tokens, c)

        # Unpatchify: (B, h*w, p*p*C) -> (B, h, p, w, p, C) -> (B, H, W, C).
        out = out.reshape(batch, grid_h, grid_w, p, p, channels)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)
        return sharding.constrain(out.astype(jnp.float32), ("activation_batch", None, None, None))
