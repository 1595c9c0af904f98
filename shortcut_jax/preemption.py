"""When to stop for a preemption: SIGTERM on one process, JAX's preemption sync point on many.

One process: a SIGTERM handler that only sets a flag, read by the train loop after each step.
Several processes (`jax.distributed` initialised): JAX's preemption service owns SIGTERM. A
notice on any process reaches all of them, and `sync_point(step)` (for example
`CheckpointManager.reached_preemption`) turns True on every process at the same step, so all of
them save that step. The loop then saves, waits for the save, and returns; `main` exits 0.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import jax
from absl import logging


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

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop (the same answer on every process)."""
        stop = bool(self.sync_point(step)) if self.distributed else self.signal_received
        if stop:
            logging.warning("Preemption notice: saving step %d, then stopping.", step)
        return stop
