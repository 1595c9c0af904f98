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

Weights: `load_vae` reads our ``.npz`` (flattened Flax paths, written by `save_vae` or
``python -m shortcut_jax.tools.convert_vae``) or a ``.safetensors`` file directly, in diffusers
names (``diffusion_pytorch_model.safetensors``, including the older ``query/key/value/proj_attn``
attention names), in the original LDM names (``vae-ft-mse-840000-ema-pruned.safetensors``,
``sdxl_vae.safetensors``) or inside a full SD checkpoint (``first_stage_model.*``). Pickled torch
files (``.ckpt``, ``.pt``, ``.bin``) are refused: they are never unpickled.

Typical use::

    vae = load_vae("vae.npz")
    encode_fn = make_encoder(vae, mesh, sample=True)
    latents = encode_fn(images, rng)              # (B, H/8, W/8, 4), scaled
    images = make_decoder(vae, mesh)(latents)     # (B, H, W, 3), not clipped
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from jax import lax

from shortcut_jax import sharding

SD_SCALING_FACTOR = 0.18215
SDXL_SCALING_FACTOR = 0.13025
GROUP_NORM_EPS = 1e-6
FORMAT_VERSION = 1
FORMAT_KEY = "__format_version__"
ARCH_KEY = "__arch__"
SCALING_KEY = "__scaling_factor__"
# Attention over more positions than this is computed in query chunks of this size (memory).
ATTENTION_QUERY_CHUNK = 4096
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_CONVERT = "python -m shortcut_jax.tools.convert_vae"


