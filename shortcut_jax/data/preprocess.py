"""Image datasets enumerated by index, and the pixel preprocessing every image source shares.

This module owns what the image sources have in common, and imports none of them (only the leaf
`mnist` module), so there is no import circle:

  * Pixels. `center_crop_adm` is the ImageNet preprocessing of ADM (Dhariwal & Nichol 2021) that
    DiT and the shortcut-model paper reuse: while the short side is at least twice the target size,
    halve the image with a box filter; then resize so the short side equals the target size with a
    bicubic filter; then crop the center square. Images smaller than the target are upscaled by the
    bicubic step. Grayscale, palette, RGBA and CMYK images are converted to RGB first (PIL's
    `convert`, which drops alpha), as ADM does.
  * Random access. `indexed_images(config)` opens the configured image dataset ('tfds',
    'image_folder' or 'mnist_embedded') as an `IndexedImages`: `count` examples with a fixed global
    index, `load(i)` reads any one of them. Precomputed latents (`tools/encode_latents`, through
    `read`) and online training (`image_folder.IndexedImageSource`, which serves both the
    image-folder and the TFDS source) read the same `load`, so one image gives one array whichever
    way it is read.
  * Threads. `parallel_map` and `in_background`: PIL and numpy release the GIL, so decoding scales
    over cores with threads.

Image folders may live in a bucket (`gs://...`): listing and reading go through `etils.epath`
(fsspec/gcsfs; the package sets EPATH_USE_TF=false). TFDS datasets are read with
`tfds.data_source` random access, which needs an ArrayRecord (or Parquet) build; a TFRecord build
is refused with the command that converts it. Reading a prepared ArrayRecord build needs no
TensorFlow; building or converting one does (`TFDS_EXTRA`), and an error that TFDS raises for
want of TensorFlow is re-raised naming that extra.
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
from etils import epath
from PIL import Image

from shortcut_jax.data import mnist

# (global index, uint8 (S, S, C) image, label) as yielded by `IndexedImages.read`.
Example = tuple[int, np.ndarray, int]

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)  # fmt: skip
FOLDER_LAYOUT = (
    "expected image_dir/<class_name>/**/<image> (one folder per class) or image files directly "
    "in image_dir (unconditional)"
)
# Datasets whose source files must be downloaded by hand before `tfds build` (plus any builder
# declaring MANUAL_DOWNLOAD_INSTRUCTIONS).
MANUAL_TFDS_DATASETS = ("imagenet2012", "celeb_a_hq")
# TensorFlow is not a dependency: building a TFDS dataset (or converting it) needs this extra.
TFDS_EXTRA = 'pip install -e ".[tf]"'
BUILD_NEEDS = (
    f"(building needs TensorFlow: {TFDS_EXTRA}, or any TensorFlow already installed; the "
    "tfds command-line tool also imports apache-beam and mlcroissant: "
    "pip install apache-beam mlcroissant)"
)


# --- Pixels ------------------------------------------------------------------------------------


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
    """Reads an image file (local or gs://, through etils.epath) and applies `center_crop_adm`.

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
        encoded = epath.Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"Cannot read image file {path}: {error}") from error
    return decode_image_bytes(encoded, size, channels, f"file {path}")


