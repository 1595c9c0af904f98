"""The run's metric writer: CLU's TensorBoard + logging writers, for local and bucket workdirs.

A local workdir gets `clu.metric_writers.create_default_writer(workdir)` as is. TensorBoard's
event writer reaches buckets only through tf.io.gfile, a second storage client that ignores the
settings every other file of a run honours (etils.epath on gcsfs: credentials, endpoint,
emulator). So for a bucket workdir (gs://...) the events are written to a local staging folder
and mirrored to the workdir through etils.epath: every changed file is uploaded whole (an object
replaced in one write is never seen half-written) when the writer flushes, at most every
`mirror_seconds` while scalars are written, and when it closes. A run killed between two mirrors
loses at most those seconds of events; its staging folder is uploaded by the next start.

    writer = metric_files.create_writer(workdir, is_chief=jax.process_index() == 0)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from clu import metric_writers
from etils import epath

from shortcut_jax import atomic_files

MIRROR_SECONDS = 60.0


def staging_dir(workdir: str) -> str:
    """The local folder that stages the TensorBoard events of the bucket workdir `workdir`."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(str(workdir).rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(cache, "shortcut_jax", "events", digest)


class MirroredWriter(metric_writers.MetricWriter):
    """Writes through `inner` into `local_dir` and mirrors that folder's files to `remote_dir`."""

    def __init__(
        self,
        inner: metric_writers.MetricWriter,
        local_dir: str,
        remote_dir: str,
        mirror_seconds: float = MIRROR_SECONDS,
    ):
        self._inner = inner
        self._local_dir = local_dir
        self._remote_dir = epath.Path(remote_dir)
        self._mirror_seconds = mirror_seconds
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._last_mirror = time.monotonic()
        self.mirror()  # events a killed run staged but never uploaded

    def mirror(self) -> int:
        """Uploads every staged file that changed since its last upload; returns their count."""
        count = 0
        for root, _, names in os.walk(self._local_dir):
            for name in sorted(names):
                local = os.path.join(root, name)
                relative = os.path.relpath(local, self._local_dir)
                stat = os.stat(local)
                version = (stat.st_size, stat.st_mtime_ns)
                if self._uploaded.get(relative) == version:
                    continue
                with open(local, "rb") as handle:
                    atomic_files.write_bytes(self._remote_dir / relative, handle.read())
                self._uploaded[relative] = version
                count += 1
        self._last_mirror = time.monotonic()
        return count

    def _mirror_if_due(self) -> None:
        if time.monotonic() - self._last_mirror >= self._mirror_seconds:
            self.flush()

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Any = None) -> None:
        self._inner.write_summaries(step, values, metadata)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._inner.write_scalars(step, scalars)
        self._mirror_if_due()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._inner.write_images(step, images)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        self._inner.write_videos(step, videos)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        self._inner.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._inner.write_texts(step, texts)

    def write_histograms(
        self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
    ) -> None:
        self._inner.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._inner.write_hparams(hparams)

    def flush(self) -> None:
        """Flushes the events to the staging folder and uploads what changed."""
        self._inner.flush()
        try:
            self.mirror()
        except OSError as error:  # a bucket hiccup must not end training; the next flush retries
            logging.warning("Could not mirror metric events to %s: %s", self._remote_dir, error)

    def close(self) -> None:
        """Closes the events files and uploads them a last time."""
        self._inner.close()
        self.mirror()


def create_writer(workdir: str, is_chief: bool = True) -> metric_writers.MetricWriter:
    """The run's writer: TensorBoard events in `workdir` (mirrored there if it is a bucket) and
    the log on process 0; an empty writer on the other processes.
    """
    if not is_chief:
        return metric_writers.MultiWriter([])
    if not atomic_files.is_remote(workdir):
        return metric_writers.create_default_writer(workdir)
    local = staging_dir(workdir)
    os.makedirs(local, exist_ok=True)
    return MirroredWriter(metric_writers.create_default_writer(local), local, workdir)
