"""The run's metric writers: TensorBoard events and the log, optionally Weights & Biases.

Process 0 writes; the other processes get an empty writer. The TensorBoard events are written
without TensorFlow (`tensorboard_events`, through the `tensorboard` package), beside CLU's
logging writer, through CLU's asynchronous writer. An event file is appended to record by
record, which a bucket object cannot be (and TensorFlow's writer reached buckets only through
tf.io.gfile, a second storage client that ignores the settings every other file of a run
honours: etils.epath on gcsfs, its credentials, endpoint, emulator). So for a bucket workdir
(gs://...) the events are written to a local staging folder and mirrored to the workdir through
etils.epath: every changed file is uploaded whole (an object replaced in one write is never seen
half-written) when the writer flushes, at most every `mirror_seconds` while scalars are written,
and when it closes. A run killed between two mirrors loses at most those seconds of events; its
staging folder is uploaded by the next start.

Weights & Biases (`WandbWriter`) is off unless `config.wandb_project` names a project; it needs
`pip install wandb` (not a dependency). It logs the same scalars, sample grids and
hyperparameters; the run id is kept in `<workdir>/wandb_run_id.txt`, so a resumed run continues
the same W&B run. W&B's own settings (`WANDB_API_KEY`, `WANDB_MODE=offline`, ...) apply.

    writer = metric_files.create_writer(workdir, is_chief=jax.process_index() == 0, config=config)
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from shortcut_jax import atomic_files, tensorboard_events

MIRROR_SECONDS = 60.0
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
WANDB_INSTALL = "pip install wandb"


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


def tensorboard_writers(logdir: str) -> metric_writers.AsyncMultiWriter:
    """CLU's logging writer and the TensorBoard events of `logdir` (a local directory)."""
    return metric_writers.AsyncMultiWriter(
        [metric_writers.LoggingWriter(), tensorboard_events.metric_writer_class()(logdir)]
    )


def _import_wandb(project: str) -> Any:
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            f"config.wandb_project={project!r} logs to Weights & Biases, which needs the wandb "
            f"package (not a dependency of shortcut_jax): {WANDB_INSTALL}, or set "
            "config.wandb_project='' to log to TensorBoard only."
        ) from error
    return wandb


def wandb_run_id(workdir: str) -> str:
    """The W&B run id of `workdir`: read from its `wandb_run_id.txt`, else made and written there.

    A new id per workdir (never derived from its path, which two machines may share), kept so
    that a resumed run logs to the same W&B run.
    """
    path = epath.Path(workdir) / WANDB_RUN_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)
    atomic_files.write_text(path, run_id + "\n")
    return run_id


class WandbWriter(metric_writers.MetricWriter):
    """Writes CLU's metric writes to one Weights & Biases run (`wandb` is imported lazily).

    Scalars, images (uint8, or floats in [0, 1], as for TensorBoard), histograms, texts, audio
    and videos go to `run.log(..., step=step)`; hyperparameters to `run.config`. W&B drops values
    logged at a step below one it has already seen: after a resume, the steps logged since the
    last checkpoint are not logged again until the run passes them.
    """

    def __init__(
        self,
        project: str,
        workdir: str,
        *,
        entity: str = "",
        local_dir: str | None = None,
    ):
        """Starts (or resumes) the W&B run of `workdir` in `project`.

        Args:
          project: The W&B project.
          workdir: The run's workdir: its name names the W&B run; its `wandb_run_id.txt` keeps
            the run id.
          entity: The W&B entity (user or team); empty: W&B's default.
          local_dir: Where W&B keeps its local files; default `workdir` (a local copy for a
            bucket workdir).

        Raises:
          ImportError: If wandb is not installed (the message says `pip install wandb`).
        """
        self._wandb = _import_wandb(project)
        self._warned: set[str] = set()
        if local_dir is None:
            local_dir = (
                staging_dir(workdir) + "-wandb" if atomic_files.is_remote(workdir) else workdir
            )
        os.makedirs(local_dir, exist_ok=True)
        self.run = self._wandb.init(
            project=project,
            entity=entity or None,
            id=wandb_run_id(workdir),
            name=os.path.basename(str(workdir).rstrip("/")) or None,
            resume="allow",
            dir=local_dir,
        )

    def _warn_once(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logging.warning("The Weights & Biases writer does not write %s.", what)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Any = None) -> None:
        del step, values, metadata
        self._warn_once("raw summaries")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self.run.log({key: float(np.asarray(value)) for key, value in scalars.items()}, step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        logged = {}
        for key, value in images.items():
            batch = tensorboard_events.image_uint8(np.asarray(value))
            if batch.ndim == 3:
                logged[key] = self._wandb.Image(batch)
            else:
                logged[key] = [self._wandb.Image(image) for image in batch]
        self.run.log(logged, step=step)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        logged = {}
        for key, value in videos.items():
            frames = tensorboard_events.image_uint8(np.asarray(value))  # [N,] T, H, W, C
            logged[key] = self._wandb.Video(np.moveaxis(frames, -1, -3))  # [N,] T, C, H, W
        self.run.log(logged, step=step)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        logged = {
            key: [self._wandb.Audio(np.asarray(clip), sample_rate=sample_rate) for clip in value]
            for key, value in audios.items()
        }
        self.run.log(logged, step=step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self.run.log({key: str(value) for key, value in texts.items()}, step=step)

    def write_histograms(
        self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
    ) -> None:
        logged = {}
        for key, value in arrays.items():
            bins = (num_buckets or {}).get(key) or 64
            counts, edges = np.histogram(np.asarray(value, dtype=np.float64).reshape(-1), bins)
            logged[key] = self._wandb.Histogram(np_histogram=(counts, edges))
        self.run.log(logged, step=step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)

    def flush(self) -> None:
        pass  # W&B uploads in its own process

    def close(self) -> None:
        self.run.finish()


def create_writer(
    workdir: str, is_chief: bool = True, config: Any = None
) -> metric_writers.MetricWriter:
    """The run's writer: TensorBoard events in `workdir` (mirrored there if it is a bucket) and
    the log, plus Weights & Biases if `config.wandb_project` is set, on process 0; an empty
    writer on the other processes.

    Args:
      workdir: The run's directory (local or gs://).
      is_chief: Whether this process writes (process 0).
      config: The experiment config, or None; reads `wandb_project` ('' or missing: no W&B) and
        `wandb_entity` ('' or missing: W&B's default).

    Raises:
      ImportError: If `config.wandb_project` is set and wandb is not installed.
    """
    if not is_chief:
        return metric_writers.MultiWriter([])
    project = str(config.get("wandb_project", "") or "") if config is not None else ""
    wandb_writer = None
    if project:  # first: a missing wandb fails before any event file is made
        entity = str(config.get("wandb_entity", "") or "")
        wandb_writer = WandbWriter(project, workdir, entity=entity)
    if not atomic_files.is_remote(workdir):
        writer = tensorboard_writers(workdir)
    else:
        local = staging_dir(workdir)
        os.makedirs(local, exist_ok=True)
        writer = MirroredWriter(tensorboard_writers(local), local, workdir)
    if wandb_writer is None:
        return writer
    return metric_writers.MultiWriter([writer, wandb_writer])
