"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax, and its weight files.

Architecture (diffusers ``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``; the
LDM ``autoencoder_kl`` of the original Stable Diffusion code), NHWC:

- encoder: ``conv_in`` 3x3 -> one down block per entry of ``block_out_channels``
  (``layers_per_block`` resnets, then, except in the last block, an asymmetric zero pad of one
  row at the bottom and one column at the right and a 3x3 stride-2 conv) -> mid block (resnet,
  single-head self-attention over all positions with a residual, resnet) -> GroupNorm -> SiLU
  -> ``conv_out`` 3x3 to ``2 * latent_channels`` (mean and log-variance, "double_z");
- ``quant_conv`` 1x1 (2 latent -> 2 latent) after the encoder, ``post_quant_conv`` 1x1 before
  the decoder;
- decoder: ``conv_in`` 3x3 -> mid block -> one up block per reversed channel count
  (``layers_per_block + 1`` resnets, then, except in the last block, nearest x2 and a 3x3 conv)
  -> GroupNorm -> SiLU -> ``conv_out`` 3x3;
- resnet: GroupNorm -> SiLU -> conv 3x3 -> GroupNorm -> SiLU -> conv 3x3, plus the input (through
  a 1x1 ``conv_shortcut`` when the channel count changes). GroupNorm eps is 1e-6 everywhere.

Parameters are float32. With ``dtype=bfloat16`` convolutions, projections and residual sums run
in bfloat16 while GroupNorm statistics and the attention softmax run in float32; outputs are
float32 either way. Latents here are UNSCALED in the module (`AutoencoderKL.encode` and
``decode``); the pure functions `encode` / `decode` apply the scaling factor (0.18215 for SD
1.x/2.x VAEs, 0.13025 for the SDXL VAE) as diffusers pipelines do.

Weights: `load_vae` / `save_vae`, `VaeArch`, `Vae` and the rest of the parameter side live in
`shortcut_jax.models.vae_weights` (which never imports this module) and are re-exported here.
`encode` / `encode_moments` use only the encoder half of the parameters (`encoder_params`),
`decode` only the decoder half (`decoder_params`); each accepts the full tree or its half, so
the train step can carry the encoder alone and sampling the decoder alone.

Typical use::

    vae = load_vae("vae.npz")
    encode_fn = make_encoder(vae, mesh, sample=True)
    latents = encode_fn(images, rng)              # (B, H/8, W/8, 4), scaled
    images = make_decoder(vae, mesh)(latents)     # (B, H, W, 3), not clipped
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from shortcut_jax import sharding
from shortcut_jax.models.vae_weights import (
    ARCH_KEY,
    DECODER_GROUPS,
    DTYPES,
    ENCODER_GROUPS,
    FORMAT_KEY,
    FORMAT_VERSION,
    SCALING_KEY,
    SD_ARCH,
    SD_SCALING_FACTOR,
    SDXL_SCALING_FACTOR,
    Vae,
    VaeArch,
    check_dtype,
    convert_command,
    decoder_params,
    diffusers_name,
    encoder_params,
    from_state_dict,
    ldm_name,
    load_vae,
    mismatch_problems,
    param_shapes,
    params_checksum,
    random_vae,
    save_vae,
    to_state_dict,
)

# The weights API of vae_weights is re-exported here: `vae.load_vae(...)`, `vae.VaeArch`, ...
__all__ = [
    "ARCH_KEY",
    "ATTENTION_QUERY_CHUNK",
    "DECODER_GROUPS",
    "DTYPES",
    "ENCODER_GROUPS",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "GROUP_NORM_EPS",
    "SCALING_KEY",
    "SD_ARCH",
    "SD_SCALING_FACTOR",
    "SDXL_SCALING_FACTOR",
    "AutoencoderKL",
    "Decoder",
    "Encoder",
    "Vae",
    "VaeArch",
    "check_dtype",
    "convert_command",
    "decode",
    "decoder_params",
    "diffusers_name",
    "encode",
    "encode_moments",
    "encoder_params",
    "from_state_dict",
    "ldm_name",
    "load_vae",
    "make_decoder",
    "make_encoder",
    "mismatch_problems",
    "param_shapes",
    "params_checksum",
    "random_vae",
    "save_vae",
    "to_state_dict",
]

