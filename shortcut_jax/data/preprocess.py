"""Image preprocessing shared by the image sources and the latent encoder.

`center_crop_adm` is the ImageNet preprocessing of ADM (Dhariwal & Nichol 2021) that DiT and the
shortcut-model paper reuse: while the short side is at least twice the target size, halve the
image with a box filter; then resize so the short side equals the target size with a bicubic
filter; then crop the center square. Images smaller than the target are upscaled by the bicubic
step. Grayscale, palette, RGBA and CMYK images are converted to RGB first (PIL's `convert`, which
drops alpha), as ADM does.

`indexed_images(config)` enumerates the configured image dataset ('tfds', 'image_folder' or
'mnist_embedded') exactly once in a fixed order, for `shortcut_jax.tools.encode_latents`: every
example has a global index in [0, count), and any range [a, b) can be read on its own, so the
work splits into independent shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

# (global index, uint8 (S, S, C) image, label) as yielded by `IndexedImages.read`.
Example = tuple[int, np.ndarray, int]


def center_crop_adm(pil_image: Image.Image, size: int, channels: int = 3) -> np.ndarray:
    """Crops and resizes an image exactly as ADM / DiT preprocess ImageNet.

    Args:
      pil_image: Any PIL image (mode RGB, L, P, RGBA, CMYK, ...), of any size.
      size: Side of the output square.
      channels: 3 for RGB output, 1 for grayscale ('L', converted from the RGB crop's source).

    Returns:
      (size, size, channels) uint8 array.

    Raises:
      ValueError: If `size` < 1, `channels` is not 1 or 3, or the image has a zero side.
    """
    if size < 1:
        raise ValueError(f"size={size} must be a positive integer.")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 (grayscale) or 3 (RGB).")
    if min(pil_image.size) < 1:
        raise ValueError(f"The image has size {pil_image.size}; both sides must be >= 1.")
    image = pil_image.convert("RGB")
    if channels == 1:
        image = image.convert("L")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    # Python's round (half to even), as ADM does; the short side becomes exactly `size`.
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    array = array[top : top + size, left : left + size]
    if array.ndim == 2:
        array = array[..., None]
    return np.ascontiguousarray(array)


def load_image(path: str, size: int, channels: int = 3) -> np.ndarray:
    """Reads an image file and applies `center_crop_adm`.

    Args:
      path: Image file (any format PIL reads).
      size: Output side.
      channels: 1 or 3.

    Returns:
      (size, size, channels) uint8.

    Raises:
      ValueError: Naming the file if it cannot be read or decoded.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return center_crop_adm(image, size, channels)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"Cannot read image file {path}: {error}") from error


