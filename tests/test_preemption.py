"""Preemption: SIGTERM (one process) or JAX's preemption sync point (two processes) saves the step
reached and exits 0, and a rerun ends with exactly the state of an uninterrupted run. Nothing
non-finite is ever saved or resumed from.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import HookedRun, free_port, tiny_mnist_config

from shortcut_jax import checkpoint, optim, preemption, train

STEP_SECONDS = {"SHORTCUT_JAX_TEST_STEP_SECONDS": "0.1"}


def cli_args(workdir, total_steps: int, checkpoint_every: int, *extra: str) -> list[str]:
    return [
        "--config",
        "tests/tiny.py",
        f"--workdir={workdir}",
        f"--config.total_steps={total_steps}",
        f"--config.checkpoint_every_steps={checkpoint_every}",
        *extra,
    ]


def saved_steps(workdir) -> list[int]:
    """The complete checkpoints in `workdir` (none before its first save)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def assert_same_state(state_a, state_b) -> None:
    """Bitwise: the same compiled steps on the same data, and checkpoints store float32 exactly."""
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b)
    for leaf_a, leaf_b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))


def uninterrupted_state(workdir, total_steps: int, checkpoint_every: int):
    config = tiny_mnist_config(total_steps)
    config.checkpoint_every_steps = checkpoint_every
    train.train_and_evaluate(config, str(workdir))
    return checkpoint.load_run(str(workdir))[1]


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_exits_0_and_the_rerun_ends_as_if_uninterrupted(tmp_path):
    total, every = 30, 100  # no periodic save: the only checkpoint is the preemption's
    workdir = tmp_path / "preempted"
    args = cli_args(workdir, total, every)
    with HookedRun(args, tmp_path / "first.log", STEP_SECONDS) as run:
        reached = run.wait_for_steps(5)
        run.send(signal.SIGTERM)
        assert run.wait() == 0, run.stderr_tail()
    log = run.stderr_tail(100_000)
    (stopped_at,) = saved_steps(workdir)
    assert reached <= stopped_at < total  # the step it had reached, not a later one
    assert f"Preempted: saved step {stopped_at} in {workdir / 'checkpoints'}" in log

    with HookedRun(args, tmp_path / "second.log") as run:
        assert run.wait() == 0, run.stderr_tail()
    assert f"Resumed at step {stopped_at} of {total}" in run.stderr_tail(100_000)
    _, resumed = checkpoint.load_run(str(workdir))
    assert int(resumed.step) == total
    assert_same_state(resumed, uninterrupted_state(tmp_path / "reference", total, every))


def distributed_args(workdir, total: int, every: int, port: int, index: int) -> list[str]:
    return cli_args(
        workdir,
        total,
        every,
        "--distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={index}",
    )


def run_pair(tmp_path, name: str, workdir, total: int, every: int, sigterm_after: int = 0):
    """Two processes; with `sigterm_after`, SIGTERM to process 1 only once it ran that many steps.

    Returns the stderr of each.
    """
    port = free_port()
    env = {**STEP_SECONDS} if sigterm_after else {}
    runs = [
        HookedRun(
            distributed_args(workdir, total, every, port, index),
            tmp_path / f"{name}_{index}.log",
            env,
        )
        for index in range(2)
    ]
    try:
        if sigterm_after:
            runs[1].wait_for_steps(sigterm_after, timeout=180)
            runs[1].send(signal.SIGTERM)
        for run in runs:
            assert run.wait(timeout=180) == 0, run.stderr_tail()
    finally:
        for run in runs:
            run.__exit__()
    return [run.stderr_tail(200_000) for run in runs]


@pytest.mark.slow
def test_two_processes_agree_on_the_preemption_step_save_it_and_resume_exactly(tmp_path):
    total, every = 10, 100
    workdir = tmp_path / "preempted"
    logs = run_pair(tmp_path, "first", workdir, total, every, sigterm_after=2)
    (stopped_at,) = saved_steps(workdir)
    assert stopped_at < total
    for log in logs:  # the notice reached process 0 through JAX's preemption service
        assert f"Preemption notice: saving step {stopped_at}, then stopping." in log
    run_pair(tmp_path, "second", workdir, total, every)

    # The reference: one process with the same 2-device mesh. An all-reduce over 2 devices is one
    # addition, which is commutative in floating point, so the states can agree bitwise.
    reference = tmp_path / "reference"
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    with HookedRun(
        cli_args(reference, total, every), tmp_path / "reference.log", two_devices
    ) as run:
        assert run.wait(timeout=180) == 0, run.stderr_tail()
    _, resumed = checkpoint.load_run(str(workdir))
    assert int(resumed.step) == total
    assert_same_state(resumed, checkpoint.load_run(str(reference))[1])


