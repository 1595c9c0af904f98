"""The run lease on a real GCS API (fake-gcs-server): compare-and-swap on the lease object's
generation, so exactly one run holds a bucket workdir, and a run paused past its lease learns at
its next renewal that another took over, and stops without writing anything more.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from etils import epath
from tiny import HookedRun

from shortcut_jax import checkpoint, run_guard, workdir_lock


def _lease(workdir: str, **timing: float) -> workdir_lock.BucketLease:
    return workdir_lock.BucketLease(workdir, **{"renew": 0.2, "stale": 1.5, **timing})


def test_of_many_starts_at_once_on_a_bucket_exactly_one_takes_the_lease(gcs_bucket):
    workdir = f"{gcs_bucket}/run"
    leases = [_lease(workdir) for _ in range(4)]
    barrier, outcomes = threading.Barrier(len(leases)), []

    def start(lease: workdir_lock.BucketLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("held")
        except run_guard.WorkdirBusyError:
            outcomes.append("busy")

    threads = [threading.Thread(target=start, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["busy", "busy", "busy", "held"]
    (holder,) = [lease for lease in leases if lease._thread is not None]
    assert holder.read()["token"] == holder.token
    holder.confirm()
    holder.release()


def test_a_paused_holder_is_taken_over_and_stops_at_its_next_renewal(gcs_bucket):
    workdir = f"{gcs_bucket}/run"
    paused = _lease(workdir).acquire()
    with pytest.raises(run_guard.WorkdirBusyError, match="lease renewed 0 s ago"):
        _lease(workdir).acquire()
    paused._stop.set()  # the process stops (SIGSTOP, a frozen VM): its heartbeat stops too
    paused._thread.join()
    time.sleep(1.7)  # longer than the stale time
    other = _lease(workdir).acquire()
    with pytest.raises(run_guard.LeaseLostError, match="lost the lease .* to pid"):
        paused.confirm()  # woken up: the renewal finds another generation, and says so
    paused._thread = None
    assert other.read()["token"] == other.token
    other.confirm()
    other.release()


def test_any_error_in_the_heartbeat_ends_the_run_visibly(gcs_bucket):
    lease = _lease(f"{gcs_bucket}/run").acquire()

    def broken(*args, **kwargs):
        raise TypeError("a bug in the renewal")

    lease._object.write = broken
    deadline = time.monotonic() + 10
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(run_guard.LeaseLostError, match="TypeError: a bug in the renewal"):
        lease.confirm()
    lease.release()


@pytest.mark.slow
def test_two_trainings_on_one_bucket_workdir_one_trains_and_a_paused_one_stops(
    gcs_bucket, tmp_path
):
    """Of two runs started on one bucket workdir exactly one trains; SIGSTOP it past its lease and
    a rerun takes over; SIGCONT and the paused run stops at its next renewal, before any save."""
    workdir = f"{gcs_bucket}/run"
    args = ["--config", "tests/tiny.py", "--workdir", workdir, f"--config.total_steps={TOTAL}",
            "--config.checkpoint_every_steps=5", "--config.log_every_steps=1"]  # fmt: skip
    env = {workdir_lock.RENEW_ENV: "0.5", workdir_lock.STALE_ENV: "4"}
    slow = {**env, "SHORTCUT_JAX_TEST_STEP_SECONDS": "1.0"}  # still training when the others start
    fast = {**env, "SHORTCUT_JAX_TEST_STEP_SECONDS": "0.02"}
    with HookedRun(args, tmp_path / "owner.log", slow) as owner:
        owner.wait_for_steps(3, timeout=300)
        with HookedRun(args, tmp_path / "refused.log", fast) as refused:
            assert refused.wait(timeout=300) == 1
        assert "another run is training in" in refused.stderr_tail()
        assert owner.process.poll() is None, "the first run must still be training"

        owner.send(signal.SIGSTOP)
        time.sleep(0.5)  # let the stdout reader catch up with what was printed before the stop
        paused_at, saves_before = owner.steps[-1], list(owner.saves)
        time.sleep(5)  # past the stale time: the lease is free for the taking
        with HookedRun(args, tmp_path / "other.log", fast) as other:
            other.wait_for_steps(1, timeout=300)  # it took the lease over and trains
            owner.send(signal.SIGCONT)
            assert owner.wait(timeout=120) == 1
            assert other.wait(timeout=300) == 0, other.stderr_tail()
    assert "lost the lease" in owner.stderr_tail()
    assert "Taking over the lease" in other.log.read_text()
    # The paused run finished at most the step it was inside, and `confirm` refused its next
    # checkpoint: it started no save after the takeover.
    assert owner.steps[-1] <= paused_at + 1
    assert owner.saves == saves_before
    _, state = checkpoint.load_run(workdir)
    assert int(state.step) == TOTAL
    lease = epath.Path(workdir, workdir_lock.LEASE_NAME).read_text()
    assert '"released": true' in lease


TOTAL = 60
