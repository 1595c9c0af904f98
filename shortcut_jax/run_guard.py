"""What a training start checks and records in its workdir, before anything is compiled.

`guard_start(config, workdir)` (a context manager around the whole run):
  1. the workdir can be created and written, and its disk has `MIN_FREE_BYTES` free;
  2. no other run holds the workdir: process 0 takes `workdir_lock.lock_for(workdir)`, a flock the
     kernel drops when the holder exits or is killed (a lease that goes stale on buckets), so a
     crashed run never leaves the workdir stuck;
  3. a resume continues the same run: the config saved in the newest checkpoint (and the process
     count of the previous start) is compared with the given one (`resume_policy`), and a change
     that would alter the run stops it with one `ResumeMismatchError` listing every field.
Process 0 decides 1 and 2 and tells the other processes, so all of them stop together; 3 runs on
every process (all read the same checkpoint).

`record_start(...)` after the state is restored: appends this start to `WORKDIR/starts.json` (time,
step, host, process and device counts, jax version, the fields changed since the previous start and
the full config) and refuses to train when not even one more checkpoint fits on the disk.
`WORKDIR/config.json` keeps holding the config of the newest start, as every reader expects.

Bucket workdirs (gs://...) are probed for writes but have no free-space check.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from shortcut_jax import atomic_files, checkpoint, config_lib, configs, resume_policy
from shortcut_jax.workdir_lock import (  # noqa: F401 - the errors of a refused start, in one place
    BucketLease,
    LeaseLostError,
    RunGuardError,
    WorkdirBusyError,
    WorkdirLock,
    WorkdirUnusableError,
    lock_for,
)

HISTORY_NAME = "starts.json"
# Room for the config, metric events, logs and a few sample grids before the first checkpoint;
# `record_start` then checks the room for checkpoints from the real size of the state.
MIN_FREE_BYTES = 256 * 2**20


class ResumeMismatchError(RunGuardError):
    """The given config would change the run saved in the workdir."""


# ----------------------------------------------------------------------- writable, free space


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def check_workdir_usable(workdir: str, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Creates `workdir`, writes and deletes a probe file there, and checks the free disk space.

    Raises:
      WorkdirUnusableError: naming the workdir and the OS error or the free space.
    """
    path = checkpoint.workdir_path(workdir)
    try:
        atomic_files.probe_writable(path)
    except OSError as error:
        raise WorkdirUnusableError(
            f"cannot write to the workdir {path} ({type(error).__name__}: {error}): pass a "
            "--workdir this user can create and write"
        ) from None
    if atomic_files.is_remote(path):
        return
    _check_free(str(path), min_free_bytes, "to start")


def _check_free(path: str, needed: int, purpose: str) -> None:
    free = _free_bytes(path)
    if free < needed:
        raise WorkdirUnusableError(
            f"the disk of the workdir {path} has {_mib(free)} free; {_mib(needed)} are needed "
            f"{purpose}: free some space or pass a --workdir on another disk"
        )


def _mib(size: float) -> str:
    return f"{size / 2**20:,.0f} MiB"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------- same run on resume


def saved_config(
    workdir: str, fallback: bool = False
) -> tuple[int | None, ml_collections.ConfigDict | None]:
    """(step, config) of the newest checkpoint in `workdir`, or (None, None) without one.

    With `fallback`, a checkpoint whose config cannot be read is skipped (with a warning) for the
    newest older one that reads; the start then restores from there (`restore_fallback`).
    """
    manager = checkpoint.make_manager(workdir)
    steps = sorted(manager.all_steps(), reverse=True)
    manager.close()
    for step in steps:
        path = os.path.join(str(checkpoint.checkpoint_dir(workdir)), str(step))
        try:
            return step, checkpoint.restore_config(workdir, step)
        except Exception as error:  # noqa: BLE001 - orbax raises many kinds; `why` names them
            message = (
                f"cannot read the config saved in the checkpoint {path}: "
                f"{checkpoint.why(error)} ({type(error).__name__}: {error})"
            )
            if not fallback:
                raise checkpoint.CheckpointError(
                    f"{message}. Rerun with --config.restore_fallback=true to resume from the "
                    "newest older checkpoint that restores (this one is moved aside, not deleted)."
                ) from error
            logging.warning("%s; trying the previous checkpoint.", message)
    return None, None