def decode_image_bytes(encoded: bytes, size: int, channels: int = 3, name: str = "") -> np.ndarray:
    """Decodes PNG/JPEG/... bytes with PIL and applies `center_crop_adm`: (size, size, C) uint8."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
            return center_crop_adm(image, size, channels)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"Cannot read image {name or '(bytes)'}: {error}") from error


# --- Threads -----------------------------------------------------------------------------------


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


# --- Datasets by index -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexedImages:
    """A dataset enumerated once in a fixed order, readable at any index.

    Attributes:
      count: Number of examples.
      class_names: Names of the classes (label i is class_names[i]); empty if unlabelled.
      description: JSON-able description of the source (name, split or directory, count, and a
        fingerprint), stored in the latent directory's plan and metadata.
      image_size: Side of every image.
      channels: Channels of every image (1 or 3).
      load: load(i) -> (uint8 (S, S, C) image, label) of example i in [0, count); thread-safe.
    """

    count: int
    class_names: tuple[str, ...]
    description: dict[str, Any]
    image_size: int
    channels: int
    load: Callable[[int], tuple[np.ndarray, int]]

    def read(self, start: int, stop: int) -> Iterator[Example]:
        """Yields (index, uint8 (S, S, C) image, label) for index in [start, stop), on threads.

        Raises:
          ValueError: If the range is not inside [0, count].
        """
        if not 0 <= start <= stop <= self.count:
            raise ValueError(f"Range [{start}, {stop}) is not inside [0, {self.count}].")
        return parallel_map(self._example, range(start, stop), default_workers())

    def _example(self, index: int) -> Example:
        image, label = self.load(index)
        return index, image, label


def indexed_images(config: ml_collections.ConfigDict, channels: int = 3) -> IndexedImages:
    """The configured image dataset, enumerated once (for encoding latents and for training).

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
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"config.data.image_size={size!r} must be a positive int.")
    if name == "image_folder":
        return folder_images(config, channels)
    if name == "tfds":
        return tfds_images(config, channels)
    if name == "mnist_embedded":
        return _mnist_images(size, channels)
    raise ValueError(
        f"config.data.name={name!r} cannot be enumerated for encoding; allowed: "
        "('tfds', 'image_folder', 'mnist_embedded')."
    )


def _mnist_images(size: int, channels: int) -> IndexedImages:
    images, labels = mnist.load_mnist(size)
    pixels = to_uint8(images)  # (5000, S, S, 1)
    if channels == 3:
        pixels = np.repeat(pixels, 3, axis=-1)

    def load(index: int) -> tuple[np.ndarray, int]:
        return pixels[index], int(labels[index])

    return IndexedImages(
        count=mnist.NUM_EXAMPLES,
        class_names=tuple(str(digit) for digit in range(mnist.NUM_CLASSES)),
        description={"name": "mnist_embedded", "count": mnist.NUM_EXAMPLES},
        image_size=size,
        channels=channels,
        load=load,
    )


# --- Image folders (local or gs://) ------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(image_dir: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk (following symlinks) for local folders, etils.epath's walk for bucket paths."""
    if "://" not in image_dir:
        yield from os.walk(image_dir, followlinks=True)
        return
    for root, directories, names in epath.Path(image_dir).walk():
        yield str(root), directories, names


def _list_tree(image_dir: str) -> tuple[list[str], list[str]]:
    """Sorted top-level folder names and sorted '/'-relative paths of every image below."""
    top: str | None = None
    folders: list[str] = []
    files: list[str] = []
    for root, directories, names in _walk(image_dir):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        root = root.replace(os.sep, "/").rstrip("/")
        if top is None:  # walks are top-down: the first root is image_dir (as the backend names it)
            top, folders = root, list(directories)
        relative = root[len(top) :].strip("/")
        files.extend(
            f"{relative}/{name}" if relative else name for name in names if _is_image(name)
        )
    return folders, sorted(files)