GROUP_NORM_EPS = 1e-6
# Attention over more positions than this is computed in query chunks of this size (memory).
ATTENTION_QUERY_CHUNK = 4096


def _dtype(dtype: Any) -> Any:
    """A compute dtype name ('float32', 'bfloat16': `check_dtype`) or dtype -> the jnp dtype."""
    if isinstance(dtype, str):
        return jnp.dtype(check_dtype(dtype))
    return jnp.dtype(dtype)


# --------------------------------------------------------------------------------------------
# Network.
# --------------------------------------------------------------------------------------------

# torch's default init (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_like = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv(nn.Module):
    """2-D convolution with bias; float32 params, computed in ``dtype``.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      strides: stride in both spatial dimensions.
      padding: ((top, bottom), (left, right)); default: "same" for odd kernels.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H', W', features)."""
        k = self.kernel_size
        kernel = self.param("kernel", _torch_like, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        padding = self.padding or ((k // 2, k // 2), (k // 2, k // 2))
        y = lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.strides, self.strides),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        return y + bias.astype(self.dtype)


class Dense(nn.Module):
    """Linear layer (kernel (C_in, features)) with bias; float32 params, computed in ``dtype``."""

    features: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., C_in) -> (..., features)."""
        kernel = self.param("kernel", _torch_like, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """GroupNorm (eps 1e-6) with float32 statistics and affine, output cast to ``dtype``.

    Attributes:
      num_groups: groups over the channel axis.
      activation: apply SiLU (in float32) after the affine transform.
    """

    num_groups: int = 32
    activation: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, ..., C) -> (B, ..., C), normalised over the spatial axes and each group."""
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        grouped = x.astype(jnp.float32).reshape(
            x.shape[0], -1, self.num_groups, channels // self.num_groups
        )
        mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
        centred = grouped - mean
        variance = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
        y = (centred * lax.rsqrt(variance + GROUP_NORM_EPS)).reshape(x.shape) * scale + bias
        if self.activation:
            y = nn.silu(y)
        return y.astype(self.dtype)


class ResnetBlock(nn.Module):
    """Pre-norm residual block: (GroupNorm, SiLU, conv 3x3) twice, plus a 1x1 shortcut if needed."""

    features: int
    num_groups: int = 32
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H, W, features)."""
        conv = functools.partial(Conv, self.features, dtype=self.dtype, precision=self.precision)
        norm = functools.partial(GroupNorm, self.num_groups, activation=True, dtype=self.dtype)
        h = conv(name="conv1")(norm(name="norm1")(x))
        h = conv(name="conv2")(norm(name="norm2")(h))
        if x.shape[-1] != self.features:
            x = conv(kernel_size=1, name="conv_shortcut")(x)
        return x.astype(self.dtype) + h


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """Single-head softmax(q k^T / sqrt(C)) v with float32 logits and softmax.

    Args:
      q, k, v: (B, N, C) in the compute dtype.
      chunk: queries per chunk when N is larger (bounds the (chunk, N) logits in memory).

    Returns:
      (B, N, C) in the dtype of v.
    """
    scale = q.shape[-1] ** -0.5

    def attend(queries: jax.Array) -> jax.Array:
        logits = jnp.einsum("bqc,bkc->bqk", queries, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * scale, axis=-1)
        return jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)

    batch, tokens, channels = q.shape
    if tokens <= chunk or tokens % chunk:
        return attend(q)
    chunks = q.reshape(batch, tokens // chunk, chunk, channels).swapaxes(0, 1)
    out = lax.map(attend, chunks)  # (N / chunk, B, chunk, C), one chunk at a time
    return out.swapaxes(0, 1).reshape(batch, tokens, channels)


class Attention(nn.Module):
    """Single-head self-attention over all positions, with GroupNorm in front and a residual."""

    num_groups: int = 32
    dtype: Any = jnp.float32
    precision: Any = None
    query_chunk: int = ATTENTION_QUERY_CHUNK

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        dense = functools.partial(Dense, channels, dtype=self.dtype, precision=self.precision)
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="group_norm")(x)
        h = h.reshape(batch, height * width, channels)
        q, k, v = dense(name="to_q")(h), dense(name="to_k")(h), dense(name="to_v")(h)
        h = dense(name="to_out")(_attention(q, k, v, self.query_chunk))
        return x.astype(self.dtype) + h.reshape(x.shape)


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution."""

    num_groups: int = 32
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        kw = dict(num_groups=self.num_groups, dtype=self.dtype, precision=self.precision)
        x = ResnetBlock(x.shape[-1], **kw, name="resnets_0")(x)
        x = Attention(**kw, name="attention")(x)
        return ResnetBlock(x.shape[-1], **kw, name="resnets_1")(x)


