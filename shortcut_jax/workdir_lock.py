"""One training run per workdir, with no lock a dead run can leave stuck.

* Local workdirs: `WorkdirLock`, an exclusive `fcntl.flock` on WORKDIR/run.lock. The kernel drops
  it when the holder's file is closed, at exit or when the process is killed, so a crashed run
  never blocks its rerun.
* Bucket workdirs (gs://...): object stores have no such lock, so `BucketLease` writes
  WORKDIR/run.lease.json (holder and heartbeat time) and renews it from a daemon thread every
  `RENEW_SECONDS`. A start refuses a lease renewed within `STALE_SECONDS` and takes over an older
  one: a killed run blocks its rerun for at most `STALE_SECONDS` (the refusal says how long). Two
  starts racing within the same second are told apart by re-reading the lease after
  `SETTLE_SECONDS` (the last writer keeps it); the heartbeat compares host clocks, which NTP keeps
  within far less than the stale time.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath

from shortcut_jax import atomic_files

LOCK_NAME = "run.lock"
HOLDER_NAME = "run.lock.json"
LEASE_NAME = "run.lease.json"
RENEW_SECONDS = 30.0
STALE_SECONDS = 180.0
SETTLE_SECONDS = 2.0


class RunGuardError(RuntimeError):
    """A training start is refused before any work; the message says why and what to do."""


class WorkdirBusyError(RunGuardError):
    """Another run is training in the same workdir."""


class WorkdirUnusableError(RunGuardError):
    """The workdir cannot be written, or its disk is (nearly) full."""


def lock_for(workdir: str) -> WorkdirLock | BucketLease:
    """The lock that fits `workdir`: a flock for local paths, a lease for bucket paths."""
    return BucketLease(workdir) if atomic_files.is_remote(workdir) else WorkdirLock(workdir)


def _this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": _now()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _busy(directory: str, holder: str, extra: str = "") -> WorkdirBusyError:
    return WorkdirBusyError(
        f"another run is training in {directory} ({holder}): wait for it to finish, stop it, "
        f"or pass another --workdir{extra}"
    )


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
                    f"cannot lock {self.path} ({error}): this file system has no working flock"
                ) from None
            raise _busy(self.directory, self._holder()) from None
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


class BucketLease:
    """WORKDIR/run.lease.json renewed by a heartbeat thread; a lease older than `stale` is free.

    Works on any `epath` path (tests use local ones); `lock_for` picks it for bucket workdirs.
    """

    def __init__(
        self,
        workdir: str,
        renew: float = RENEW_SECONDS,
        stale: float = STALE_SECONDS,
        settle: float = SETTLE_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self.directory = str(workdir)
        self.path = epath.Path(workdir) / LEASE_NAME
        self.renew, self.stale, self.settle, self.clock = renew, stale, settle, clock
        self.token = uuid.uuid4().hex
        self.started = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> BucketLease:
        """Takes the lease unless a live run holds it; starts the heartbeat.

        Raises:
          WorkdirBusyError: the lease was renewed less than `stale` seconds ago by another run,
            or another start took it in the same moment.
        """
        holder = self.read()
        if holder is not None and holder.get("token") != self.token:
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
        self._write()
        time.sleep(self.settle)
        winner = self.read()
        if winner is None or winner.get("token") != self.token:
            raise _busy(self.directory, self._describe(winner or {}) + ", started just now")
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still this run's (idempotent)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        holder = self.read()
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def read(self) -> dict[str, Any] | None:
        """The lease as written by its holder, or None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        atomic_files.write_json(
            self.path,
            {
                **_this_process(),
                "time": self.started,
                "token": self.token,
                "heartbeat": self.clock(),
            },
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew):
            try:
                self._write()
            except OSError as error:  # keep training; the next renewal may get through
                logging.warning("Could not renew the lease %s: %s", self.path, error)

    @staticmethod
    def _describe(holder: dict[str, Any]) -> str:
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