@dataclasses.dataclass(frozen=True)
class VaeArch:
    """The AutoencoderKL block structure (hashable: usable as a static jit argument).

    Attributes:
      in_channels: image channels into the encoder.
      out_channels: image channels out of the decoder.
      latent_channels: latent channels (4 for SD and SDXL).
      block_out_channels: channels of each encoder block (decoder: reversed).
      layers_per_block: resnets per encoder block (decoder blocks have one more).
      norm_num_groups: GroupNorm groups; must divide every channel count.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32

    def __post_init__(self):
        object.__setattr__(
            self, "block_out_channels", tuple(int(c) for c in self.block_out_channels)
        )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or bad or self.layers_per_block < 1:
            raise ValueError(
                f"VaeArch: block_out_channels={self.block_out_channels} must be non-empty and "
                f"divisible by norm_num_groups={self.norm_num_groups}, layers_per_block="
                f"{self.layers_per_block} >= 1"
            )

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VaeArch:
        return cls(**json.loads(text))


SD_ARCH = VaeArch()


def _dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"VAE dtype={dtype!r} is not allowed; allowed: {sorted(_DTYPES)}")
        return _DTYPES[dtype]
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
      params: the parameter tree (``variables['params']``).
      images: (B, H, W, in_channels) in [-1, 1].
      dtype: compute dtype.

    Returns:
      (mean, std), each (B, H/f, W/f, latent_channels) float32; std = exp(0.5 * clip(logvar,
      -30, 20)).
    """
    module = AutoencoderKL(arch, dtype=_dtype(dtype))
    mean, logvar = module.apply({"params": params}, images, method=AutoencoderKL.encode)
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
      params: the parameter tree.
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
      params: the parameter tree.
      latents: (B, h, w, latent_channels), scaled.
      scaling_factor: the factor the latents were multiplied by.
      dtype: compute dtype.

    Returns:
      (B, h*f, w*f, out_channels) float32, roughly in [-1, 1] but not clipped.
    """
    module = AutoencoderKL(vae_arch, dtype=_dtype(dtype))
    latents = jnp.asarray(latents, jnp.float32) / scaling_factor
    return module.apply({"params": params}, latents, method=AutoencoderKL.decode)


# --------------------------------------------------------------------------------------------
# Loaded VAEs.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Vae:
    """A loaded VAE.

    Attributes:
      arch: the block structure.
      params: nested Flax parameter tree, float32 numpy arrays (`make_encoder` / `make_decoder`
        place them on devices once).
      scaling_factor: latent scaling factor.
      checksum: `params_checksum` of the params (the same for the same weights in any format).
      source: the path loaded from.
      dtype: compute dtype name, 'float32' or 'bfloat16'.
    """

    arch: VaeArch
    params: Any
    scaling_factor: float
    checksum: str
    source: str
    dtype: str = "float32"

    def module(self) -> AutoencoderKL:
        return AutoencoderKL(self.arch, dtype=_dtype(self.dtype))

    @property
    def num_params(self) -> int:
        return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self.params))


@functools.cache
def param_shapes(arch: VaeArch) -> dict[str, tuple[int, ...]]:
    """Flattened parameter paths of `AutoencoderKL` and their shapes, computed from the arch.

    Equal to the shapes of ``AutoencoderKL(arch).init`` (a test pins this) without tracing it.

    Returns:
      ``{'encoder/conv_in/kernel': (3, 3, 3, 128), 'encoder/conv_in/bias': (128,), ...}``;
      kernels HWIO (convs) or (in, out) (attention projections).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cin: int, cout: int, k: int = 3) -> None:
        shapes[f"{prefix}/kernel"], shapes[f"{prefix}/bias"] = (k, k, cin, cout), (cout,)

    def norm(prefix: str, channels: int) -> None:
        shapes[f"{prefix}/scale"] = shapes[f"{prefix}/bias"] = (channels,)

    def resnet(prefix: str, cin: int, cout: int) -> None:
        norm(f"{prefix}/norm1", cin)
        conv(f"{prefix}/conv1", cin, cout)
        norm(f"{prefix}/norm2", cout)
        conv(f"{prefix}/conv2", cout, cout)
        if cin != cout:
            conv(f"{prefix}/conv_shortcut", cin, cout, 1)

    def mid(prefix: str, channels: int) -> None:
        resnet(f"{prefix}/resnets_0", channels, channels)
        norm(f"{prefix}/attention/group_norm", channels)
        for name in ("to_q", "to_k", "to_v", "to_out"):
            shapes[f"{prefix}/attention/{name}/kernel"] = (channels, channels)
            shapes[f"{prefix}/attention/{name}/bias"] = (channels,)
        resnet(f"{prefix}/resnets_1", channels, channels)

    channels, latent = arch.block_out_channels, arch.latent_channels
    last = len(channels) - 1
    conv("encoder/conv_in", arch.in_channels, channels[0])
    previous = channels[0]
    for i, width in enumerate(channels):
        for j in range(arch.layers_per_block):
            resnet(f"encoder/down_blocks_{i}/resnets_{j}", previous if j == 0 else width, width)
        if i != last:
            conv(f"encoder/down_blocks_{i}/downsample", width, width)
        previous = width
    mid("encoder/mid_block", channels[-1])
    norm("encoder/conv_norm_out", channels[-1])
    conv("encoder/conv_out", channels[-1], 2 * latent)
    conv("quant_conv", 2 * latent, 2 * latent, 1)
    conv("post_quant_conv", latent, latent, 1)
    conv("decoder/conv_in", latent, channels[-1])
    mid("decoder/mid_block", channels[-1])
    previous = channels[-1]
    for i, width in enumerate(reversed(channels)):
        for j in range(arch.layers_per_block + 1):
            resnet(f"decoder/up_blocks_{i}/resnets_{j}", previous if j == 0 else width, width)
        if i != last:
            conv(f"decoder/up_blocks_{i}/upsample", width, width)
        previous = width
    norm("decoder/conv_norm_out", channels[0])
    conv("decoder/conv_out", channels[0], arch.out_channels)
    return shapes