class DownBlock(nn.Module):
    """``layers_per_block`` resnets, then (unless last) pad (0, 1, 0, 1) and a stride-2 conv 3x3."""

    features: int
    num_layers: int
    downsample: bool
    num_groups: int = 32
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H/2, W/2, features), or (B, H, W, features) for the last."""
        kw = dict(num_groups=self.num_groups, dtype=self.dtype, precision=self.precision)
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, **kw, name=f"resnets_{j}")(x)
        if self.downsample:
            x = Conv(
                self.features,
                strides=2,
                padding=((0, 1), (0, 1)),
                dtype=self.dtype,
                precision=self.precision,
                name="downsample",
            )(x)
        return x


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)


class UpBlock(nn.Module):
    """``layers_per_block + 1`` resnets, then (unless last) nearest x2 and a conv 3x3."""

    features: int
    num_layers: int
    upsample: bool
    num_groups: int = 32
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, 2H, 2W, features), or (B, H, W, features) for the last."""
        kw = dict(num_groups=self.num_groups, dtype=self.dtype, precision=self.precision)
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, **kw, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Conv(self.features, dtype=self.dtype, precision=self.precision, name="upsample")(
                _upsample_nearest_2x(x)
            )
        return x


class Encoder(nn.Module):
    """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""

    arch: VaeArch
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        arch = self.arch
        conv = functools.partial(Conv, dtype=self.dtype, precision=self.precision)
        kw = dict(num_groups=arch.norm_num_groups, dtype=self.dtype, precision=self.precision)
        x = conv(arch.block_out_channels[0], name="conv_in")(x)
        last = len(arch.block_out_channels) - 1
        for i, channels in enumerate(arch.block_out_channels):
            block = DownBlock(
                channels, arch.layers_per_block, i != last, **kw, name=f"down_blocks_{i}"
            )
            x = block(x)
        x = MidBlock(**kw, name="mid_block")(x)
        x = GroupNorm(arch.norm_num_groups, True, self.dtype, name="conv_norm_out")(x)
        return conv(2 * arch.latent_channels, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    arch: VaeArch
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        arch = self.arch
        conv = functools.partial(Conv, dtype=self.dtype, precision=self.precision)
        kw = dict(num_groups=arch.norm_num_groups, dtype=self.dtype, precision=self.precision)
        x = conv(arch.block_out_channels[-1], name="conv_in")(x)
        x = MidBlock(**kw, name="mid_block")(x)
        channels_up = tuple(reversed(arch.block_out_channels))
        last = len(channels_up) - 1
        for i, channels in enumerate(channels_up):
            block = UpBlock(
                channels, arch.layers_per_block + 1, i != last, **kw, name=f"up_blocks_{i}"
            )
            x = block(x)
        x = GroupNorm(arch.norm_num_groups, True, self.dtype, name="conv_norm_out")(x)
        return conv(arch.out_channels, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """The SD VAE. Params are float32; ``dtype`` is the compute dtype (float32 or bfloat16).

    Attributes:
      arch: the block structure.
      dtype: compute dtype.
      precision: convolution / matmul precision (None: the backend default; on TPU pass
        ``lax.Precision.HIGHEST`` for true float32 convolutions).
    """

    arch: VaeArch = SD_ARCH
    dtype: Any = jnp.float32
    precision: Any = None

    def setup(self):
        dtype = _dtype(self.dtype)
        kw = dict(dtype=dtype, precision=self.precision)
        self.encoder = Encoder(self.arch, **kw)
        self.quant_conv = Conv(2 * self.arch.latent_channels, kernel_size=1, **kw)
        self.post_quant_conv = Conv(self.arch.latent_channels, kernel_size=1, **kw)
        self.decoder = Decoder(self.arch, **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior moments of images.

        Args:
          images: (B, H, W, in_channels) in [-1, 1]; H and W divisible by the downsample factor.

        Returns:
          (mean, logvar), each (B, H/f, W/f, latent_channels) float32, unscaled, logvar unclipped.
        """
        factor = self.arch.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.arch.in_channels:
            raise ValueError(
                f"VAE encode: images must be (B, H, W, {self.arch.in_channels}), got {images.shape}"
            )
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(
                f"VAE encode: image height and width {images.shape[1:3]} must be divisible by the "
                f"downsample factor {factor}"
            )
        moments = self.quant_conv(self.encoder(images.astype(_dtype(self.dtype))))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, logvar

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images of unscaled latents.

        Args:
          latents: (B, h, w, latent_channels), unscaled.

        Returns:
          (B, h*f, w*f, out_channels) float32, not clipped.
        """
        if latents.ndim != 4 or latents.shape[-1] != self.arch.latent_channels:
            raise ValueError(
                f"VAE decode: latents must be (B, h, w, {self.arch.latent_channels}), got "
                f"{latents.shape}"
            )
        x = self.post_quant_conv(latents.astype(_dtype(self.dtype)))
        return self.decoder(x).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """decode(encode(images) mean): initialises every parameter."""
        return self.decode(self.encode(images)[0])


# --------------------------------------------------------------------------------------------
# Pure functions.
# --------------------------------------------------------------------------------------------


def encode_moments(
    arch: VaeArch, params: Any, images: jax.Array, dtype: Any = "float32"
) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and std of images (unscaled), as diffusers' DiagonalGaussianDistribution.

    Args:
      arch: the block structure.
      params: the parameter tree (``variables['params']``), full or its `encoder_params` half.
      images: (B, H, W, in_channels) in [-1, 1].
      dtype: compute dtype ('float32' or 'bfloat16').

    Returns:
      (mean, std), each (B, H/f, W/f, latent_channels) float32; std = exp(0.5 * clip(logvar,
      -30, 20)).
    """
    module = AutoencoderKL(arch, dtype=_dtype(dtype))
    variables = {"params": encoder_params(params)}
    mean, logvar = module.apply(variables, images, method=AutoencoderKL.encode)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))


