"""Feature networks for Frechet distances, and their statistics computed over a device mesh.

A `FeatureNet` is a frozen network plus a pure function ``apply(params, images) -> features``.
Two are provided: the FID InceptionV3 (`evaluators.inception`, 2048-d) and the project's own
MNIST classifier (`evaluators.fd_mnist`, for the offline "FD-MNIST" score); `evaluators.registry`
names them. Every score goes through the same code path:

    images in [-1, 1] --quantize to 8 bits--> feature_net.apply --> features (N, D)
        --> mean and covariance in float64 on the host (`fid.feature_statistics`) --> FD

Images are quantized to the 256 levels a PNG would hold before the features are taken, so a
score computed from arrays equals the one computed from the same samples saved as image files.
On a mesh each chunk of images is split over the batch axes ('data', 'fsdp') and its features are
gathered back, so every process holds the features of the global set (precision and recall need
the features themselves, not only their statistics).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax import preemption, sharding

FeatureFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """A frozen feature network.

    Attributes:
      name: short identifier used in metric names, e.g. 'inception_fid' or 'fd_mnist'.
      dim: feature dimension D.
      params: the network's parameters (a pytree of arrays).
      apply: pure ``apply(params, images) -> features``; images (B, H, W, C) float32 in [-1, 1]
        with C in {1, 3} and any H, W (the network resizes and tiles channels itself); returns
        (B, D) float32.
      batch_size: a good number of images per device per call (memory-bound on CPU).
      weights_digest: `params_digest` of the weights as loaded ('' for ad-hoc networks); it
        keys cached reference features and is recorded with every score, so features of other
        weights are never reused and scores of different networks are never compared.
    """

    name: str
    dim: int
    params: Any
    apply: FeatureFn
    batch_size: int = 64
    weights_digest: str = ""


def params_digest(params: Any) -> str:
    """A 16-hex-digit SHA-256 of a parameter tree: its structure, shapes, dtypes and values.

    Args:
      params: a pytree of host or fully addressable arrays.

    Returns:
      The digest; equal trees give equal digests on every machine.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


class WeightsError(Exception):
    """A feature network's weights are missing, unreadable or not the network's own.

    Every loader raises a subclass with a message naming the file and what to do, so the CLIs
    can report any feature network's problem in one line.
    """


_CHECK_CHUNK = 256


class NonFiniteImagesError(FloatingPointError):
    """Images reaching a feature network hold NaN or inf (a diverged sampler or decoder)."""


def check_finite_images(images: np.ndarray, what: str = "the images") -> None:
    """Raises `NonFiniteImagesError` with the counts if `images` (N, ...) hold NaN or inf.

    Quantization would otherwise turn NaN into mid-grey and inf into black or white, and the
    score would silently describe images nobody generated.
    """
    images = np.asarray(images)
    bad_values = bad_images = 0
    for start in range(0, len(images), _CHECK_CHUNK):  # chunks: no image-sized mask at once
        finite = np.isfinite(images[start : start + _CHECK_CHUNK])
        if not finite.all():
            bad_values += int(finite.size - np.count_nonzero(finite))
            bad_images += int(np.count_nonzero(~finite.reshape(len(finite), -1).all(axis=1)))
    if bad_values:
        raise NonFiniteImagesError(
            non_finite_message(what, bad_values, images.size, bad_images, len(images))
        )


def non_finite_message(
    what: str, bad_values: int, num_values: int, bad_images: int, num_images: int
) -> str:
    """The `NonFiniteImagesError` message: the counts, the likely cause and what to do."""
    return (
        f"{what}: {bad_values:,} of {num_values:,} values are NaN or inf (in {bad_images} of "
        f"{num_images} images); the sampler or the VAE decoder diverged: check the training "
        "losses, or evaluate an earlier --checkpoint_step"
    )


def quantize(images: np.ndarray | jax.Array) -> jax.Array:
    """Rounds images in [-1, 1] to the 256 levels of an 8-bit PNG, staying in [-1, 1].

    Args:
      images: float array of any shape; values outside [-1, 1] are clipped, NaN becomes 0
        (`compute_features` refuses non-finite images before they get here).

    Returns:
      float32 array of the same shape with values k / 127.5 - 1, k in 0..255.
    """
    x = jnp.nan_to_num(jnp.asarray(images, jnp.float32), nan=0.0)
    return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


@functools.lru_cache(maxsize=16)
def _jitted_apply(
    apply: FeatureFn, mesh: jax.sharding.Mesh | None
) -> Callable[[Any, jax.Array], jax.Array]:
    """``apply`` after `quantize`, jitted once per (network, mesh)."""

    def quantized_apply(params: Any, images: jax.Array) -> jax.Array:
        return apply(params, quantize(images)).astype(jnp.float32)

    if mesh is None:
        return jax.jit(quantized_apply)
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        quantized_apply, in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch
    )


def compute_features(
    net: FeatureNet,
    images: np.ndarray,
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features of a set of images, in fixed-size chunks (one compiled program for all).

    Args:
      net: the feature network.
      images: (N, H, W, C) float images in [-1, 1] that every process holds in full (as
        `sampling.sample_batch` returns them).
      mesh: when given, each chunk is split over the mesh's batch axes and the features are
        gathered back to every process; every process must call this together.
      batch_size: images per chunk; default ``net.batch_size`` per batch shard.
      progress: called with the number of images finished after each chunk.

    Returns:
      (N, D) float32 features on the host.

    Raises:
      NonFiniteImagesError: if an image holds NaN or inf (counted before quantization).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must have shape (N, H, W, C) with C in (1, 3), got {images.shape}"
        )
    check_finite_images(images, f"the images given to {net.name}")
    num = images.shape[0]
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    chunk = batch_size if batch_size is not None else net.batch_size * shards
    chunk = sharding.round_up_to_shards(min(int(chunk), max(num, 1)), mesh)
    params = net.params
    if mesh is not None:
        params = jax.device_put(params, sharding.replicated(mesh))
    apply = _jitted_apply(net.apply, mesh)
    outputs = []
    for start in range(0, num, chunk):
        block = images[start : start + chunk]
        valid = block.shape[0]
        if valid < chunk:  # pad the last chunk so it reuses the compiled program
            block = np.pad(block, [(0, chunk - valid)] + [(0, 0)] * 3)
        if mesh is None:
            features = np.asarray(preemption.wait_until_ready(apply(params, jnp.asarray(block))))
        else:
            result = apply(params, sharding.shard_batch(mesh, block))
            features = sharding.gather(preemption.wait_until_ready(result))
        outputs.append(features[:valid])
        if progress is not None:
            progress(valid)
    if not outputs:
        return np.zeros((0, net.dim), np.float32)
    result = np.concatenate(outputs, axis=0)
    if not np.all(np.isfinite(result)):
        raise FloatingPointError(
            f"the {net.name} features contain NaN or inf; the images or the weights are broken"
        )
    return result