def scan_image_dir(image_dir: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Lists the examples of an image folder (a local path or gs://...) in their fixed order.

    Args:
      image_dir: The folder (see `image_folder` for the layout).

    Returns:
      files: Paths relative to `image_dir` ('/'-separated), class by class, sorted within a class.
      labels: (N,) int32 class index of every file (all 0 without class folders).
      class_names: Sorted class folder names; () for an unconditional folder.

    Raises:
      FileNotFoundError: If the folder does not exist or holds no images.
      ValueError: If images sit beside class folders, or a class folder has no images.
    """
    if not image_dir or not epath.Path(image_dir).is_dir():
        raise FileNotFoundError(
            f"config.data.image_dir={image_dir!r} is not a directory; {FOLDER_LAYOUT}."
        )
    class_names, files = _list_tree(image_dir)
    top_images = [path for path in files if "/" not in path]
    if not class_names:
        if not top_images:
            raise FileNotFoundError(
                f"config.data.image_dir={image_dir!r} has no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); {FOLDER_LAYOUT}."
            )
        return top_images, np.zeros(len(top_images), np.int32), ()
    if top_images:
        raise ValueError(
            f"config.data.image_dir={image_dir!r} has both class folders {class_names[:3]} "
            f"and image files at the top level ({top_images[0]!r}, ...); {FOLDER_LAYOUT}."
        )
    by_class: dict[str, list[str]] = {name: [] for name in class_names}
    for path in files:
        by_class[path.split("/", 1)[0]].append(path)
    ordered: list[str] = []
    labels: list[np.ndarray] = []
    for label, class_name in enumerate(class_names):
        if not by_class[class_name]:
            raise ValueError(
                f"Class folder {class_name!r} in config.data.image_dir={image_dir!r} has no image "
                f"files ({', '.join(IMAGE_EXTENSIONS)}); {FOLDER_LAYOUT}."
            )
        ordered.extend(by_class[class_name])
        labels.append(np.full(len(by_class[class_name]), label, np.int32))
    return ordered, np.concatenate(labels), tuple(class_names)


def check_folder_channels(channels: int) -> None:
    """Raises ValueError naming config.data.channels unless it is 1 or 3."""
    if channels not in (1, 3):
        raise ValueError(
            f"config.data.channels={channels} must be 1 (grayscale) or 3 (RGB) for "
            "config.data.name='image_folder'."
        )


def describe_folder(image_dir: str, files: list[str], class_names: tuple[str, ...]) -> dict:
    """JSON-able identity of an image folder: path, count, classes and a file-list fingerprint."""
    return {
        "name": "image_folder",
        "image_dir": image_dir if "://" in image_dir else os.path.abspath(image_dir),
        "count": len(files),
        "num_classes": len(class_names),
        "file_list_sha256": fingerprint(files),
    }


def folder_images(config: ml_collections.ConfigDict, channels: int = 3) -> IndexedImages:
    """`config.data.image_dir` as `IndexedImages` (ADM-center-cropped uint8, folder labels).

    Args:
      config: Reads data.image_dir and data.image_size.
      channels: 1 (grayscale) or 3 (RGB).

    Raises:
      FileNotFoundError, ValueError: As `scan_image_dir`, or on bad channels.
    """
    check_folder_channels(channels)
    image_dir, size = config.data.image_dir, config.data.image_size
    files, labels, class_names = scan_image_dir(image_dir)
    root = image_dir.rstrip("/")

    def load(index: int) -> tuple[np.ndarray, int]:
        return load_image(f"{root}/{files[index]}", size, channels), int(labels[index])

    description = describe_folder(image_dir, files, class_names)
    return IndexedImages(len(files), class_names, description, size, channels, load)


# --- TFDS (random access: ArrayRecord builds) --------------------------------------------------


def prepare_instructions(config: ml_collections.ConfigDict, manual: bool = False) -> str:
    """How to prepare `config.data.tfds_name` as ArrayRecord (a shell command and its Python form).

    Args:
      config: Experiment config; reads data.tfds_name, data.data_dir, data.manual_dir.
      manual: Whether the dataset needs a manual download into a manual_dir.

    Returns:
      A human-readable, multi-line instruction string.
    """
    name = config.data.tfds_name
    data_dir = config.data.data_dir or "~/tensorflow_datasets"
    manual_dir = config.data.manual_dir or "MANUAL_DIR"
    build = f"tfds build {name} --data_dir {data_dir} --file_format array_record"
    python = f"tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
    if manual:
        return (
            f"{name!r} needs a manual download: put its source archives in {manual_dir} "
            "(see https://www.tensorflow.org/datasets/catalog/"
            f"{name.split('/')[0]}), then run\n"
            f"  {build} --manual_dir {manual_dir}\n"
            f"or in Python: {python}.download_and_prepare("
            f"download_config=tfds.download.DownloadConfig(manual_dir={manual_dir!r}))\n"
            "and set config.data.data_dir (and config.data.manual_dir) accordingly "
            f"{BUILD_NEEDS}."
        )
    return (
        "Prepare it once on a machine with network access:\n"
        f"  {build}\n"
        f"or in Python: {python}.download_and_prepare()\n"
        f"and set config.data.data_dir to that directory {BUILD_NEEDS}."
    )


def _needs_tensorflow(error: ImportError) -> bool:
    """Whether `error` is the import of TensorFlow failing."""
    name = getattr(error, "name", None) or ""
    return name.split(".")[0] == "tensorflow" or "No module named 'tensorflow" in str(error)


def _tensorflow_missing(config: ml_collections.ConfigDict, error: ImportError) -> ImportError:
    """The ImportError to raise when TFDS needs TensorFlow for `config.data.tfds_name`."""
    return ModuleNotFoundError(
        f"config.data.tfds_name={config.data.tfds_name!r}: TFDS needs TensorFlow for this "
        f"({type(error).__name__}: {error}). TensorFlow is not a dependency of shortcut_jax: "
        f"install it with the tf extra, {TFDS_EXTRA} (where a TensorFlow is installed already, "
        "as on Colab, skip the extra). Reading a prepared ArrayRecord build needs none.",
        name="tensorflow",
    )


def tfds_builder(config: ml_collections.ConfigDict) -> Any:
    """The TFDS builder of `config.data.tfds_name` in `config.data.data_dir` (nothing is read).

    Raises:
      ValueError: If config.data.tfds_name is empty or not a TFDS dataset.
    """
    import tensorflow_datasets as tfds  # TensorFlow-heavy: only when TFDS is used

    name = config.data.tfds_name
    if not name:
        raise ValueError(
            "config.data.tfds_name is empty; with config.data.name='tfds' set it to a TFDS "
            "dataset such as 'imagenet2012', 'celeb_a_hq/256' or 'cifar10'."
        )
    try:
        return tfds.builder(name, data_dir=config.data.data_dir or None)
    except ImportError as error:
        if _needs_tensorflow(error):
            raise _tensorflow_missing(config, error) from error
        raise
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"config.data.tfds_name={name!r} is not a TFDS dataset: {str(error).splitlines()[0]}"
        ) from error


def needs_manual_download(config: ml_collections.ConfigDict, builder: Any) -> bool:
    """Whether `config.data.tfds_name`'s source files must be downloaded by hand."""
    base_name = config.data.tfds_name.split("/")[0]
    return base_name in MANUAL_TFDS_DATASETS or bool(builder.MANUAL_DOWNLOAD_INSTRUCTIONS)


def _tfrecord_message(config: ml_collections.ConfigDict, builder: Any) -> str:
    name, data_dir = config.data.tfds_name, config.data.data_dir or "~/tensorflow_datasets"
    return (
        f"config.data.tfds_name={name!r}: the build in {builder.data_dir} is stored as TFRecord, "
        "which has no random access. Training reads TFDS by index so that resuming at step k "
        "reads nothing before k; a TFRecord stream would re-read k * batch_size records on every "
        "restart. Convert it once to ArrayRecord, in place (the TFRecord files stay):\n"
        f"  {TFDS_EXTRA}   # TensorFlow, unless one is installed already\n"
        "  pip install apache-beam mlcroissant   # the tfds command-line tool imports both\n"
        f"  tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record\n"
        f"or rebuild it: tfds build {name} --data_dir {data_dir} --file_format array_record"
        + (" --manual_dir MANUAL_DIR" if needs_manual_download(config, builder) else "")
    )


def _converted_in_place(builder: Any) -> bool:
    """Whether the build's dataset_info lists a random-access alternative format."""
    alternatives = set(builder.info.as_proto.alternative_file_formats)
    return bool(alternatives & {"array_record", "parquet"})


def tfds_data_source(config: ml_collections.ConfigDict, builder: Any) -> Any:
    """`config.data.tfds_split` as a random-access TFDS data source (images left encoded).

    Raises:
      ValueError: If the build is TFRecord (saying how to convert it) or the split is unknown.
      FileNotFoundError: If the dataset is not prepared (saying how to prepare it; nothing is
        ever downloaded).
    """
    import tensorflow_datasets as tfds

    data = config.data
    try:
        return builder.as_data_source(
            split=data.tfds_split, decoders={"image": tfds.decode.SkipDecoding()}
        )
    except ImportError as error:
        if _needs_tensorflow(error):
            raise _tensorflow_missing(config, error) from error
        raise
    except (NotImplementedError, AssertionError) as error:
        if not builder.is_prepared():  # never downloads here
            raise FileNotFoundError(
                f"TFDS dataset {data.tfds_name!r} is not prepared in {builder.data_dir_root} "
                f"(config.data.data_dir={data.data_dir!r}; nothing is downloaded at run time).\n"
                + prepare_instructions(config, needs_manual_download(config, builder))
            ) from error
        if not isinstance(error, NotImplementedError):
            raise
        if not _converted_in_place(builder):  # "Random access ... is not supported"
            raise ValueError(_tfrecord_message(config, builder)) from error
        # TFDS 4.9 restores a code-defined builder without the formats `tfds convert_format`
        # added in place; the builder read from the directory has them.
        from_directory = tfds.builder_from_directory(builder.data_dir)
        return from_directory.as_data_source(
            split=data.tfds_split, decoders={"image": tfds.decode.SkipDecoding()}
        )
    except (KeyError, ValueError) as error:  # e.g. "Unknown split 'x'. Should be one of [...]"
        raise ValueError(
            f"config.data.tfds_split={data.tfds_split!r} of {data.tfds_name!r}: {error} "
            f"(splits: {sorted(builder.info.splits.keys())})."
        ) from error


def tfds_images(config: ml_collections.ConfigDict, channels: int = 3) -> IndexedImages:
    """A prepared TFDS split as `IndexedImages`: random access, decoded and cropped with PIL.

    Args:
      config: Reads data.tfds_name, data.tfds_split, data.data_dir and data.image_size.
      channels: 1 or 3 (grayscale datasets are converted to RGB for 3).

    Raises:
      ValueError, FileNotFoundError: As `tfds_builder` and `tfds_data_source`, or if the dataset
        has no 'image' feature.
    """
    data = config.data
    builder = tfds_builder(config)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"config.data.tfds_name={data.tfds_name!r} has no 'image' feature "
            f"(features: {sorted(features.keys())})."
        )
    source = tfds_data_source(config, builder)
    has_label = "label" in features and hasattr(features["label"], "names")
    name, split, size = data.tfds_name, data.tfds_split, data.image_size

    def load(index: int) -> tuple[np.ndarray, int]:
        try:
            example = source[index]
        except ImportError as error:  # a feature whose decoding needs TensorFlow
            if _needs_tensorflow(error):
                raise _tensorflow_missing(config, error) from error
            raise
        image = decode_image_bytes(example["image"], size, channels, f"{name}/{split}[{index}]")
        return image, int(example["label"]) if has_label else 0

    description = {
        "name": "tfds",
        "tfds_name": name,
        "tfds_split": split,
        "version": str(builder.info.version),
        "count": len(source),
    }
    class_names = tuple(features["label"].names) if has_label else ()
    return IndexedImages(len(source), class_names, description, size, channels, load)


def fingerprint(lines: list[str]) -> str:
    """sha256 hex of newline-joined strings (e.g. a sorted relative file list)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
