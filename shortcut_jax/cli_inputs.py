"""Checks of the command-line inputs the sample, evaluate and fid_stats CLIs share.

Each check raises `InputError` naming the flag (or file), the value and what to do; the CLIs run
their body inside `errors_as_one_line`, which prints ``error: <message>`` on stderr and exits
with status 2 (as argparse and absl do for usage errors), without a traceback. Only
`check_output_directory` writes (the output directory and a probe it deletes): a workdir that is
not a run is reported, never turned into one.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
from collections.abc import Iterator

USAGE_EXIT_CODE = 2


class InputError(ValueError):
    """A command-line value or input file the CLI cannot run with."""


@contextlib.contextmanager
def errors_as_one_line(*kinds: type[BaseException]) -> Iterator[None]:
    """Turns `InputError` (and `kinds`) raised inside into ``error: ...`` and exit status 2."""
    try:
        yield
    except (InputError, *kinds) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


def parse_flags(argv: list[str], exit_code: int = USAGE_EXIT_CODE) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=...)`, with a bad flag, --config file
    or --config.FIELD override reported in one line (a config file's traceback reduced to its
    first and last lines) and `exit_code` instead of a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = f"{lines[0]} {lines[-1]}" if "Traceback" in str(error) else " ".join(lines)
    except (AttributeError, KeyError) as error:
        message = f"a --config.FIELD override names a field the config does not have: {error}"
    except (TypeError, ValueError, OSError) as error:
        message = f"--config: {' '.join(str(error).split())}"
    print(f"error: {message}\nPass --helpfull for the flags.", file=sys.stderr)
    sys.exit(exit_code)


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
      InputError: naming `flag`, the directory and the OS error or the free space.
    """
    from shortcut_jax import atomic_files

    try:
        atomic_files.probe_writable(directory)
    except OSError as error:
        raise InputError(
            f"{flag}: cannot write to {directory} ({type(error).__name__}: {error})"
        ) from None
    if atomic_files.is_remote(directory):
        return
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise InputError(
            f"{flag}: the disk of {directory} has {free / 2**20:,.0f} MiB free, the output needs "
            f"about {needed_bytes / 2**20:,.0f} MiB: free some space or write elsewhere"
        )


def saved_steps(workdir: str) -> list[int]:
    """The finalized checkpoint steps of the run in `workdir`, read without writing anything.

    Raises:
      InputError: if `workdir` is empty, does not exist, or holds no checkpoint.
    """
    import orbax.checkpoint as ocp

    from shortcut_jax import checkpoint

    if not workdir or not str(workdir).strip():
        raise InputError("--workdir is empty: pass the directory a training run wrote to")
    root = checkpoint.workdir_path(workdir)
    if not root.is_dir():
        raise InputError(f"--workdir={workdir}: no such directory")
    directory = checkpoint.checkpoint_dir(workdir)
    if not directory.is_dir():
        raise InputError(
            f"--workdir={workdir} is not a training run (it has no checkpoints/ directory): "
            "pass the --workdir given to python -m shortcut_jax.main"
        )
    steps = sorted(ocp.path.step.checkpoint_steps(directory))
    if not steps:
        raise InputError(
            f"--workdir={workdir}: no finished checkpoint in {directory} yet; train first "
            "(python -m shortcut_jax.main --config ... --workdir ...)"
        )
    return steps


def checkpoint_step(workdir: str, step: int | None) -> int:
    """The checkpoint step to load: `step` if it was saved, else the newest when None.

    Raises:
      InputError: as `saved_steps`, or naming the saved steps when `step` is not among them.
    """
    steps = saved_steps(workdir)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise InputError(
            f"--checkpoint_step={step}: no checkpoint at that step in {workdir}; "
            f"saved steps: {steps}"
        )
    return step
