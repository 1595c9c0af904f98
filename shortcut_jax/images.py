"""Image grids and scatter plots for samples: uint8 conversion, grids, labelled grids, PNG files,
and the sample files FID tools read (an .npz streamed member by member, a folder of PNGs).

Everything here runs on the host with numpy, PIL and (for scatter plots) matplotlib's Agg canvas.
The matplotlib figure is built with the object-oriented API (`Figure` + `FigureCanvasAgg`), so no
pyplot state and no global backend is touched.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
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


def quantize_adm(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 as the ADM sample script does: ((x + 1) * 127.5).clip(0, 255),
    then truncated (openai/guided-diffusion scripts/image_sample.py: `.clamp(0, 255).to(uint8)`).

    It truncates where `to_uint8` rounds, so the files FID tools read hold the pixels an ADM
    sample file would. NaN becomes 127 (the value of 0.0); uint8 input is returned unchanged.

    Args:
      images: any shape, float in [-1, 1] (or uint8).

    Returns:
      uint8 array of the same shape.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    scaled = np.array(images, dtype=np.float32)  # the one float copy (chunks can be large)
    np.nan_to_num(scaled, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    scaled += 1.0
    scaled *= 127.5
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


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


class NpzMembers:
    """Writes the arrays of an uncompressed .npz, each streamed into its zip member in chunks.

    The file is what `np.savez` writes (members `NAME.npy`, ZIP_STORED, zip64 for large members),
    so `np.load` and the ADM evaluator read it, but no whole array is ever held in memory.
    """

    def __init__(self, archive: zipfile.ZipFile):
        self._archive = archive
        self._member: Any = None
        self._name = ""
        self._row_shape: tuple[int, ...] = ()
        self._dtype = np.dtype(np.uint8)
        self._rows_left = 0

    def begin(self, name: str, shape: Sequence[int], dtype: Any) -> None:
        """Starts member `name` for an array of `shape` and `dtype`; `write` fills it in order."""
        if self._member is not None:
            raise ValueError(f"member {self._name!r} is not finished")
        dtype = np.dtype(dtype)
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": tuple(int(size) for size in shape),
        }
        self._member = self._archive.open(f"{name}.npy", mode="w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self._member, header)
        self._name, self._dtype = name, dtype
        self._row_shape, self._rows_left = header["shape"][1:], header["shape"][0]

    def write(self, rows: np.ndarray) -> None:
        """Appends `rows` (B, *row_shape) of the member's dtype."""
        rows = np.ascontiguousarray(rows)
        if rows.dtype != self._dtype or rows.shape[1:] != self._row_shape:
            raise ValueError(
                f"member {self._name!r} takes (B, *{self._row_shape}) {self._dtype}, "
                f"got {rows.shape} {rows.dtype}"
            )
        if len(rows) > self._rows_left:
            raise ValueError(f"member {self._name!r}: {len(rows) - self._rows_left} rows too many")
        self._member.write(rows.tobytes())
        self._rows_left -= len(rows)

    def end(self) -> None:
        """Closes the member; all its rows must have been written."""
        self.close_member()
        if self._rows_left:
            raise ValueError(f"member {self._name!r} is missing {self._rows_left} rows")

    def close_member(self) -> None:
        """Closes the open member, if any (after an error too, so the zip file can be closed)."""
        member, self._member = self._member, None
        if member is not None:
            member.close()

    def add(self, name: str, array: np.ndarray) -> None:
        """Writes a whole (small) array as member `name`."""
        array = np.asarray(array)
        self.begin(name, array.shape, array.dtype)
        self.write(array.reshape((array.shape[0] if array.ndim else 1, *array.shape[1:])))
        self.end()


@contextlib.contextmanager
def npz_stream(path: str | os.PathLike) -> Iterator[NpzMembers]:
    """Yields `NpzMembers` writing the .npz at `path` (local or gs://); it appears only when the
    block ends without error (`atomic_files.atomic_path`; a bucket object is uploaded from a
    local temporary file, so it needs local disk, not memory, for the whole file)."""
    with (
        atomic_files.atomic_path(path) as temporary,
        open(temporary, "wb") as handle,
        zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        members = NpzMembers(archive)
        try:
            yield members
        finally:  # an error inside: the temporary file is removed, the error kept
            members.close_member()


def png_name(index: int, num: int) -> str:
    """File name of sample `index` of `num` in a PNG folder: zero-padded, so sorted = in order."""
    return f"{index:0{max(6, len(str(num - 1)))}d}.png"


def png_bytes(image: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image with C in {1, 3, 4} encoded as PNG."""
    buffer = io.BytesIO()
    _to_pil(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class PngFolder:
    """A folder of one PNG per sample (`png_name` order), the input of pytorch-fid and clean-fid.

    Local folders are filled under a temporary sibling name and renamed into place by `finish`
    (an older folder of that name is replaced), so the folder appears whole or not at all. On a
    bucket each file is uploaded whole as it is written; a folder that already holds files is
    refused, so samples of two runs never mix.
    """

    def __init__(self, path: str | os.PathLike, num: int):
        self.path = os.fspath(path).rstrip("/")
        self.num = int(num)
        self.remote = atomic_files.is_remote(self.path)
        if self.remote:
            from etils import epath

            target = epath.Path(self.path)
            if target.exists() and any(target.iterdir()):
                raise FileExistsError(f"{self.path} already holds files: give a new folder")
            self._directory = self.path
        else:
            self._directory = atomic_files.temporary_sibling(self.path)
            os.makedirs(self._directory)

    def write(self, start: int, images: np.ndarray) -> None:
        """Writes `images` (B, H, W, C) uint8 as the samples numbered start, start + 1, ..."""
        for offset, image in enumerate(np.asarray(images)):
            name = os.path.join(self._directory, png_name(start + offset, self.num))
            if self.remote:
                atomic_files.write_bytes(name, png_bytes(image))
            else:
                with open(name, "wb") as file:
                    file.write(png_bytes(image))

    def write_text(self, name: str, text: str) -> None:
        """Writes a text file (e.g. labels.txt) into the folder."""
        atomic_files.write_text(os.path.join(self._directory, name), text)

    def finish(self) -> None:
        """Makes a local folder visible under its name (replacing an older one)."""
        if self.remote:
            return
        old = None
        if os.path.lexists(self.path):
            old = atomic_files.temporary_sibling(self.path)
            os.replace(self.path, old)
        os.replace(self._directory, self.path)
        if old is not None and os.path.isdir(old):
            shutil.rmtree(old)
        elif old is not None:
            os.remove(old)

    def abandon(self) -> None:
        """Removes a local folder's temporary files (after an error)."""
        if not self.remote:
            shutil.rmtree(self._directory, ignore_errors=True)
