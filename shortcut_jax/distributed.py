"""Multi-controller JAX: one process per host, joined by `jax.distributed.initialize`.

Imported by every entry point that takes `--distributed` (training, encode_latents); it defines no
flags, so importing it from another CLI is safe.
"""

from __future__ import annotations

import importlib.util

import jax
from absl import logging

_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")


def has_accelerator_plugin() -> bool:
    """Whether a TPU/GPU plugin for jax is installed (otherwise the hosts have only CPUs)."""
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _cached_gloo_collectives_can_hang() -> bool:
    """Whether this jax is one whose cached CPU (gloo) collectives may never return (>= 0.11)."""
    major, minor = (int(part) for part in jax.__version__.split(".")[:2])
    return (major, minor) >= (0, 11)


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """jax.distributed.initialize, with CPU collectives (gloo) when the hosts have only CPUs.

    On TPU pods and under SLURM all three arguments may be None (JAX detects them).
    """
    if jax.config.jax_platforms in ("cpu",) or not has_accelerator_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if _cached_gloo_collectives_can_hang():
            # Measured on jax 0.12.1: two CPU processes that load a cross-process psum from the
            # persistent compilation cache can both wait in it forever (not on jax 0.10.2).
            logging.info(
                "CPU collectives on jax %s: the persistent compilation cache is off.",
                jax.__version__,
            )
            jax.config.update("jax_enable_compilation_cache", False)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    logging.info(
        "Process %d of %d; %d local of %d devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


_MESSAGE_BYTES = 4096


def first_error(error: BaseException | None) -> str | None:
    """Every process learns the error of the first process that had one, or None.

    Call it on every process at the same point (a collective when there is more than one), with
    the exception this process caught there (or None). A check that fails on one process only
    (a file one host cannot see, a flag given to one host) then ends every process with the same
    message, instead of leaving the others waiting in the next collective.

    Returns:
      'process K: <message>' of the lowest failing process K (just the message on one process).
    """
    if jax.process_count() == 1:
        return None if error is None else str(error)
    import numpy as np
    from jax.experimental import multihost_utils

    row = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    if error is not None:
        text = (str(error) or type(error).__name__).encode("utf-8")[:_MESSAGE_BYTES]
        row[0] = 1
        row[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))
    for process, gathered in enumerate(rows.reshape(-1, _MESSAGE_BYTES + 1)):
        if gathered[0]:
            text = bytes(gathered[1:]).rstrip(b"\0").decode("utf-8", errors="replace")
            return f"process {process}: {text}"
    return None
