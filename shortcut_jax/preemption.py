"""When to stop for a preemption: SIGTERM on one process, JAX's preemption sync point on many.

One process: a SIGTERM handler that only sets a flag, read by the train loop after each step.
Several processes (`jax.distributed` initialised): JAX's preemption service owns SIGTERM. A
notice on any process reaches all of them, and `sync_point(step)` (for example
`CheckpointManager.reached_preemption`) turns True on every process at the same step, so all of
them save that step. The loop then saves, waits for the save, and returns; `main` exits 0.

Phases that can stop at once instead of at a step: inside `PreemptionWatcher.interruptible()` (the
final sample grids and evaluation of a run, after its last checkpoint is saved) a SIGTERM raises
`Terminated` where the program is, and `exit_on_sigterm` does the same for a whole CLI (`sample`,
`evaluate`) and turns it into one line on stderr and exit status 143 (128 + SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import jax
from absl import logging

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """SIGTERM arrived during a phase that stops at once rather than at the next step.

    A BaseException, so that `except Exception` blocks on the way up do not swallow it.
    """


class PreemptionWatcher:
    """Tells the train loop, once per step, whether to save and stop.

    `install()` (or entering it as a context manager) sets the SIGTERM handler; `uninstall()`
    (or leaving the context) restores the previous one.

    Args:
      sync_point: `step -> bool`, JAX's preemption sync point (called at every step on every
        process, as JAX requires, when `jax.distributed` is initialised).
      distributed: whether JAX's preemption service owns SIGTERM; default
        `jax.distributed.is_initialized()`.
    """

    def __init__(self, sync_point: Callable[[int], bool], distributed: bool | None = None):
        self.sync_point = sync_point
        self.distributed = jax.distributed.is_initialized() if distributed is None else distributed
        self.signal_received = False
        self._previous_handler: Any = None
        self._installed = False
        self._raise_now = False

    def install(self) -> None:
        """Installs the SIGTERM handler (one process, main thread only)."""
        if self.distributed or self._installed:
            return  # a Python handler would replace the one JAX's service relies on
        if threading.current_thread() is not threading.main_thread():
            logging.warning(
                "Training outside the main thread: SIGTERM keeps its default action (no save on "
                "preemption), since Python installs signal handlers only from the main thread."
            )
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def uninstall(self) -> None:
        """Restores the SIGTERM handler that was there before `install`."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._installed = False

    def __enter__(self) -> PreemptionWatcher:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.signal_received = True
        if self._raise_now:
            self._raise_now = False
            raise Terminated()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within the block, a SIGTERM (or one received before it) raises `Terminated` at once.

        Only where this watcher owns SIGTERM (one process); with `jax.distributed`, JAX's
        preemption service does, and the block runs to its end.
        """
        if not self._installed:
            yield
            return
        if self.signal_received:
            raise Terminated()
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop (the same answer on every process)."""
        stop = bool(self.sync_point(step)) if self.distributed else self.signal_received
        if stop:
            logging.warning("Preemption notice: saving step %d, then stopping.", step)
        return stop


def wait_until_ready(tree: Any, poll_seconds: float = 0.02) -> Any:
    """Waits for every jax.Array in `tree` in short sleeps, so signals are handled meanwhile.

    Python runs a signal handler only between bytecodes of the main thread, so a main thread
    blocked in a transfer (``np.asarray`` of a result still being computed) answers SIGTERM only
    when the program ends: up to ~40 s for 256 samples at 128 steps on a CPU. Dispatch is
    asynchronous, so waiting here first bounds that delay by `poll_seconds`.

    Returns:
      `tree`, computed.
    """
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            while not leaf.is_ready():
                time.sleep(poll_seconds)
    return tree


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise Terminated()


@contextlib.contextmanager
def exit_on_sigterm(unwritten: str) -> Iterator[None]:
    """For a CLI's body: SIGTERM stops it at once with ``error: ...`` and exit status 143.

    Args:
      unwritten: what the message says about the outputs, e.g. "nothing was written".
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        print(f"error: stopped by SIGTERM: {unwritten}; rerun the same command", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave at once: the runtime's threads may be inside a computation the signal cut short,
        # and tearing the interpreter down under them can crash. Nothing is left to write.
        os._exit(TERMINATED_EXIT_CODE)
    finally:
        signal.signal(signal.SIGTERM, previous)