def decode_image_bytes(encoded: bytes, size: int, channels: int = 3, name: str = "") -> np.ndarray:
    """Decodes PNG/JPEG/... bytes with PIL and applies `center_crop_adm`: (size, size, C) uint8."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
            return center_crop_adm(image, size, channels)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"Cannot decode image {name or '(bytes)'}: {error}") from error


def parallel_map(
    function: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int = 0
) -> Iterator[Any]:
    """`map(function, items)` on a thread pool, in order, with at most `window` items in flight.

    PIL decodes and resizes with the GIL released, so threads scale over cores. An exception in
    `function` is raised when its item's turn comes.

    Args:
      function: Applied to every item.
      items: Any iterable (consumed lazily).
      workers: Threads (<= 1: no pool, plain map).
      window: Maximum submitted-but-not-yielded items (default 4 * workers).

    Yields:
      function(item) for every item, in the order of `items`.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    window = window or 4 * workers
    with concurrent.futures.ThreadPoolExecutor(workers) as executor:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(executor.submit(function, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def in_background(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
    """Runs `iterator` in a daemon thread, up to `size` items ahead of the consumer.

    An exception in the producer is raised in the consumer. When the consumer stops (closes the
    returned generator), the producer stops too and `iterator` is closed in its thread.

    Args:
      iterator: Any iterator (e.g. a generator that reads and decodes batches).
      size: Items buffered ahead.

    Yields:
      The items of `iterator`, in order.
    """
    items: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # raised in the consumer
            put(error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    threading.Thread(target=produce, daemon=True, name="prefetch").start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def default_workers() -> int:
    """Decoding threads: the machine's cores (at least 2, at most 32)."""
    return max(2, min(32, os.cpu_count() or 1))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class IndexedImages:
    """A dataset enumerated once in a fixed order, readable by index range.

    Attributes:
      count: Number of examples.
      class_names: Names of the classes (label i is class_names[i]); empty if unlabelled.
      description: JSON-able description of the source (name, split or directory, count, and a
        fingerprint), stored in the latent directory's plan and metadata.
      image_size: Side of every image.
      channels: Channels of every image (1 or 3).
      read_range: read_range(a, b) yields the examples with indices a, a+1, ..., b-1 in order.
    """

    count: int
    class_names: tuple[str, ...]
    description: dict[str, Any]
    image_size: int
    channels: int
    read_range: Callable[[int, int], Iterator[Example]]

    def read(self, start: int, stop: int) -> Iterator[Example]:
        """Yields (index, uint8 (S, S, C) image, label) for index in [start, stop).

        Raises:
          ValueError: If the range is not inside [0, count].
        """
        if not 0 <= start <= stop <= self.count:
            raise ValueError(f"Range [{start}, {stop}) is not inside [0, {self.count}].")
        return self.read_range(start, stop)


def indexed_images(config: ml_collections.ConfigDict, channels: int = 3) -> IndexedImages:
    """The configured image dataset, enumerated once (for encoding latents).

    Args:
      config: Experiment config; reads config.data (name, image_size, and the source's fields).
      channels: Channels of the returned images (the VAE's input channels; 3 for the SD VAE).
        Grayscale data is converted to RGB (equal channels) when 3.

    Returns:
      `IndexedImages` whose images are ADM-center-cropped to config.data.image_size ('tfds',
      'image_folder') or, for 'mnist_embedded', the 5,000 embedded digits at data.image_size.

    Raises:
      ValueError: For another `config.data.name` or a bad image size.
    """
    name = config.data.name
    size = config.data.image_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"config.data.image_size={size!r} must be a positive int.")
    if name == "image_folder":
        from shortcut_jax.data import image_folder

        return image_folder.indexed_images(config, channels)
    if name == "tfds":
        return _tfds_indexed_images(config, channels)
    if name == "mnist_embedded":
        return _mnist_indexed_images(size, channels)
    raise ValueError(
        f"config.data.name={name!r} cannot be enumerated for encoding; allowed: "
        "('tfds', 'image_folder', 'mnist_embedded')."
    )


def _mnist_indexed_images(size: int, channels: int) -> IndexedImages:
    from shortcut_jax.data import mnist

    images, labels = mnist.load_mnist(size)
    pixels = to_uint8(images)  # (5000, S, S, 1)
    if channels == 3:
        pixels = np.repeat(pixels, 3, axis=-1)

    def read_range(start: int, stop: int) -> Iterator[Example]:
        for index in range(start, stop):
            yield index, pixels[index], int(labels[index])

    description = {"name": "mnist_embedded", "count": mnist.NUM_EXAMPLES}
    return IndexedImages(
        count=mnist.NUM_EXAMPLES,
        class_names=tuple(str(digit) for digit in range(mnist.NUM_CLASSES)),
        description=description,
        image_size=size,
        channels=channels,
        read_range=read_range,
    )


def _tfds_indexed_images(config: ml_collections.ConfigDict, channels: int) -> IndexedImages:
    """A prepared TFDS split read by index slices (never downloads)."""
    import tensorflow_datasets as tfds

    from shortcut_jax.data import tfds_source

    data = config.data
    name, split, size = data.tfds_name, data.tfds_split, data.image_size
    if not name:
        raise ValueError("config.data.tfds_name is empty; set it to a prepared TFDS dataset.")
    if "[" in split or "+" in split:
        raise ValueError(
            f"config.data.tfds_split={split!r}: encode_latents reads whole splits by index "
            "ranges; use a plain split name such as 'train' or 'validation'."
        )
    builder = tfds.builder(name, data_dir=data.data_dir or None)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"config.data.tfds_name={name!r} has no 'image' feature.")
    manual = name.split("/")[0] in tfds_source._MANUAL_DATASETS or bool(
        builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
    has_label = "label" in features and hasattr(features["label"], "names")
    class_names = tuple(features["label"].names) if has_label else ()

    def dataset(split_spec: str) -> Any:
        try:
            return builder.as_dataset(
                split=split_spec,
                shuffle_files=False,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(add_tfds_id=False),
            )
        except AssertionError as error:  # not prepared: TFDS never downloads here
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root} "
                f"(config.data.data_dir={data.data_dir!r}).\n"
                + tfds_source.prepare_instructions(config, manual=manual)
            ) from error

    known_splits = builder.info.splits
    exact = split in known_splits and known_splits[split].num_examples > 0
    # Without split metadata (e.g. tfds.testing.mock_data) count by reading the split once.
    count = int(known_splits[split].num_examples) if exact else sum(1 for _ in dataset(split))

    def read_range(start: int, stop: int) -> Iterator[Example]:
        if start == stop:
            return
        if exact:
            examples = dataset(f"{split}[{start}:{stop}]")
        else:  # slices are not available without split metadata
            examples = dataset(split).skip(start).take(stop - start)

        def decode(item: tuple[int, dict[str, Any]]) -> Example:
            index, example = item
            image = decode_image_bytes(example["image"], size, channels, f"{name}/{split}[{index}]")
            return index, image, int(example["label"]) if has_label else 0

        index = start
        numbered = enumerate(tfds.as_numpy(examples), start)
        for example in parallel_map(decode, numbered, default_workers()):
            yield example
            index += 1
        if index != stop:
            raise ValueError(
                f"TFDS {name!r} split {split!r} gave {index - start} examples for [{start}, "
                f"{stop}); expected {stop - start}."
            )

    description = {
        "name": "tfds",
        "tfds_name": name,
        "tfds_split": split,
        "version": str(builder.info.version),
        "count": count,
    }
    return IndexedImages(count, class_names, description, size, channels, read_range)


def fingerprint(lines: list[str]) -> str:
    """sha256 hex of newline-joined strings (e.g. a sorted relative file list)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
