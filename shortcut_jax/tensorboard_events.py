"""TensorBoard event files without TensorFlow, and CLU's metric writers without TensorFlow.

TensorFlow is not a dependency of shortcut_jax (it is the `tf` extra, for building TFDS
datasets). CLU's `metric_writers` package imports its TensorFlow `SummaryWriter` when it is
imported, so `from clu import metric_writers` would fail without TensorFlow, and where TensorFlow
is installed it costs every training process ~8 s of import. `install_clu_summary_writer()`,
called when `shortcut_jax` is imported, answers the import of `clu.metric_writers.summary_writer`
with `SummaryWriter` below: CLU's writers (`MultiWriter`, `AsyncMultiWriter`,
`create_default_writer`, `periodic_actions`) then work, and TensorFlow is never imported for
metrics, whether it is installed or not. (Imported before shortcut_jax, CLU keeps its own writer;
`metric_files.create_writer` uses this one either way. TensorFlow's writer stays importable as
`clu.metric_writers.tf.summary_writer.SummaryWriter`.)

The events are the ones TensorFlow 2's `tf.summary` writes, through the `tensorboard` package's
protos and summary helpers (pure Python): scalars as float32 tensors (plugin 'scalars'), images
as PNG strings (plugin 'images'), histograms (30 buckets by default), text, audio as WAV, and
hyperparameters (the hparams plugin's session start). TensorBoard reads them, and so do
`tf.compat.v1.train.summary_iterator` and `read_events` / `read_scalars` below. Every record is
flushed to the file when it is written (metrics are small; a killed run keeps all it logged).

    writer = tensorboard_events.metric_writer_class()(logdir)   # a clu MetricWriter
    writer.write_scalars(step, {"loss": 0.1})
    tensorboard_events.read_scalars(logdir, "loss")            # {step: 0.1}
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import io
import itertools
import os
import socket
import struct
import sys
import threading
import time
import wave
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

CLU_SUMMARY_WRITER_MODULE = "clu.metric_writers.summary_writer"
EVENTS_GLOB = "events.out.tfevents.*"

_file_counter = itertools.count()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (google-crc32c's C code when installed, else pure Python)."""
    try:
        import google_crc32c  # a dependency of google-cloud-storage

        crc = google_crc32c.value(data)
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        return masked_crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventFileWriter:
    """One TensorBoard event file in a local directory: TFRecord framing of `Event` protos.

    The file is named as TensorFlow 2 names its own (`events.out.tfevents.<time>.<host>.<pid>.
    <n>.v2`). Thread-safe; each `add` is written and flushed before it returns.
    """

    def __init__(self, logdir: str):
        if "://" in str(logdir):
            raise ValueError(
                f"TensorBoard events are written to a local directory, not {logdir!r} "
                "(metric_files.create_writer stages a bucket workdir's events locally)."
            )
        from tensorboard.compat.proto import event_pb2

        os.makedirs(logdir, exist_ok=True)
        host, pid, number = socket.gethostname(), os.getpid(), next(_file_counter)
        name = f"events.out.tfevents.{int(time.time()):010d}.{host}.{pid}.{number}.v2"
        self.path = os.path.join(logdir, name)
        self._lock = threading.Lock()
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        # Every record is flushed when written; a writer dropped without close() (CLU's writers
        # are flushed, not always closed) closes its file when collected or at exit.
        weakref.finalize(self, self._file.close)
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event: Any) -> None:
        """Appends one `tensorboard.compat.proto.event_pb2.Event` and flushes it."""
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = (
            header
            + struct.pack("<I", _masked_crc32c(header))
            + data
            + struct.pack("<I", _masked_crc32c(data))
        )
        with self._lock:
            if self._file.closed:
                raise ValueError(f"{self.path} is closed")
            self._file.write(record)
            self._file.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


def read_events(path: str) -> Iterator[Any]:
    """The `Event` protos of one event file, in order; stops at a truncated last record.

    Raises:
      ValueError: If a whole record's checksum does not match.
    """
    from tensorboard.compat.proto import event_pb2

    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != _masked_crc32c(header[:8]):
                raise ValueError(f"{path}: corrupt record length")
            data, footer = handle.read(length), handle.read(4)
            if len(data) < length or len(footer) < 4:
                return  # a writer killed mid-record
            if struct.unpack("<I", footer)[0] != _masked_crc32c(data):
                raise ValueError(f"{path}: corrupt record")
            yield event_pb2.Event.FromString(data)