def check_resume(
    config: ml_collections.ConfigDict, workdir: str, process_count: int
) -> list[resume_policy.Change]:
    """Compares `config` with the newest checkpoint's; returns the (safe) changes.

    Raises:
      ResumeMismatchError: listing every change that would alter the run and how to proceed.
    """
    step, saved = saved_config(workdir, bool(config.get("restore_fallback", False)))
    if saved is None:
        return []
    old = resume_policy.flatten(saved)
    new = resume_policy.flatten(config)
    history = read_history(workdir)
    if history and PROCESS_COUNT_KEY in history[-1]:
        old[resume_policy.PROCESS_COUNT] = history[-1][PROCESS_COUNT_KEY]
        new[resume_policy.PROCESS_COUNT] = process_count
    defaults = resume_policy.flatten(configs.base_config())
    changes = resume_policy.compare(
        old, new, step, config.get("resume_allow_changes", ""), defaults
    )
    refused = [change for change in changes if not change.safe]
    if refused:
        raise ResumeMismatchError(
            resume_policy.refusal_message(
                str(checkpoint.workdir_path(workdir)),
                step,
                refused,
                config.get("resume_allow_changes", ""),
            )
        )
    if changes:
        logging.info(
            "Resuming step %d with changed fields: %s",
            step,
            "; ".join(change.describe() for change in changes),
        )
    return changes


# ----------------------------------------------------------------------- history of starts

PROCESS_COUNT_KEY = "process_count"


def history_path(workdir: str) -> epath.Path:
    """WORKDIR/starts.json: a JSON list with one entry per training start, oldest first."""
    return checkpoint.workdir_path(workdir) / HISTORY_NAME


def read_history(workdir: str) -> list[dict[str, Any]]:
    """The recorded starts of the run in `workdir` ([] before the first).

    Raises:
      WorkdirUnusableError: when starts.json exists but is not a JSON list.
    """
    path = history_path(workdir)
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except ValueError as error:
        history = error
    if not isinstance(history, list):
        raise WorkdirUnusableError(
            f"{path} is not the JSON list of starts this library writes: move it away to "
            "start a new history (the checkpoints are unaffected)"
        )
    return history


def record_start(
    config: ml_collections.ConfigDict, workdir: str, step: int, state: Any
) -> dict[str, Any] | None:
    """Appends this start to starts.json, rewrites config.json, checks room for checkpoints.

    Every process calls it once the state is built or restored (before the train step compiles);
    process 0 writes.

    Raises:
      WorkdirUnusableError: when one more checkpoint of `state` does not fit on the disk.

    Returns:
      The entry written (None on the other processes).
    """
    import jax

    entry, refusal = None, None
    if jax.process_index() == 0:
        try:
            entry = _write_start(config, workdir, step, state)
        except RunGuardError as error:
            refusal = error
        except OSError as error:  # e.g. the disk filled up since the start
            refusal = WorkdirUnusableError(f"cannot record this start in {workdir}: {error}")
    agree(refusal)
    return entry


def _write_start(
    config: ml_collections.ConfigDict, workdir: str, step: int, state: Any
) -> dict[str, Any]:
    import jax

    path = checkpoint.workdir_path(workdir)
    history = read_history(workdir)
    config_dict = json.loads(config_lib.to_json(config))
    previous = resume_policy.flatten(history[-1]["config"]) if history else {}
    changed = {
        change.field: [change.old, change.new]
        for change in resume_policy.compare(previous, resume_policy.flatten(config_dict), step)
    }
    entry = {
        "time": _now(),
        "step": int(step),
        "host": socket.gethostname(),
        PROCESS_COUNT_KEY: jax.process_count(),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "changed": changed if history else {},
        "config": config_dict,
    }
    if not atomic_files.is_remote(path):
        _check_checkpoint_room(str(path), state, config)
    atomic_files.write_json(history_path(workdir), [*history, entry])
    atomic_files.write_text(path / "config.json", config_lib.to_json(config))
    return entry