def encode(
    vae_arch: VaeArch,
    params: Any,
    images: jax.Array,
    rng: jax.Array | None = None,
    *,
    scaling_factor: float,
    dtype: Any = "float32",
) -> jax.Array:
    """Scaled latents of images: the posterior mean, or a posterior sample if ``rng`` is given.

    Args:
      vae_arch: the block structure.
      params: the parameter tree, full or its `encoder_params` half.
      images: (B, H, W, in_channels) in [-1, 1].
      rng: PRNG key for mean + std * N(0, 1), or None for the mean.
      scaling_factor: multiplies the latents (0.18215 SD, 0.13025 SDXL).
      dtype: compute dtype.

    Returns:
      (B, H/f, W/f, latent_channels) float32.
    """
    mean, std = encode_moments(vae_arch, params, images, dtype)
    if rng is not None:
        mean = mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
    return mean * scaling_factor


def decode(
    vae_arch: VaeArch,
    params: Any,
    latents: jax.Array,
    *,
    scaling_factor: float,
    dtype: Any = "float32",
) -> jax.Array:
    """Images of scaled latents (divided by ``scaling_factor`` first).

    Args:
      vae_arch: the block structure.
      params: the parameter tree, full or its `decoder_params` half.
      latents: (B, h, w, latent_channels), scaled.
      scaling_factor: the factor the latents were multiplied by.
      dtype: compute dtype.

    Returns:
      (B, h*f, w*f, out_channels) float32, roughly in [-1, 1] but not clipped.
    """
    module = AutoencoderKL(vae_arch, dtype=_dtype(dtype))
    latents = jnp.asarray(latents, jnp.float32) / scaling_factor
    variables = {"params": decoder_params(params)}
    return module.apply(variables, latents, method=AutoencoderKL.decode)


