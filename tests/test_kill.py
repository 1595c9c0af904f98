"""SIGKILL anywhere, even inside an async checkpoint write: every restart resumes from the newest
complete checkpoint and the run ends with exactly the state of an uninterrupted run. Temporary
directories of a killed save are removed when training starts again (never by readers).
"""

from __future__ import annotations

import random
import signal
import time

import pytest
from test_preemption import assert_same_state, cli_args, saved_steps, uninterrupted_state
from tiny import HookedRun, tiny_mnist_config

from shortcut_jax import checkpoint, train

TOTAL, EVERY = 24, 4
HOOKS = {  # 50 ms steps; each save's temporary directory stays ~2 s before its rename
    "SHORTCUT_JAX_TEST_STEP_SECONDS": "0.05",
    "SHORTCUT_JAX_TEST_SAVE_DELAY_SECONDS": "1.0",
}
TMP_MARK = ".orbax-checkpoint-tmp"


def temporary_dirs(workdir, newer_than: float = 0.0) -> list[str]:
    """Names of the temporary checkpoint directories (modified after `newer_than`, a time)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    names = []
    for path in directory.iterdir():
        try:
            if TMP_MARK in path.name and path.stat().st_mtime > newer_than:
                names.append(path.name)
        except FileNotFoundError:  # renamed into place (or cleaned up) meanwhile
            continue
    return sorted(names)


def kill_at(run: HookedRun, moment: str, workdir, rng: random.Random) -> None:
    """Sends SIGKILL to `run` at `moment`, once the run got there."""
    launched, saved_before = time.time(), saved_steps(workdir)
    if moment == "inside a save":  # after this run completed one save, inside its next one

        def inside_a_save() -> bool:
            completed = saved_steps(workdir) != saved_before
            return completed and bool(temporary_dirs(workdir, newer_than=launched))

        run.wait_for(inside_a_save, what="a save in flight after a completed one")
    elif moment == "after random steps":
        run.wait_for_steps(rng.randint(2, 8))
        time.sleep(rng.uniform(0.0, 0.05))
    else:  # "at a random time" after the launch: imports, restore, compile or steps
        time.sleep(rng.uniform(0.0, 15.0))
    run.send(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, f"{moment}: the run ended before the kill"


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_a_save_ends_as_if_uninterrupted(tmp_path):
    workdir = tmp_path / "killed"
    rng = random.Random(20261201)  # random moments, the same in every CI run
    starts = []
    for attempt, moment in enumerate(["at a random time", "inside a save", "after random steps"]):
        with HookedRun(cli_args(workdir, TOTAL, EVERY), tmp_path / f"{attempt}.log", HOOKS) as run:
            kill_at(run, moment, workdir, rng)
        starts.append(saved_steps(workdir)[-1:])
        if moment == "inside a save":
            assert temporary_dirs(workdir), "the kill should have landed inside the save"

    with HookedRun(cli_args(workdir, TOTAL, EVERY), tmp_path / "last.log") as run:
        assert run.wait() == 0, run.stderr_tail()
    assert any(starts), "no kill came after a completed save: nothing was resumed"
    assert temporary_dirs(workdir) == []
    assert saved_steps(workdir)[-1] == TOTAL
    _, resumed = checkpoint.load_run(str(workdir))
    assert_same_state(resumed, uninterrupted_state(tmp_path / "reference", TOTAL, EVERY))


def test_a_killed_saves_temporary_directory_is_removed_by_the_next_start_not_by_readers(
    tmp_path,
):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_mnist_config(3), str(workdir))
    leftover = workdir / "checkpoints" / f"9{TMP_MARK}"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "partial").write_bytes(b"half a shard")

    checkpoint.load_run(str(workdir))  # a reader (sampling, evaluation) leaves it alone
    assert leftover.exists()
    train.train_and_evaluate(tiny_mnist_config(6), str(workdir))
    assert temporary_dirs(workdir) == [] and saved_steps(workdir) == [3, 6]
