"""The rules every command-line tool of shortcut_jax shares: flags, inputs, exit status, logs.

Exit status (the same for `main`, `sample`, `evaluate`, `compile` and the `tools/`):

  0  it did what was asked; also `--help`, and a training run that SIGTERM stopped after saving.
  1  the command line is well formed but the run failed: a file or directory it names is missing,
     unreadable, corrupt or not what it must be (a workdir that is not a run, no checkpoint at
     --checkpoint_step, a truncated .npz, a workdir another run holds or whose saved config
     differs), NaN or inf in a checkpoint, loss or samples, an output that cannot be written or
     does not fit on the disk. An uncaught exception (a bug; it keeps its traceback) is 1 too.
     `compile` also ends with 1 when a program does not fit the chips.
  2  usage error, the command line itself is wrong: an unknown, malformed or missing flag, a
     value outside what the flag allows (also for the run it names: --steps above the run's
     denoise_timesteps, --label beyond its classes), flags that contradict each other, or a
     --config that cannot be loaded or that `config_lib.validate` refuses.
  143  `sample` and `evaluate` stopped by SIGTERM (128 + 15; nothing half-written is left).

Every 1 and 2 that is not a bug is one line, ``error: <message>`` on stderr, with no traceback.
The rule lives here: `InputError` (2) and `InputFileError` (1) carry their status,
`errors_as_one_line` applies it to the errors a CLI names, `parse_flags` to bad flags and `run`
(the CLIs' `app.run`) to `app.UsageError` and the help flags.

Logs: `run` shows the INFO lines of shortcut_jax's own modules only, and every library's
warnings and errors (`quiet_library_logs`); pass --verbosity=1 to see the libraries' INFO (and
DEBUG) lines too. Only `check_output_directory` writes (the output directory and a probe it
deletes): a workdir that is not a run is reported, never turned into one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

FAILURE_EXIT_CODE = 1
USAGE_EXIT_CODE = 2

CONFIG_FLAG_HELP = (
    "The run's config: path/to/file.py, or path/to/file.py:variant, whose text after ':' is "
    "passed to the file's get_config(variant), e.g. experiments/imagenet256.py:tiny (the paper "
    "configs experiments/imagenet256.py and celebahq256.py have :b2, the default, :xl and :tiny, a "
    "CPU smoke run). Override any field with --config.FIELD=VALUE, e.g. --config.total_steps=2000 "
    "--config.model.depth=2."
)


class InputError(ValueError):
    """A command-line value the CLI cannot run with: the command must change (exit status 2)."""

    exit_code = USAGE_EXIT_CODE


class InputFileError(InputError):
    """A file or directory named on the command line is missing, unreadable, corrupt or not what
    it must be, or an output cannot be written: the command is well formed (exit status 1)."""

    exit_code = FAILURE_EXIT_CODE


def exit_code(error: BaseException) -> int:
    """The exit status for `error`: its class's `exit_code`, else 1 (a run-time failure)."""
    return getattr(error, "exit_code", FAILURE_EXIT_CODE)