# --------------------------------------------------------------------------------------------
# Compiled encoders and decoders.
# --------------------------------------------------------------------------------------------


def _placement(params: Any, mesh: jax.sharding.Mesh | None):
    """(params on devices, batch sharding or None, a function putting a batch there, shards)."""
    if mesh is None:
        return jax.device_put(params), None, (lambda x: x), 1
    shards = sharding.batch_shards(mesh)
    params = jax.device_put(params, sharding.replicated(mesh))

    def put(x):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding.batch_sharding(mesh))
        return sharding.shard_batch(mesh, np.asarray(x, np.float32))

    return params, sharding.batch_sharding(mesh), put, shards


def _padded(x: Any, multiple: int) -> tuple[Any, int]:
    """x with its batch padded to a multiple (copies of the last row); the original count."""
    count = x.shape[0]
    extra = -count % multiple
    if extra:
        xp = jnp if isinstance(x, jax.Array) else np
        x = xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)])
    return x, count


def make_encoder(
    vae: Vae, mesh: jax.sharding.Mesh | None, *, sample: bool
) -> Callable[..., jax.Array]:
    """A jitted ``encode_fn(images, rng=None) -> latents`` (scaled) for ``vae``.

    Args:
      vae: the loaded VAE (its encoder half is placed on the devices once, here).
      mesh: None for the default device; else images are split over the mesh batch axes
        ('data', 'fsdp') and params replicated. A batch that the shards do not divide is
        padded (with copies of its last image) and the result cut back.
      sample: posterior samples (``rng`` required) instead of posterior means (``rng`` ignored).

    Returns:
      encode_fn(images (B, H, W, C) numpy or jax, rng) -> (B, H/f, W/f, latent) float32.
    """
    params, batch, put, shards = _placement(vae.encoder_params, mesh)
    arch, scaling, dtype = vae.arch, vae.scaling_factor, vae.dtype

    def moments_to_latents(params, images, rng):
        return encode(arch, params, images, rng, scaling_factor=scaling, dtype=dtype)

    if sample:
        kwargs = {}
        if mesh is not None:
            replicated = sharding.replicated(mesh)
            kwargs = dict(in_shardings=(replicated, batch, replicated), out_shardings=batch)
        jitted = jax.jit(moments_to_latents, **kwargs)
    else:
        kwargs = {}
        if mesh is not None:
            kwargs = dict(in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)
        jitted = jax.jit(lambda params, images: moments_to_latents(params, images, None), **kwargs)

    def encode_fn(images: Any, rng: jax.Array | None = None) -> jax.Array:
        images, count = _padded(images, shards)
        if sample:
            if rng is None:
                raise ValueError("make_encoder(sample=True): encode_fn needs an rng")
            if mesh is not None:
                rng = jax.device_put(rng, sharding.replicated(mesh))
            latents = jitted(params, put(images), rng)
        else:
            latents = jitted(params, put(images))
        return latents if latents.shape[0] == count else latents[:count]

    return encode_fn


def make_decoder(vae: Vae, mesh: jax.sharding.Mesh | None) -> Callable[[Any], jax.Array]:
    """A jitted ``decode_fn(latents) -> images`` (scaled latents in; sharded like `make_encoder`).

    Returns:
      decode_fn(latents (B, h, w, latent) numpy or jax) -> (B, h*f, w*f, out_channels) float32,
      not clipped.
    """
    params, batch, put, shards = _placement(vae.decoder_params, mesh)
    arch, scaling, dtype = vae.arch, vae.scaling_factor, vae.dtype

    def decode_latents(params, latents):
        return decode(arch, params, latents, scaling_factor=scaling, dtype=dtype)

    kwargs = {}
    if mesh is not None:
        kwargs = dict(in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)
    jitted = jax.jit(decode_latents, **kwargs)

    def decode_fn(latents: Any) -> jax.Array:
        latents, count = _padded(latents, shards)
        images = jitted(params, put(latents))
        return images if images.shape[0] == count else images[:count]

    return decode_fn