def params_checksum(params: Any) -> str:
    """sha256 over sorted flattened paths, shapes and float32 little-endian values."""
    flat = traverse_util.flatten_dict(_as_dict(params), sep="/")
    digest = hashlib.sha256()
    for path in sorted(flat):
        value = np.ascontiguousarray(np.asarray(flat[path], dtype="<f4"))
        digest.update(f"{path}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _as_dict(params: Any) -> dict:
    return params.unfreeze() if hasattr(params, "unfreeze") else dict(params)


def random_vae(arch: VaeArch, seed: int = 0, scaling_factor: float = SD_SCALING_FACTOR) -> Vae:
    """A VAE with torch-like random weights (no compile: drawn with numpy).

    Kernels and conv / dense biases are U(-1/sqrt(fan_in), 1/sqrt(fan_in)); GroupNorm scale 1,
    bias 0. For tests and CPU smoke runs: the latents mean nothing.
    """
    rng = np.random.default_rng(seed)
    shapes = param_shapes(arch)
    flat = {}
    for path in sorted(shapes):
        shape = shapes[path]
        module = path.rsplit("/", 1)[0]
        kernel = shapes.get(f"{module}/kernel")
        if kernel is None:  # GroupNorm
            value = np.ones(shape) if path.endswith("/scale") else np.zeros(shape)
        else:
            bound = 1.0 / np.sqrt(int(np.prod(kernel[:-1])))
            value = rng.uniform(-bound, bound, shape)
        flat[path] = value.astype(np.float32)
    return _make_vae(arch, flat, scaling_factor, f"random_vae(seed={seed})")


def _make_vae(
    arch: VaeArch, flat: dict[str, np.ndarray], scaling_factor: float, source: str, dtype="float32"
) -> Vae:
    params = traverse_util.unflatten_dict(flat, sep="/")
    _dtype(dtype)
    return Vae(arch, params, float(scaling_factor), params_checksum(params), source, dtype)


def save_vae(
    path: str | os.PathLike,
    vae_or_params: Vae | Any,
    arch: VaeArch | None = None,
    scaling_factor: float | None = None,
) -> None:
    """Writes our ``.npz`` (flattened params, arch JSON, scaling factor) atomically.

    Args:
      path: destination (local or ``gs://``); a temporary file in the same directory is renamed.
      vae_or_params: a `Vae`, or a parameter tree (then ``arch`` and ``scaling_factor`` are
        required).
      arch: the block structure (default: the Vae's).
      scaling_factor: default: the Vae's.
    """
    if isinstance(vae_or_params, Vae):
        arch = arch or vae_or_params.arch
        scaling_factor = vae_or_params.scaling_factor if scaling_factor is None else scaling_factor
        params = vae_or_params.params
    else:
        params = vae_or_params
    if arch is None or scaling_factor is None:
        raise ValueError("save_vae: give arch and scaling_factor with a bare parameter tree")
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(_as_dict(params), sep="/").items()
    }
    _check_flat(flat, param_shapes(arch), f"the parameters to save ({arch})")
    file = epath.Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        **flat,
        **{
            FORMAT_KEY: np.asarray(FORMAT_VERSION),
            ARCH_KEY: np.asarray(arch.to_json()),
            SCALING_KEY: np.asarray(float(scaling_factor), np.float64),
        },
    )
    temporary = file.parent / f".{file.name}.tmp-{os.getpid()}"
    try:
        temporary.write_bytes(buffer.getvalue())
        temporary.replace(file)
    finally:
        if temporary.exists():
            temporary.unlink()


def _check_flat(flat: Mapping[str, Any], expected: Mapping[str, tuple], source: str) -> None:
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [
        f"{k} {tuple(np.shape(flat[k]))} (expected {expected[k]})"
        for k in sorted(set(expected) & set(flat))
        if tuple(np.shape(flat[k])) != tuple(expected[k])
    ]
    problems = mismatch_problems(missing, unexpected, wrong)
    if problems:
        raise ValueError(f"{source} does not match the VAE: " + "; ".join(problems))


def mismatch_problems(
    missing: Iterable[str], unexpected: Iterable[str], wrong: Iterable[str], limit: int = 12
) -> list[str]:
    """One phrase per kind of mismatch, each listing (up to ``limit``) names."""
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        names = sorted(names)
        if names:
            more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
            problems.append(f"{len(names)} {label}: " + ", ".join(names[:limit]) + more)
    return problems


# --------------------------------------------------------------------------------------------
# Name mapping: our flat paths <-> diffusers names <-> original LDM names.
# --------------------------------------------------------------------------------------------


def diffusers_name(path: str) -> str:
    """Our flat path -> the diffusers state-dict name.

    'encoder/down_blocks_0/resnets_1/conv1/kernel' ->
    'encoder.down_blocks.0.resnets.1.conv1.weight'; 'downsample' / 'upsample' ->
    'downsamplers.0.conv' / 'upsamplers.0.conv', 'attention' -> 'attentions.0', 'to_out' ->
    'to_out.0'; kernel and scale -> weight.
    """
    parts = []
    for part in path.split("/"):
        part = re.sub(r"^(down_blocks|up_blocks|resnets)_(\d+)$", r"\1.\2", part)
        part = {
            "downsample": "downsamplers.0.conv",
            "upsample": "upsamplers.0.conv",
            "attention": "attentions.0",
            "to_out": "to_out.0",
            "kernel": "weight",
            "scale": "weight",
        }.get(part, part)
        parts.append(part)
    return ".".join(parts)