@contextlib.contextmanager
def errors_as_one_line(
    *failures: type[BaseException], usage: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Turns errors raised inside into ``error: <message>`` on stderr and an exit status.

    An error whose class has an `exit_code` exits with it (`InputError` 2, `InputFileError` 1),
    other `usage` kinds with 2 and `failures` kinds with 1; anything else keeps its traceback.
    """
    try:
        yield
    except (InputError, *usage, *failures) as error:
        print(f"error: {error}", file=sys.stderr)
        default = USAGE_EXIT_CODE if isinstance(error, usage) else FAILURE_EXIT_CODE
        raise SystemExit(getattr(error, "exit_code", default)) from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=...)`, with a bad flag, --config file
    or --config.FIELD override reported in one line (a config file's traceback reduced to its
    first and last lines) and exit status 2 instead of a traceback; --help and --helpfull,
    which absl ends with status 1, end with 0."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = f"{lines[0]} {lines[-1]}" if "Traceback" in str(error) else " ".join(lines)
    except (AttributeError, KeyError) as error:
        message = f"a --config.FIELD override names a field the config does not have: {error}"
    except (TypeError, ValueError, OSError, SyntaxError) as error:
        message = f"--config: {' '.join(str(error).split())}"
    except SystemExit as stop:  # only the help flags exit while flags are parsed
        sys.exit(0 if stop.code == FAILURE_EXIT_CODE else stop.code)
    print(f"error: {message}\nPass --helpfull for the flags.", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def run(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)` with the rules above: flags parsed by `parse_flags`, only this
    package's INFO lines shown (`quiet_library_logs`), and `app.UsageError` (such as unexpected
    positional arguments) as one ``error:`` line and exit status 2."""
    from absl import app

    def checked_main(argv: list[str]) -> Any:
        quiet_library_logs()
        try:
            return main(argv)
        except app.UsageError as error:
            print(f"error: {error}\nPass --help for the flags.", file=sys.stderr)
            sys.exit(USAGE_EXIT_CODE)

    app.run(checked_main, flags_parser=parse_flags)  # exits with main's status


OWN_MODULES = f"{os.sep}shortcut_jax{os.sep}"


class _LibraryInfoFilter(logging.Filter):
    """Passes every warning and error; INFO and DEBUG records only from modules whose path holds
    one of `shown` (every module when None) and none of `hidden`."""

    def __init__(self, shown: tuple[str, ...] | None, hidden: tuple[str, ...]):
        super().__init__()
        self.shown, self.hidden = shown, hidden

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        path = record.pathname
        if any(part in path for part in self.hidden):
            return False
        return self.shown is None or any(part in path for part in self.shown)


def quiet_library_logs(
    shown: tuple[str, ...] | None = (OWN_MODULES,), hidden: tuple[str, ...] = ()
) -> None:
    """Hides INFO and DEBUG lines of other libraries (Orbax writes ~30 per checkpoint read) on the
    absl log handler; warnings and errors of everyone still show. Replaces an earlier call's
    choice. Does nothing when the verbosity is above INFO (--verbosity=1): everything shows.

    Args:
      shown: path parts of the modules whose INFO lines show (None: every module's).
      hidden: path parts of modules whose INFO lines never show.
    """
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    for old in [f for f in handler.filters if isinstance(f, _LibraryInfoFilter)]:
        handler.removeFilter(old)
    if absl_logging.get_verbosity() <= absl_logging.INFO:
        handler.addFilter(_LibraryInfoFilter(shown, hidden))


MAX_COUNT = 2**31 - 1  # sample counts, batch sizes, grid sizes: what an array index holds


def check_positive(flag: str, value: int, maximum: int = MAX_COUNT) -> int:
    """`value` if it is an integer in [1, maximum], else InputError naming `flag`."""
    if value is None or not 1 <= value <= maximum:
        raise InputError(f"{flag}={value}: must be a positive integer (at most {maximum:,})")
    return value


def check_seed(flag: str, value: int) -> int:
    """`value` if it can seed the PRNG (an integer in [0, 2**32)), else InputError naming it."""
    if value is None or not 0 <= value < 2**32:
        raise InputError(f"{flag}={value}: must be an integer in [0, 2**32)")
    return value


def check_guidance_scale(flag: str, value: float | None) -> float | None:
    """`value` (None = the run's default) if it is finite and >= 0, else InputError."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InputError(
            f"{flag}={value}: the guidance scale must be a finite number >= 0 "
            "(1 = no guidance); leave it out to use the run's sample_cfg_scale"
        )
    return value


def check_output_directory(flag: str, directory: str, needed_bytes: int) -> None:
    """Creates `directory` and writes a probe there; checks the free space for local paths.

    Called before sampling, so an unwritable or full output disk is reported in seconds, not
    after the samples are computed.

    Raises:
      InputFileError: naming `flag`, the directory and the OS error or the free space.
    """
    from shortcut_jax import atomic_files

    try:
        atomic_files.probe_writable(directory)
    except OSError as error:
        raise InputFileError(
            f"{flag}: cannot write to {directory} ({type(error).__name__}: {error})"
        ) from None
    if atomic_files.is_remote(directory):
        return
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise InputFileError(
            f"{flag}: the disk of {directory} has {free / 2**20:,.0f} MiB free, the output needs "
            f"about {needed_bytes / 2**20:,.0f} MiB: free some space or write elsewhere"
        )


def saved_steps(workdir: str) -> list[int]:
    """The finalized checkpoint steps of the run in `workdir`, read without writing anything.

    Raises:
      InputError: if `workdir` is empty (a usage error).
      InputFileError: if `workdir` does not exist or holds no checkpoint.
    """
    import orbax.checkpoint as ocp

    from shortcut_jax import checkpoint

    if not workdir or not str(workdir).strip():
        raise InputError("--workdir is empty: pass the directory a training run wrote to")
    root = checkpoint.workdir_path(workdir)
    if not root.is_dir():
        raise InputFileError(f"--workdir={workdir}: no such directory")
    directory = checkpoint.checkpoint_dir(workdir)
    if not directory.is_dir():
        raise InputFileError(
            f"--workdir={workdir} is not a training run (it has no checkpoints/ directory): "
            "pass the --workdir given to python -m shortcut_jax.main"
        )
    steps = sorted(ocp.path.step.checkpoint_steps(directory))
    if not steps:
        raise InputFileError(
            f"--workdir={workdir}: no finished checkpoint in {directory} yet; train first "
            "(python -m shortcut_jax.main --config ... --workdir ...)"
        )
    return steps


def checkpoint_step(workdir: str, step: int | None) -> int:
    """The checkpoint step to load: `step` if it was saved, else the newest when None.

    Raises:
      InputError: as `saved_steps`.
      InputFileError: as `saved_steps`, or naming the saved steps when `step` is not one.
    """
    steps = saved_steps(workdir)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise InputFileError(
            f"--checkpoint_step={step}: no checkpoint at that step in {workdir}; "
            f"saved steps: {steps}"
        )
    return step
