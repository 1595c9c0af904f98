"""Train a shortcut model.

    python -m shortcut_jax.main --config experiments/mnist.py --workdir runs/mnist \
        [--config.total_steps=2000] [--config.model.preset=DiT-B/2]

Rerunning the same command resumes from the newest checkpoint in --workdir. On SIGTERM (a
preemption) it saves the step reached, waits for the save and exits 0; a NaN/inf loss or state and
an unreadable checkpoint end it with one `error: ...` line and exit status 1.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from shortcut_jax import checkpoint, cli_inputs, config_lib, run_guard, train
from shortcut_jax.data.checks import BadDataError
from shortcut_jax.distributed import first_error, initialize_distributed

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
    if not _WORKDIR.value.strip():  # "" would train into the current directory
        raise SystemExit(
            f"error: --workdir={_WORKDIR.value!r} is empty: pass the run's directory, "
            "e.g. --workdir runs/mnist (rerunning with the same one resumes it)"
        )
    if _DISTRIBUTED.value:
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        config_lib.validate(_CONFIG.value)
        invalid = None
    except config_lib.ConfigError as error:
        invalid = error
    except OSError as error:  # ml_collections could not load the --config file
        invalid = config_lib.ConfigError(f"--config: {' '.join(str(error).split())}")
    message = first_error(invalid)  # every process stops if any one's config is refused
    if message is not None:
        raise SystemExit(f"error: {message}")
    logging.info("JAX devices: %s", jax.devices())
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except run_guard.RunGuardError as error:  # refused before any work: say why, no traceback
        raise SystemExit(f"error: {error}") from None
    except (
        checkpoint.CheckpointError,
        checkpoint.NonFiniteStateError,
        train.NonFiniteLossError,
        BadDataError,
    ) as error:
        raise SystemExit(f"error: {error}") from None  # the message names the checkpoint to use


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli_inputs.parse_flags(argv, exit_code=1))