_LDM_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def ldm_name(name: str, num_blocks: int) -> str:
    """A diffusers name -> the original LDM (CompVis / Stability) name.

    'decoder.up_blocks.{i}' is 'decoder.up.{num_blocks - 1 - i}' (LDM counts up blocks from the
    highest resolution); resnets are 'block.{j}', mid resnets 'mid.block_1' / 'mid.block_2', the
    attention 'mid.attn_1.{norm,q,k,v,proj_out}', 'conv_shortcut' 'nin_shortcut',
    'conv_norm_out' 'norm_out', samplers 'downsample.conv' / 'upsample.conv'.
    """
    name = re.sub(r"\.down_blocks\.(\d+)\.", r".down.\1.", name)
    name = re.sub(
        r"\.up_blocks\.(\d+)\.", lambda m: f".up.{num_blocks - 1 - int(m.group(1))}.", name
    )
    name = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", name)
    name = name.replace(".downsamplers.0.conv.", ".downsample.conv.")
    name = name.replace(".upsamplers.0.conv.", ".upsample.conv.")
    name = name.replace(".mid_block.block.0.", ".mid.block_1.")
    name = name.replace(".mid_block.block.1.", ".mid.block_2.")
    match = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name)
    if match:
        name = f"{match[1]}.mid.attn_1.{_LDM_ATTENTION[match[2]]}.{match[3]}"
    name = name.replace(".conv_shortcut.", ".nin_shortcut.")
    return name.replace(".conv_norm_out.", ".norm_out.")


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:  # (in, out) -> (out, in)
        return (flax_shape[1], flax_shape[0])
    return flax_shape


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if len(flax_shape) == 4:
        value = value.transpose(2, 3, 1, 0)
    elif len(flax_shape) == 2:
        value = value.reshape(value.shape[:2]).T  # LDM attention 1x1 convs: (C, C, 1, 1)
    return np.ascontiguousarray(value)


def to_state_dict(vae: Vae, layout: str = "diffusers") -> dict[str, np.ndarray]:
    """Our params as a torch-layout state dict (numpy), in 'diffusers' or 'ldm' names.

    LDM attention projections are written as 1x1 convs (C, C, 1, 1) like the original files.
    """
    flat = traverse_util.flatten_dict(_as_dict(vae.params), sep="/")
    state = {}
    for path, value in flat.items():
        value = np.asarray(value, np.float32)
        name = diffusers_name(path)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        if layout == "ldm":
            name = ldm_name(name, len(vae.arch.block_out_channels))
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif layout != "diffusers":
            raise ValueError(f"layout={layout!r}; allowed: 'diffusers', 'ldm'")
        state[name] = np.ascontiguousarray(value)
    return state


_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_FULL_CHECKPOINT_PREFIX = "first_stage_model."
_IGNORED_PREFIXES = ("loss.", "model_ema.")  # LDM training leftovers (discriminator, EMA copy)


def _is_ldm(names: Iterable[str]) -> bool:
    return any(re.match(r"^(encoder|decoder)\.(down|up|mid)\.", name) for name in names)