def state_bytes(state: Any) -> int:
    """Bytes of every array in `state` (an upper bound of one uncompressed checkpoint)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(state):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _check_checkpoint_room(workdir: str, state: Any, config: ml_collections.ConfigDict) -> None:
    size = state_bytes(state) + MIN_FREE_BYTES // 4
    _check_free(workdir, size, f"to save one checkpoint of this state ({_mib(size)})")
    existing = len(list(checkpoint.checkpoint_dir(workdir).glob("[0-9]*")))
    # Orbax deletes the oldest checkpoint after the newest is written: max_to_keep + 1 at the peak.
    peak = max(1, int(config.max_checkpoints_to_keep) + 1 - existing) * size
    if _free_bytes(workdir) < peak:
        logging.warning(
            "The disk of %s has %s free; keeping %d checkpoints needs about %s more.",
            workdir,
            _mib(_free_bytes(workdir)),
            config.max_checkpoints_to_keep,
            _mib(peak),
        )


# ----------------------------------------------------------------------- the start sequence


class HeldWorkdir:
    """The workdir lock of a running training job, as the train loop sees it.

    Args:
      lock: process 0's lock (None on the other processes, or without `config.workdir_lock`).
      on_bucket: whether the workdir is a bucket path (the same answer on every process).
    """

    def __init__(self, lock: WorkdirLock | BucketLease | None, on_bucket: bool):
        self._lock = lock
        self._on_bucket = on_bucket

    def confirm(self) -> None:
        """Raises `LeaseLostError` on every process if process 0 lost its bucket lease.

        Call it on every process before writing into the workdir: on a bucket it is a collective
        when there is more than one process. A local flock cannot be lost, so for a local
        workdir it returns at once, with no collective on the training path.
        """
        if not self._on_bucket:
            return
        lost: RunGuardError | None = None
        if isinstance(self._lock, BucketLease):
            try:
                self._lock.confirm()
            except LeaseLostError as error:
                lost = error
        agree(lost, LeaseLostError("process 0 lost the workdir's lease: its log says why"))


@contextlib.contextmanager
def guard_start(config: ml_collections.ConfigDict, workdir: str) -> Iterator[HeldWorkdir]:
    """Checks 1-3 of the module docstring, holds the workdir lock for the body, then releases it.

    Yields:
      The held workdir: `confirm()` it before each checkpoint (a bucket lease can be lost).

    Raises:
      WorkdirUnusableError, WorkdirBusyError, ResumeMismatchError (on every process).
    """
    import jax

    lock = None
    refusal: RunGuardError | None = None
    if jax.process_index() == 0:
        try:
            check_workdir_usable(workdir)
            if config.get("workdir_lock", True):
                lock = lock_for(str(checkpoint.workdir_path(workdir))).acquire()
            else:
                logging.warning(
                    "Running without the workdir lock (config.workdir_lock=False): nothing stops "
                    "a second run from training in %s at the same time and mixing checkpoints.",
                    checkpoint.workdir_path(workdir),
                )
        except RunGuardError as error:
            refusal = error
    try:
        agree(refusal)
        _check_resume_everywhere(config, workdir, jax.process_count())
        yield HeldWorkdir(lock, atomic_files.is_remote(workdir))
    finally:
        if lock is not None:
            lock.release()


def _check_resume_everywhere(
    config: ml_collections.ConfigDict, workdir: str, process_count: int
) -> None:
    """`check_resume` on every process; all of them stop with the first process's refusal."""
    from shortcut_jax.distributed import first_error

    caught: Exception | None = None
    try:
        check_resume(config, workdir, process_count)
    except (RunGuardError, checkpoint.CheckpointError) as error:
        caught = error
    message = first_error(caught)
    if message is None:
        return
    if caught is not None:
        raise caught
    raise ResumeMismatchError(message)


def agree(refusal: RunGuardError | None, elsewhere: RunGuardError | None = None) -> None:
    """Raises `refusal` on process 0 and `elsewhere` on the others, if process 0 raised.

    Every process must call it (a collective when there is more than one process).
    """
    import jax

    refused = refusal is not None
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refusal is not None:
        raise refusal
    if refused:
        raise elsewhere or RunGuardError("process 0 refused to start this run: its log says why")
