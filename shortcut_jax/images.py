"""Image grids and scatter plots for samples: uint8 conversion, grids, labelled grids, PNG files.

Everything here runs on the host with numpy, PIL and (for scatter plots) matplotlib's Agg canvas.
The matplotlib figure is built with the object-oriented API (`Figure` + `FigureCanvasAgg`), so no
pyplot state and no global backend is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shortcut_jax import atomic_files


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Maps images from [-1, 1] floats to [0, 255] uint8, clipping values outside the range.

    NaN becomes mid-gray (so a diverged sample is visible but does not crash the writer), +-inf
    becomes white/black. uint8 input is returned unchanged. A trailing channel axis of size 1 is
    kept.

    Args:
      images: (..., H, W, C) or any shape, float in [-1, 1] (or uint8).

    Returns:
      uint8 array of the same shape.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    images = np.nan_to_num(images.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H, W, 1); (N, H, W, C) unchanged; anything else is an error."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {images.shape}")
    return images


def make_grid(
    images: np.ndarray, ncols: int | None = None, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tiles N images into one image, row by row, with `padding` pixels around and between tiles.

    Output size: H' = rows * (H + padding) + padding, W' = ncols * (W + padding) + padding with
    rows = ceil(N / ncols). Empty cells at the end are filled with `pad_value`.

    Args:
      images: (N, H, W, C) or (N, H, W), float in [-1, 1] or uint8.
      ncols: images per row; None = ceil(sqrt(N)).
      padding: border width in pixels (>= 0).
      pad_value: uint8 value of the border and empty cells.

    Returns:
      (H', W', C) uint8.
    """
    images = to_uint8(_as_nhwc(images))
    num, height, width, channels = images.shape
    if num < 1:
        raise ValueError("make_grid needs at least one image")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    if ncols is None:
        ncols = math.ceil(math.sqrt(num))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1 or None, got {ncols!r}")
    ncols = min(ncols, num)
    nrows = math.ceil(num / ncols)
    grid = np.full(
        (nrows * (height + padding) + padding, ncols * (width + padding) + padding, channels),
        pad_value,
        dtype=np.uint8,
    )
    for index in range(num):
        row, col = divmod(index, ncols)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def _to_pil(array: np.ndarray) -> Image.Image:
    """(H, W, 1|3|4) uint8 -> a PIL image in mode L, RGB or RGBA."""
    if array.shape[-1] == 1:
        return Image.fromarray(array[..., 0])
    if array.shape[-1] in (3, 4):
        return Image.fromarray(array)
    raise ValueError(f"images need 1, 3 or 4 channels to be saved, got {array.shape[-1]}")


def _write_png(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Writes atomically (local paths and gs:// alike), creating the parent directory."""
    with atomic_files.atomic_path(path) as temporary, open(temporary, "wb") as file:
        write(file)


def save_grid(
    path: str | os.PathLike, images: np.ndarray, ncols: int | None = None, padding: int = 2
) -> np.ndarray:
    """Writes `make_grid(images, ncols, padding)` as a PNG, creating parent directories.

    Args:
      path: output file (PNG).
      images: (N, H, W, C) or (N, H, W), float in [-1, 1] or uint8; C in {1, 3, 4}.
      ncols: images per row; None = ceil(sqrt(N)).
      padding: border in pixels.

    Returns:
      The (H', W', C) uint8 grid that was written.
    """
    grid = make_grid(images, ncols=ncols, padding=padding)
    _write_png(path, lambda file: _to_pil(grid).save(file, format="PNG"))
    return grid


def save_labeled_grids(
    path: str | os.PathLike,
    grids: Mapping[str, np.ndarray],
    ncols: int | None = None,
    padding: int = 2,
    scale: int = 1,
) -> np.ndarray:
    """Writes one PNG with a band per entry: the entry's label on the left, its image grid right.

    Typical use: ``{'1 step': x1, '4 steps': x4, '128 steps': x128}`` with the same noise, so the
    bands compare step counts. Each band is `make_grid(images, ncols)`; bands narrower than the
    widest are padded white on the right. The output is RGB.

    Args:
      path: output file (PNG); parent directories are created.
      grids: label -> (N, H, W, C) or (N, H, W) images (float in [-1, 1] or uint8); insertion order.
      ncols: images per row in every band; None = all images of an entry on one row.
      padding: border in pixels between images.
      scale: integer upscaling of the images (nearest neighbour) so small images stay readable.

    Returns:
      The (H', W', 3) uint8 image that was written.
    """
    if not grids:
        raise ValueError("save_labeled_grids needs at least one entry")
    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    bands = []
    for images in grids.values():
        images = _as_nhwc(images)
        band = make_grid(images, ncols=ncols or images.shape[0], padding=padding)
        if scale > 1:
            band = band.repeat(scale, axis=0).repeat(scale, axis=1)
        if band.shape[-1] == 1:
            band = np.repeat(band, 3, axis=-1)
        bands.append(band[..., :3])

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), label, font=font) for label in grids]
    label_width = max(box[2] - box[0] for box in boxes) + 12
    width = label_width + max(band.shape[1] for band in bands)
    heights = [
        max(band.shape[0], box[3] - box[1] + 8) for band, box in zip(bands, boxes, strict=True)
    ]
    canvas = Image.new("RGB", (width, sum(heights)), color=(255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = 0
    for label, band, box, height in zip(grids, bands, boxes, heights, strict=True):
        canvas.paste(Image.fromarray(band), (label_width, top))
        text_top = top + (height - (box[3] - box[1])) // 2 - box[1]
        draw.text((6 - box[0], text_top), label, fill=(0, 0, 0), font=font)
        top += height
    _write_png(path, lambda file: canvas.save(file, format="PNG"))
    return np.asarray(canvas)


def scatter_png(
    path: str | os.PathLike,
    points_by_name: Mapping[str, np.ndarray],
    limits: Sequence[float] | None = None,
    panel_size: float = 3.0,
    point_size: float = 1.0,
) -> None:
    """Writes side-by-side scatter plots of 2-D points, one panel per entry, on shared axes.

    Args:
      path: output file (PNG); parent directories are created.
      points_by_name: panel title -> (N, 2) points (e.g. 'data', '1 step', '128 steps').
      limits: (low, high) for both axes; None = from the 0.5 and 99.5 percentiles of all finite
        points with a 10 % margin (robust to a few diverged samples).
      panel_size: panel width and height in inches.
      point_size: marker area in points^2.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only toy runs plot
    from matplotlib.figure import Figure

    if not points_by_name:
        raise ValueError("scatter_png needs at least one entry")
    arrays = {}
    for name, points in points_by_name.items():
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"points for {name!r} must have shape (N, 2), got {points.shape}")
        arrays[name] = points
    if limits is None:
        finite = np.concatenate([p[np.isfinite(p).all(axis=1)] for p in arrays.values()])
        if finite.size == 0:
            low, high = -1.0, 1.0
        else:
            low, high = np.percentile(finite, [0.5, 99.5])
            margin = 0.1 * max(high - low, 1e-3)
            low, high = float(low - margin), float(high + margin)
    else:
        low, high = float(limits[0]), float(limits[1])

    figure = Figure(figsize=(panel_size * len(arrays), panel_size), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(arrays), squeeze=False)[0]
    for ax, (name, points) in zip(axes, arrays.items(), strict=True):
        ax.scatter(points[:, 0], points[:, 1], s=point_size, alpha=0.5, linewidths=0)
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal")
        ax.set_title(name)
    figure.tight_layout()
    _write_png(path, lambda file: figure.savefig(file, format="png"))
