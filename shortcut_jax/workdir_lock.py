"""One training run per workdir, with no lock a dead run can leave stuck.

* Local workdirs: `WorkdirLock`, an exclusive `fcntl.flock` on WORKDIR/run.lock. The kernel drops
  it when the holder's file is closed, at exit or when the process is killed, so a crashed run
  never blocks its rerun.
* Bucket workdirs (gs://...): object stores have no such lock, so `BucketLease` keeps
  WORKDIR/run.lease.json (holder, token, heartbeat time) and renews it from a daemon thread every
  `RENEW_SECONDS`. Every write of the lease is a compare-and-swap: on GCS an upload with
  `if_generation_match` (the generation this run read or wrote last; 0 = "must not exist"), so of
  two starts racing for a free lease exactly one wins, and a run whose lease was taken over while
  it was paused (a stopped VM, a long GC, a network partition) finds out at its next renewal,
  which fails, instead of overwriting the new holder. A start refuses a lease renewed within
  `STALE_SECONDS` and takes over an older one: a killed run blocks its rerun for at most
  `STALE_SECONDS` (the refusal says how long). A lost lease, or a heartbeat that keeps failing
  until the lease could have gone stale, or fails with anything unexpected, marks it lost;
  `confirm()` (called by the train loop before every checkpoint and at every log step) then
  raises `LeaseLostError`, so a run that lost its workdir never writes into it again.
  SHORTCUT_JAX_LEASE_RENEW_SECONDS / SHORTCUT_JAX_LEASE_STALE_SECONDS change the two times.
  Other non-local filesystems get the same protocol with a compare-then-write that is not atomic
  (a warning says so).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging
from etils import epath

from shortcut_jax import atomic_files

LOCK_NAME = "run.lock"
HOLDER_NAME = "run.lock.json"
LEASE_NAME = "run.lease.json"
RENEW_SECONDS = 30.0
STALE_SECONDS = 180.0
RENEW_ENV = "SHORTCUT_JAX_LEASE_RENEW_SECONDS"
STALE_ENV = "SHORTCUT_JAX_LEASE_STALE_SECONDS"


class RunGuardError(RuntimeError):
    """A training start is refused before any work; the message says why and what to do."""


class WorkdirBusyError(RunGuardError):
    """Another run is training in the same workdir."""


class WorkdirUnusableError(RunGuardError):
    """The workdir cannot be written, or its disk is (nearly) full."""


class LeaseLostError(RunGuardError):
    """This run no longer holds its bucket workdir's lease: another run may be training there."""


def lock_for(workdir: str) -> WorkdirLock | BucketLease:
    """The lock that fits `workdir`: a flock for local paths, a lease for bucket paths."""
    if not atomic_files.is_remote(workdir):
        return WorkdirLock(workdir)
    return BucketLease(
        workdir, renew=_seconds(RENEW_ENV, RENEW_SECONDS), stale=_seconds(STALE_ENV, STALE_SECONDS)
    )


def _seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise WorkdirUnusableError(f"${variable}={value!r}: a positive number of seconds")
    return seconds


def _this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": _now()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _busy(directory: str, holder: str, extra: str = "") -> WorkdirBusyError:
    return WorkdirBusyError(
        f"another run is training in {directory} ({holder}): wait for it to finish, stop it, "
        f"or pass another --workdir{extra}"
    )


_WITHOUT_LOCK = (
    "Use a workdir on another file system, or run without the lock "
    "(--config.workdir_lock=false) if you make sure yourself that one run at a time uses it"
)


def _flock_excludes(path: str) -> bool:
    """Whether a lock held on `path` keeps another process from locking it.

    Call with the lock held. On file systems where flock is a no-op (some FUSE and NFS mounts)
    the other process's lock succeeds. The probe is another process, not a second open here:
    where flock is emulated with POSIX record locks (NFS), locks never conflict within one
    process, and closing any descriptor of the file would drop ours.
    """
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except OSError:\n    sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe, path], capture_output=True, timeout=60, check=False
    )
    return result.returncode == 3


