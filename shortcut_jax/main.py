"""Train a shortcut model.

    python -m shortcut_jax.main --config experiments/mnist.py --workdir runs/mnist \
        [--config.total_steps=2000] [--config.model.preset=DiT-B/2]

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from shortcut_jax import config_lib, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiments/*.py config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first: one process per host. On TPU pods and SLURM the "
    "coordinator, process count and id are detected; elsewhere pass the three flags below.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --distributed, off TPU/SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """jax.distributed.initialize, with CPU collectives (gloo) when the hosts have only CPUs."""
    if jax.config.jax_platforms in ("cpu",) or not _has_accelerator_plugin():
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


def _has_accelerator_plugin() -> bool:
    import importlib.util

    return any(
        importlib.util.find_spec(name) is not None
        for name in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")
    )


class _QuietLibraries:
    """Drops INFO lines from Orbax and XLA's backend probing; warnings and errors still show."""

    NOISY = ("/orbax/", "xla_bridge.py", "signaling_client.py", "replica_slices.py")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(part in record.pathname for part in self.NOISY)


def main(argv: list[str]) -> None:
    """Validates the config, then runs train.train_and_evaluate."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _DISTRIBUTED.value:
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    logging.info("JAX devices: %s", jax.devices())
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