def test_the_watcher_only_sets_a_flag_on_sigterm_and_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionWatcher(lambda step: False, distributed=False) as watcher:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.reached(2)
    assert signal.getsignal(signal.SIGTERM) is previous

    asked = []
    with preemption.PreemptionWatcher(lambda step: asked.append(step) or step == 3, True) as w:
        assert signal.getsignal(signal.SIGTERM) is previous  # JAX's service keeps SIGTERM
        assert [w.reached(step) for step in (1, 2, 3)] == [False, False, True]
    assert asked == [1, 2, 3]


def test_sigterm_is_answered_while_a_program_runs_not_after_it():
    @jax.jit
    def spin(x, iterations):  # dispatched asynchronously, like a sampling program
        return jax.lax.fori_loop(0, iterations, lambda i, y: jnp.tanh(y @ y), x)

    x = jnp.full((512, 512), 1.0 / 512)
    start = time.monotonic()
    spin(x, 8).block_until_ready()  # compiles and times 8 iterations
    spin(x, 8).block_until_ready()
    per_iteration = max((time.monotonic() - start) / 16, 1e-4)
    iterations = int(3.0 / per_iteration)  # about 3 s on this machine, whatever its speed

    def stop(signum, frame):
        raise preemption.Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        result = spin(x, iterations)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        start = time.monotonic()
        with pytest.raises(preemption.Terminated):
            preemption.wait_until_ready(result)
        assert time.monotonic() - start < 1.5
        assert not result.is_ready()  # answered while the program was still running
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert np.isfinite(np.asarray(preemption.wait_until_ready(result))).all()


def _infinite_gradient_at(step: int) -> optax.GradientTransformation:
    """Replaces the gradient of update number `step` (1-based) with +inf; the loss stays finite."""

    def update(updates, count, params=None):
        del params
        bad = count == step - 1
        return jax.tree.map(lambda g: jnp.where(bad, jnp.inf, g), updates), count + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


def test_an_infinite_gradient_with_a_finite_loss_is_never_saved(tmp_path, monkeypatch):
    real_make_optimizer = optim.make_optimizer
    monkeypatch.setattr(
        optim,
        "make_optimizer",
        lambda config: optax.chain(_infinite_gradient_at(6), real_make_optimizer(config)),
    )
    workdir = str(tmp_path / "run")
    config = tiny_mnist_config(6)  # saves at 3 and 6; the update of step 6 is infinite
    with pytest.raises(checkpoint.NonFiniteStateError) as raised:
        train.train_and_evaluate(config, workdir)
    message = str(raised.value)
    assert "at step 6 holds NaN or inf" in message
    assert f"the newest checkpoint, step 3 in {tmp_path / 'run' / 'checkpoints'}" in message
    assert saved_steps(tmp_path / "run") == [3]
    _, state = checkpoint.load_run(workdir)
    assert int(state.step) == 3 and checkpoint.is_finite(state)


def test_a_checkpoint_holding_nan_is_refused_on_resume(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_mnist_config(3), str(workdir))
    _, state = checkpoint.load_run(str(workdir))
    poisoned = state.replace(ema_params=jax.tree.map(lambda x: x * jnp.nan, state.ema_params))
    manager = checkpoint.make_manager(str(workdir))
    manager.save(  # as code from before the finite check could have
        4,
        args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardSave(poisoned),
            config=checkpoint.ocp.args.JsonSave(tiny_mnist_config(3).to_dict()),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/4 holds NaN or inf"):
        train.train_and_evaluate(tiny_mnist_config(6), str(workdir))
    with pytest.raises(checkpoint.NonFiniteStateError, match="no checkpoint was saved yet"):
        checkpoint.save(checkpoint.make_manager(str(tmp_path / "empty")), poisoned, None, 1)
