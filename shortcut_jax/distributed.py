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


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """jax.distributed.initialize, with CPU collectives (gloo) when the hosts have only CPUs.

    On TPU pods and under SLURM all three arguments may be None (JAX detects them).
    """
    if jax.config.jax_platforms in ("cpu",) or not has_accelerator_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
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