def _infer_arch(state: Mapping[str, np.ndarray], ldm: bool, norm_num_groups: int) -> VaeArch:
    """Reads the block structure from tensor shapes; unreadable fields keep SD defaults."""
    down = r"^encoder\.down\.(\d+)\." if ldm else r"^encoder\.down_blocks\.(\d+)\."
    blocks = sorted({int(m[1]) for k in state if (m := re.match(down, k))})
    fields: dict[str, Any] = {"norm_num_groups": norm_num_groups}
    if ldm:
        resnet, layers = (
            "encoder.down.{}.block.{}.conv1.weight",
            r"^encoder\.down\.0\.block\.(\d+)\.",
        )
    else:
        resnet = "encoder.down_blocks.{}.resnets.{}.conv1.weight"
        layers = r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."
    channels = [state.get(resnet.format(i, 0)) for i in blocks]
    if blocks and blocks == list(range(len(blocks))) and all(c is not None for c in channels):
        fields["block_out_channels"] = tuple(int(c.shape[0]) for c in channels)
        count = len({m[1] for k in state if (m := re.match(layers, k))})
        fields["layers_per_block"] = count or SD_ARCH.layers_per_block
    for key, field, read in (
        ("encoder.conv_in.weight", "in_channels", lambda s: s[1]),
        ("decoder.conv_out.weight", "out_channels", lambda s: s[0]),
        ("decoder.conv_in.weight", "latent_channels", lambda s: s[1]),
        ("quant_conv.weight", "latent_channels", lambda s: s[0] // 2),
        ("post_quant_conv.weight", "latent_channels", lambda s: s[0]),
    ):
        if key in state and np.ndim(state[key]) == 4 and field not in fields:
            fields[field] = int(read(np.shape(state[key])))
    try:
        return VaeArch(**fields)
    except ValueError as error:
        raise ValueError(
            f"the tensor shapes give an impossible VAE: {error} (the number of GroupNorm groups "
            "is not stored in the weights: pass norm_num_groups, --norm_num_groups)"
        ) from None


def from_state_dict(
    state: Mapping[str, np.ndarray], source: str = "the state dict", norm_num_groups: int = 32
) -> tuple[VaeArch, dict[str, np.ndarray]]:
    """A diffusers / LDM / full-SD-checkpoint state dict (numpy) -> (arch, our flat params).

    Args:
      state: tensor name -> array (any float dtype).
      source: what to name in error messages.
      norm_num_groups: not readable from shapes (32 in every SD / SDXL VAE).

    Returns:
      The inferred arch and flat float32 params with exactly the paths of `param_shapes`.

    Raises:
      ValueError: one message listing every missing, unexpected and wrong-shape tensor.
    """
    if any(k.startswith(_FULL_CHECKPOINT_PREFIX) for k in state):
        state = {
            k[len(_FULL_CHECKPOINT_PREFIX) :]: v
            for k, v in state.items()
            if k.startswith(_FULL_CHECKPOINT_PREFIX)
        }
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    ldm = _is_ldm(state)
    if not ldm:  # diffusers < 0.14 attention names
        state = {
            re.sub(
                r"\.attentions\.0\.(query|key|value|proj_attn)\.",
                lambda m: f".attentions.0.{_DEPRECATED_ATTENTION[m[1]]}.",
                k,
            ): v
            for k, v in state.items()
        }
    arch = _infer_arch(state, ldm, norm_num_groups)
    layout = "LDM" if ldm else "diffusers"
    expected = {}
    for path, shape in param_shapes(arch).items():
        name = diffusers_name(path)
        if ldm:
            name = ldm_name(name, len(arch.block_out_channels))
        expected[name] = (path, shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong, flat = [], {}
    for name in sorted(set(expected) & set(state)):
        path, shape = expected[name]
        want, got = _torch_shape(shape), tuple(np.shape(state[name]))
        if got != want and not (len(want) == 2 and got == want + (1, 1)):
            wrong.append(f"{name} {got} (expected {want})")
        else:
            flat[path] = _to_flax(state[name], shape)
    problems = mismatch_problems(missing, unexpected, wrong)
    if problems:
        raise ValueError(
            f"{source} is not an AutoencoderKL with {arch} in {layout} names: "
            + "; ".join(problems)
        )
    return arch, flat


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def convert_command(out: str) -> str:
    return (
        f"{_CONVERT} --from <vae-ft-mse-840000-ema-pruned.safetensors | sdxl_vae.safetensors | "
        f"diffusion_pytorch_model.safetensors | a full SD .safetensors> --out {out} "
        f"[--scaling_factor {SDXL_SCALING_FACTOR} for the SDXL VAE]"
    )


def _file_kind(file: epath.Path) -> str:
    """'npz', 'safetensors' or 'pickle', from the suffix, else from the first bytes."""
    name = file.name.lower()
    if name.endswith(_PICKLE_SUFFIXES):
        return "pickle"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".safetensors"):
        return "safetensors"
    with file.open("rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        with file.open("rb") as f, zipfile.ZipFile(f) as archive:
            if any(n.endswith("data.pkl") for n in archive.namelist()):
                return "pickle"
        return "npz"
    if len(head) > 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise ValueError(
        f"{os.fspath(file)!r} is neither our .npz nor a .safetensors file; "
        + convert_command("vae.npz")
    )


def _read_safetensors(file: epath.Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy (a full SD checkpoint: only first_stage_model.*)."""
    from safetensors import numpy as safetensors_numpy
    from safetensors import safe_open

    path = os.fspath(file)
    if os.path.exists(path):  # local: read only what we need
        with safe_open(path, framework="np") as f:
            names = list(f.keys())
            if any(n.startswith(_FULL_CHECKPOINT_PREFIX) for n in names):
                names = [n for n in names if n.startswith(_FULL_CHECKPOINT_PREFIX)]
            return {n: f.get_tensor(n) for n in names}
    return safetensors_numpy.load(file.read_bytes())


def _read_npz(file: epath.Path) -> tuple[VaeArch, float, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(file.read_bytes()), allow_pickle=False) as archive:
        keys = set(archive.files)
        if not {FORMAT_KEY, ARCH_KEY, SCALING_KEY} <= keys:
            raise ValueError(
                f"{os.fspath(file)!r} is not a converted VAE (.npz without {FORMAT_KEY!r}, "
                f"{ARCH_KEY!r} and {SCALING_KEY!r}); {convert_command(os.fspath(file))}"
            )
        version = int(archive[FORMAT_KEY])
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(file)!r} has format version {version}, this code reads "
                f"{FORMAT_VERSION}; reconvert: {convert_command(os.fspath(file))}"
            )
        arch = VaeArch.from_json(str(archive[ARCH_KEY]))
        scaling_factor = float(archive[SCALING_KEY])
        flat = {
            k: np.asarray(archive[k], np.float32)
            for k in keys - {FORMAT_KEY, ARCH_KEY, SCALING_KEY}
        }
    return arch, scaling_factor, flat


def load_vae(
    path: str | os.PathLike,
    *,
    scaling_factor: float | None = None,
    dtype: str = "float32",
    norm_num_groups: int | None = None,
) -> Vae:
    """Loads a VAE from our ``.npz`` or a ``.safetensors`` file (local or ``gs://``).

    Args:
      path: ``.npz`` from `save_vae` / the converter, or ``.safetensors`` in diffusers names,
        LDM names or a full SD checkpoint (only ``first_stage_model.*`` is read).
      scaling_factor: default: the ``.npz``'s stored factor, or `SD_SCALING_FACTOR` for
        safetensors (pass `SDXL_SCALING_FACTOR` for the SDXL VAE).
      dtype: compute dtype, 'float32' or 'bfloat16'.
      norm_num_groups: GroupNorm groups for safetensors (default 32).

    Returns:
      The `Vae`; params are float32 numpy.

    Raises:
      FileNotFoundError: no such file (the message has the convert command).
      ValueError: a pickle file, another format, or not this VAE (one message listing the
        missing, unexpected and wrong-shape tensors).
    """
    _dtype(dtype)
    file = epath.Path(path)
    source = os.fspath(file)
    if not file.exists():
        out = source if source.lower().endswith(".npz") else "vae.npz"
        raise FileNotFoundError(
            f"VAE weights not found at {source!r}. Download the VAE's .safetensors and convert it "
            "once with:\n  " + convert_command(out)
        )
    kind = _file_kind(file)
    if kind == "pickle":
        raise ValueError(
            f"{source!r} is a pickled torch file; shortcut_jax never unpickles weights. Download "
            "the .safetensors version of the same VAE (every SD / SDXL VAE ships one, e.g. "
            "vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors, "
            "diffusion_pytorch_model.safetensors) and run:\n  " + convert_command("vae.npz")
        )
    if kind == "npz":
        arch, stored_scaling, flat = _read_npz(file)
        if norm_num_groups is not None and norm_num_groups != arch.norm_num_groups:
            arch = dataclasses.replace(arch, norm_num_groups=norm_num_groups)
        _check_flat(flat, param_shapes(arch), repr(source))
        scaling = stored_scaling if scaling_factor is None else scaling_factor
    else:
        state = _read_safetensors(file)
        arch, flat = from_state_dict(state, repr(source), norm_num_groups or 32)
        scaling = SD_SCALING_FACTOR if scaling_factor is None else scaling_factor
    bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"{source!r} has non-finite values in {', '.join(sorted(bad)[:5])}")
    return _make_vae(arch, flat, scaling, source, dtype)


# --------------------------------------------------------------------------------------------
# Compiled encoders and decoders.
# --------------------------------------------------------------------------------------------


def _placement(vae: Vae, mesh: jax.sharding.Mesh | None):
    """(params on devices, batch sharding or None, a function putting a batch there, shards)."""
    if mesh is None:
        return jax.device_put(vae.params), None, (lambda x: x), 1
    shards = sharding.batch_shards(mesh)
    params = jax.device_put(vae.params, sharding.replicated(mesh))

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
      vae: the loaded VAE (params are placed on the devices once, here).
      mesh: None for the default device; else images are split over the mesh batch axes
        ('data', 'fsdp') and params replicated. A batch that the shards do not divide is
        padded (with copies of its last image) and the result cut back.
      sample: posterior samples (``rng`` required) instead of posterior means (``rng`` ignored).

    Returns:
      encode_fn(images (B, H, W, C) numpy or jax, rng) -> (B, H/f, W/f, latent) float32.
    """
    params, batch, put, shards = _placement(vae, mesh)
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
    params, batch, put, shards = _placement(vae, mesh)
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