class WorkdirLock:
    """An exclusive `fcntl.flock` on WORKDIR/run.lock, held until `release()` or process exit.

    The lock belongs to the open file: a killed holder's lock vanishes with it. Who holds it is
    written beside it (run.lock.json) only to name the holder in the refusal.
    """

    def __init__(self, workdir: str):
        self.directory = os.path.abspath(workdir)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.holder_path = os.path.join(self.directory, HOLDER_NAME)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock without waiting.

        Raises:
          WorkdirBusyError: another process (or another open of the lock in this one) holds it.
          WorkdirUnusableError: the lock file cannot be created or locked.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            message = f"cannot create the lock file {self.path}: {error}"
            raise WorkdirUnusableError(message) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WorkdirUnusableError(
                    f"cannot lock {self.path} ({error}): this file system has no working flock. "
                    f"{_WITHOUT_LOCK}"
                ) from None
            raise _busy(self.directory, self._holder()) from None
        if not _flock_excludes(self.path):
            os.close(fd)
            raise WorkdirUnusableError(
                f"flock on {self.path} does nothing on this file system (a second open of the "
                f"file could lock it too), so it cannot keep two runs apart. {_WITHOUT_LOCK}"
            )
        self._fd = fd
        atomic_files.write_json(self.holder_path, _this_process())
        return self

    def release(self) -> None:
        """Drops the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.holder_path)
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None

    def _holder(self) -> str:
        try:
            with open(self.holder_path) as handle:
                holder = json.load(handle)
            return f"pid {holder['pid']} on {holder['host']}, started {holder['time']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"


class LeaseConflictError(Exception):
    """The lease object changed since this run last read or wrote it."""


class _GcsObject:
    """One GCS object written only by compare-and-swap on its generation (google-cloud-storage)."""

    def __init__(self, path: str):
        from google.cloud import storage

        bucket, _, name = path.removeprefix("gs://").partition("/")
        self._blob_name = name
        self._bucket = storage.Client().bucket(bucket)

    def read(self) -> tuple[dict[str, Any] | None, int]:
        """(content or None, generation; 0 when the object does not exist)."""
        blob = self._bucket.get_blob(self._blob_name)
        if blob is None:
            return None, 0
        try:
            return json.loads(blob.download_as_bytes(if_generation_match=blob.generation)), int(
                blob.generation
            )
        except ValueError:
            return None, int(blob.generation)
        except Exception as error:
            if _is_precondition_failure(error):  # rewritten between metadata and download
                return self.read()
            raise

    def write(self, content: dict[str, Any], generation: int) -> int:
        """Replaces the object if its generation is still `generation`; returns the new one."""
        blob = self._bucket.blob(self._blob_name)
        try:
            blob.upload_from_string(
                json.dumps(content, sort_keys=True),
                content_type="application/json",
                if_generation_match=generation,
            )
        except Exception as error:
            if _is_precondition_failure(error):
                raise LeaseConflictError(str(error)) from None
            raise
        return int(blob.generation)


def _is_precondition_failure(error: Exception) -> bool:
    from google.api_core import exceptions

    return isinstance(error, exceptions.PreconditionFailed)


class _FileObject:
    """The same contract on any epath file: a generation number stored in the content.

    Atomic for local files (the compare and the write happen under an flock of a sibling file);
    on other filesystems it is a compare-then-write, which a simultaneous writer can interleave.
    """

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._local = not atomic_files.is_remote(path)
        if not self._local:
            logging.warning(
                "The run lease %s is not compare-and-swap on this filesystem: two starts in the "
                "same moment could both take it. Buckets on gs:// are safe.",
                path,
            )

    def read(self) -> tuple[dict[str, Any] | None, int]:
        try:
            content = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return None, 0
        return content, int(content.get("generation", 0)) if isinstance(content, dict) else 0

    def write(self, content: dict[str, Any], generation: int) -> int:
        with self._exclusive():
            _, current = self.read()
            if current != generation:
                raise LeaseConflictError(f"generation {current}, expected {generation}")
            atomic_files.write_json(self._path, {**content, "generation": generation + 1})
        return generation + 1

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._local:
            yield
            return
        fd = os.open(f"{self._path}.cas", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class BucketLease:
    """WORKDIR/run.lease.json, written by compare-and-swap and renewed by a heartbeat thread.

    A lease renewed less than `stale` seconds ago belongs to a live run; an older (or released)
    one is free. Works on any `epath` path (local ones in tests); `lock_for` picks it for buckets.
    """

    def __init__(
        self,
        workdir: str,
        renew: float = RENEW_SECONDS,
        stale: float = STALE_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self.directory = str(workdir)
        self.path = epath.Path(workdir) / LEASE_NAME
        self.renew, self.stale, self.clock = renew, stale, clock
        self.token = uuid.uuid4().hex
        self.started = _now()
        path = f"{self.directory.rstrip('/')}/{LEASE_NAME}"
        try:
            self._object = _GcsObject(path) if path.startswith("gs://") else _FileObject(path)
        except Exception as error:  # noqa: BLE001 - no client, no credentials, no project
            raise WorkdirUnusableError(
                f"cannot open the run lease {path} ({type(error).__name__}: {error}): check "
                "the bucket's credentials (gcloud auth application-default login, or the VM's "
                "service account)"
            ) from None
        self._generation = 0
        self._renewed = 0.0  # time.monotonic() of the last successful write
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> BucketLease:
        """Takes the lease unless a live run holds it; starts the heartbeat.

        Raises:
          WorkdirBusyError: the lease was renewed less than `stale` seconds ago by another run,
            or another start took it in the same moment.
        """
        holder, generation = self._object.read()
        if holder is not None and not holder.get("released") and holder.get("token") != self.token:
            age = self.clock() - float(holder.get("heartbeat", 0.0))
            if age < self.stale:
                raise _busy(
                    self.directory,
                    f"{self._describe(holder)}, lease renewed {age:.0f} s ago",
                    f". A run that died frees its lease {self.path} {self.stale:.0f} s after its "
                    "last renewal",
                )
            logging.warning(
                "Taking over the lease %s of a run that stopped renewing it %.0f s ago (%s).",
                self.path,
                age,
                self._describe(holder),
            )
        try:
            self._generation = self._object.write(self._content(), generation)
        except LeaseConflictError:
            winner, _ = self._object.read()
            raise _busy(
                self.directory, self._describe(winner or {}) + ", started just now"
            ) from None
        self._renewed = time.monotonic()
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="lease", daemon=True)
        self._thread.start()
        return self

    def confirm(self) -> None:
        """Raises `LeaseLostError` unless this run still holds the lease.

        When the last renewal is older than two renewal periods (this process was paused, or the
        heartbeat is failing), renews now, so a paused run learns of a takeover before it writes.
        """
        if self._lost is None and time.monotonic() - self._renewed > 2 * self.renew:
            self._renew_or_mark_lost()
        if self._lost is not None:
            raise LeaseLostError(self._lost)

    @property
    def lost(self) -> str | None:
        """Why this run lost the lease, or None while it holds it."""
        return self._lost

    def release(self) -> None:
        """Stops the heartbeat and frees the lease if it is still this run's (idempotent)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._lost is not None:
            return
        with contextlib.suppress(LeaseConflictError, OSError), self._lock:
            self._object.write({**self._content(), "released": True}, self._generation)

    def read(self) -> dict[str, Any] | None:
        """The lease as written by its holder, or None when there is none (or it is unreadable)."""
        return self._object.read()[0]

    def _content(self) -> dict[str, Any]:
        return {**_this_process(), "time": self.started, "token": self.token,
                "heartbeat": self.clock()}  # fmt: skip

    def _renew_or_mark_lost(self) -> None:
        with self._lock:
            if self._lost is not None:
                return
            try:
                self._generation = self._object.write(self._content(), self._generation)
                self._renewed = time.monotonic()
            except LeaseConflictError:
                holder, _ = self._object.read()
                self._lost = (
                    f"this run lost the lease of {self.directory} to "
                    f"{self._describe(holder or {})} (it stopped renewing for more than "
                    f"{self.stale:.0f} s, e.g. while paused): another run may be training there, "
                    "so this one stops without writing anything more"
                )
                logging.error("%s", self._lost)
            except OSError as error:  # transient: retried until the lease could have gone stale
                silent = time.monotonic() - self._renewed
                logging.warning("Could not renew the lease %s: %s", self.path, error)
                if silent > self.stale - self.renew:
                    self._lost = (
                        f"could not renew the lease {self.path} for {silent:.0f} s ({error}): "
                        "another run may have taken the workdir, so this one stops"
                    )
                    logging.error("%s", self._lost)
            except Exception as error:  # noqa: BLE001 - anything else ends the run, visibly
                self._lost = (
                    f"renewing the lease {self.path} failed ({type(error).__name__}: {error}); "
                    "this run stops rather than train without knowing it holds its workdir"
                )
                logging.exception("%s", self._lost)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew) and self._lost is None:
            self._renew_or_mark_lost()

    @staticmethod
    def _describe(holder: dict[str, Any]) -> str:
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
