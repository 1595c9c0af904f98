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
    "Call jax.distributed.initialize() first (multi-host TPU pods and GPU clusters).",
)
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
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    try:
        config_lib.validate(_CONFIG.value)
    except config_lib.ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    logging.info("JAX devices: %s", jax.devices())
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