def read_scalars(logdir: str, tag: str) -> dict[int, float]:
    """{step: value} of the scalar `tag` in every event file of `logdir` (a later file wins)."""
    from tensorboard.util import tensor_util

    values = {}
    for path in sorted(glob.glob(os.path.join(logdir, EVENTS_GLOB))):
        for event in read_events(path):
            for value in event.summary.value:
                if value.tag != tag:
                    continue
                if value.HasField("tensor"):
                    values[event.step] = float(tensor_util.make_ndarray(value.tensor))
                else:
                    values[event.step] = float(value.simple_value)
    return values


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[image.shape[-1]]
    pixels = image[..., 0] if mode == "L" else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def image_uint8(images: np.ndarray) -> np.ndarray:
    """tf.image.convert_image_dtype(..., tf.uint8, saturate=True): floats in [0, 1] -> 0..255."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        return (np.clip(images, 0.0, 1.0) * 255.5).astype(np.uint8)
    if images.dtype == np.bool_:
        return images.astype(np.uint8) * 255
    return np.clip(images, 0, 255).astype(np.uint8)


def _wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV of float samples in [-1, 1], shape (length, channels)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(pcm.shape[1])
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, as CLU flattens hyperparameters."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TensorBoardWriter:
    """CLU's `MetricWriter` methods, writing TensorFlow 2's summaries without TensorFlow.

    `metric_writer_class()` is this class with `clu.metric_writers.MetricWriter` as a base.
    """

    def __init__(self, logdir: str):
        self._events = EventFileWriter(os.fspath(logdir))
        self._warned: set[str] = set()

    @property
    def path(self) -> str:
        """The event file this writer appends to."""
        return self._events.path

    def _write(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto import event_pb2

        self._events.add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def _warn_once(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logging.warning("The TensorBoard writer does not write %s.", what)

    def write_summaries(
        self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Raw tensors with optional `SummaryMetadata` (a proto of TensorBoard or TensorFlow)."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.util import tensor_util

        summary = summary_pb2.Summary()
        for key, value in values.items():
            tensor = tensor_util.make_tensor_proto(np.asarray(value))
            entry = summary.value.add(tag=key, tensor=tensor)
            md = metadata.get(key) if metadata is not None else None
            if md is not None:
                entry.metadata.ParseFromString(
                    md if isinstance(md, bytes) else md.SerializeToString()
                )
        self._write(step, summary)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.scalar import summary_v2

        summary = summary_pb2.Summary()
        for key, value in scalars.items():
            summary.value.extend(summary_v2.scalar_pb(key, np.asarray(value)).value)
        self._write(step, summary)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """(H, W, C) or (N, H, W, C) arrays, C in 1..4: uint8, or floats in [0, 1]."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.image import metadata
        from tensorboard.util import tensor_util

        summary = summary_pb2.Summary()
        for key, value in images.items():
            batch = image_uint8(np.asarray(value))
            if batch.ndim == 3:
                batch = batch[None]
            height, width = batch.shape[1:3]
            strings = [str(width).encode(), str(height).encode()] + [_png(im) for im in batch]
            summary.value.add(
                tag=key,
                metadata=metadata.create_summary_metadata(display_name=None, description=None),
                tensor=tensor_util.make_tensor_proto(np.array(strings, dtype=object)),
            )
        self._write(step, summary)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        del step, videos
        self._warn_once("videos")  # nor does CLU's TensorFlow writer

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        """(N, length, channels) float arrays in [-1, 1], as WAV."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.audio import metadata
        from tensorboard.util import tensor_util

        summary = summary_pb2.Summary()
        for key, value in audios.items():
            clips = np.asarray(value, dtype=np.float32)
            encoded = [[_wav(clip, sample_rate), b""] for clip in clips]
            summary.value.add(
                tag=key,
                metadata=metadata.create_summary_metadata(
                    display_name=None, description=None, encoding=metadata.Encoding.Value("WAV")
                ),
                tensor=tensor_util.make_tensor_proto(np.array(encoded, dtype=object)),
            )
        self._write(step, summary)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.text import summary_v2

        summary = summary_pb2.Summary()
        for key, value in texts.items():
            summary.value.extend(summary_v2.text_pb(key, value).value)
        self._write(step, summary)

    def write_histograms(
        self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
    ) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.histogram import summary_v2

        summary = summary_pb2.Summary()
        for key, value in arrays.items():
            buckets = num_buckets.get(key) if num_buckets else None
            data = np.asarray(value, dtype=np.float64).reshape(-1)
            summary.value.extend(summary_v2.histogram_pb(key, data, buckets=buckets or None).value)
        self._write(step, summary)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hparams plugin's session start, at step 0 (nested mappings are flattened)."""
        from tensorboard.plugins.hparams import summary_v2

        flat = {key: _hparam_value(value) for key, value in _flatten(hparams).items()}
        self._write(0, summary_v2.hparams_pb(flat))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


_WRITER_CLASS: type | None = None


def metric_writer_class() -> type:
    """`TensorBoardWriter` as a `clu.metric_writers.MetricWriter` (one class per process)."""
    global _WRITER_CLASS
    if _WRITER_CLASS is None:
        # Importing CLU's package may come back here through `_CluSummaryWriterFinder`, which
        # then makes the class; its `interface` module is imported before the summary writer.
        from clu.metric_writers import interface

        if _WRITER_CLASS is None:
            _WRITER_CLASS = type(
                "SummaryWriter",
                (TensorBoardWriter, interface.MetricWriter),
                {"__module__": __name__, "__doc__": TensorBoardWriter.__doc__},
            )
    return _WRITER_CLASS


class _CluSummaryWriterFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import clu.metric_writers.summary_writer` with `metric_writer_class()`."""

    def find_spec(self, fullname, path, target=None):
        del path, target
        if fullname != CLU_SUMMARY_WRITER_MODULE:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=__file__)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        module.__doc__ = (
            "CLU's SummaryWriter, replaced by shortcut_jax.tensorboard_events (no TensorFlow)."
        )
        module.SummaryWriter = metric_writer_class()


def install_clu_summary_writer() -> bool:
    """Makes `clu.metric_writers` import `metric_writer_class()` instead of TensorFlow's writer.

    Returns:
      True if CLU will use it; False if CLU's writer module was imported already (CLU then keeps
      whichever it has; `metric_files.create_writer` still writes through this module).
    """
    module = sys.modules.get(CLU_SUMMARY_WRITER_MODULE)
    if module is not None:
        return getattr(module, "SummaryWriter", None) is _WRITER_CLASS
    if not any(isinstance(finder, _CluSummaryWriterFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CluSummaryWriterFinder())
    return True
