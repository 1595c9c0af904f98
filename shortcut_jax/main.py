"""Train a shortcut model.

    python -m shortcut_jax.main --config experiments/mnist.py --workdir runs/mnist \
        [--config.total_steps=2000] [--config.model.preset=DiT-B/2]

--config takes path/to/file.py or path/to/file.py:variant (e.g. experiments/imagenet256.py:tiny;
the text after ':' goes to the file's get_config) and --config.FIELD=VALUE overrides any field.
Rerunning the same command resumes from the newest checkpoint in --workdir. On SIGTERM (a
preemption) it saves the step reached, waits for the save and exits 0. Bad flags, an empty
--workdir and a config that cannot be loaded or that config_lib.validate refuses end it with one
`error: ...` line and exit status 2; a NaN/inf loss or state, an unreadable checkpoint, bad data
and a workdir it must not train in (busy, unwritable, another run's config) with one line and
exit status 1 (`shortcut_jax.cli_inputs` has the rule every CLI follows).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from shortcut_jax import checkpoint, cli_inputs, config_lib, run_guard, train
from shortcut_jax.data.checks import BadDataError
from shortcut_jax.distributed import first_error, initialize_distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, cli_inputs.CONFIG_FLAG_HELP, lock_config=True
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


# INFO lines of Orbax and of XLA's backend probing are hidden; the rest of the train log shows.
NOISY_MODULES = ("/orbax/", "xla_bridge.py", "signaling_client.py", "replica_slices.py")


def main(argv: list[str]) -> None:
    """Validates the config, then runs train.train_and_evaluate."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli_inputs.quiet_library_logs(shown=None, hidden=NOISY_MODULES)
    with cli_inputs.errors_as_one_line(
        run_guard.RunGuardError,  # refused before any work: say why, no traceback
        checkpoint.CheckpointError,  # the messages name the checkpoint to use
        checkpoint.NonFiniteStateError,
        train.NonFiniteLossError,
        BadDataError,
    ):
        _train()


def _train() -> None:
    if not _WORKDIR.value.strip():  # "" would train into the current directory
        raise cli_inputs.InputError(
            f"--workdir={_WORKDIR.value!r} is empty: pass the run's directory, "
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
        raise cli_inputs.InputError(message)
    logging.info("JAX devices: %s", jax.devices())
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli_inputs.run(main)
