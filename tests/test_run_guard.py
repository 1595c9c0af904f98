"""A training start refuses what would spoil the run: a changed config on resume, a second run in
the same workdir, an unwritable or full workdir; and it records every start in starts.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags
from tiny import REPO, free_port, run_module, run_processes, tiny_mnist_config

from shortcut_jax import (
    checkpoint,
    config_lib,
    configs,
    resume_policy,
    run_guard,
    train,
    workdir_lock,
)


def _compare(old, new, step=100):
    return resume_policy.compare(
        resume_policy.flatten(old), resume_policy.flatten(new), step, new.resume_allow_changes
    )


def _refused(old, new, step=100):
    return [change for change in _compare(old, new, step) if not change.safe]


def test_changed_batch_size_seed_and_model_are_refused_listing_each_field():
    old = configs.base_config()
    new = configs.base_config()
    new.batch_size = 64
    new.seed = 1
    new.model.depth = 6
    new.log_every_steps = 10  # safe: not listed
    refused = _refused(old, new)
    message = resume_policy.refusal_message("/runs/a", 100, refused)
    assert message == (
        "refusing to resume /runs/a from step 100: the config differs from the one its checkpoint "
        "was saved with in fields that change the run:\n"
        "  batch_size: 32 -> 64\n"
        "  model.depth: 4 -> 6\n"
        "  seed: 0 -> 1\n"
        "To proceed, start a new run with another --workdir, or resume anyway with "
        "--config.resume_allow_changes=batch_size,model.depth,seed"
    )


def test_named_fields_sections_and_globs_allow_a_change():
    old = configs.base_config()
    new = configs.base_config()
    new.batch_size = 64
    new.model.depth = 6
    new.data.shuffle_buffer = 10
    new.resume_allow_changes = "batch_size, model,data.*"
    changes = _compare(old, new)
    assert [(c.field, c.safe) for c in changes] == [
        ("batch_size", True),
        ("data.shuffle_buffer", True),
        ("model.depth", True),
        ("resume_allow_changes", True),
    ]
    new.resume_allow_changes = "batch_size"
    assert [c.field for c in _refused(old, new)] == ["data.shuffle_buffer", "model.depth"]


def test_logging_checkpoint_sampling_evaluation_and_layout_fields_pass_silently():
    old = configs.base_config()
    new = configs.base_config()
    new.log_every_steps = 7
    new.checkpoint_every_steps = 11
    new.max_checkpoints_to_keep = 9
    new.sample_steps = (1, 2)
    new.sample_num = 8
    new.eval_every_steps = 50
    new.eval_inception_path = "/weights/inception.npz"
    new.mesh.fsdp = 2
    new.mesh.data = -1
    new.sharding_rules = (("embed", None),)
    changes = _compare(old, new)
    assert len(changes) == 9 and all(change.safe for change in changes)
    assert _compare(old, configs.base_config()) == []


def test_tuples_and_their_json_lists_are_the_same_value():
    old = json.loads(config_lib.to_json(configs.base_config()))  # as restored from a checkpoint
    assert _compare(old, configs.base_config()) == []


def test_total_steps_is_safe_only_with_a_constant_schedule():
    old = configs.base_config()
    new = configs.base_config()
    new.total_steps = 2 * old.total_steps
    assert old.optim.schedule == "cosine"
    (change,) = _refused(old, new)
    assert change.describe().startswith(
        "total_steps: 16000 -> 32000 (safe only with optim.schedule = 'constant' (a cosine "
        "schedule decays over total_steps) and an objective that does not follow it"
    )
    old.optim.schedule = new.optim.schedule = "constant"
    assert _refused(old, new) == [] and len(_compare(old, new)) == 1


@pytest.mark.parametrize("objective", ["consistency_training", "progressive_distillation"])
def test_total_steps_stops_a_resume_whose_objective_follows_it(objective):
    old = configs.base_config()
    old.optim.schedule = "constant"
    old.objective = objective
    new = old.copy_and_resolve_references()
    new.total_steps = 2 * old.total_steps
    (change,) = _refused(old, new)
    assert "consistency training's curriculum runs over total_steps" in change.describe()
    if objective == "progressive_distillation":  # fixed stage lengths: total_steps only ends it
        old.teacher.steps_per_stage = new.teacher.steps_per_stage = 500
        assert _refused(old, new) == []


def test_warmup_steps_is_safe_only_past_both_warmups_of_a_constant_schedule():
    old = configs.base_config()
    old.optim.schedule = "constant"
    new = old.copy_and_resolve_references()
    new.optim.warmup_steps = 500
    assert _refused(old, new, step=600) == []
    assert [c.field for c in _refused(old, new, step=300)] == ["optim.warmup_steps"]
    old.optim.schedule = new.optim.schedule = "cosine"
    assert [c.field for c in _refused(old, new, step=600)] == ["optim.warmup_steps"]


def test_a_new_process_count_is_safe_only_for_step_addressed_data():
    old = resume_policy.flatten(configs.base_config())  # mnist_embedded: any process layout
    new = dict(old)
    old[resume_policy.PROCESS_COUNT], new[resume_policy.PROCESS_COUNT] = 1, 2
    assert all(change.safe for change in resume_policy.compare(old, new, 10))
    old["data.name"] = new["data.name"] = "a_stream"  # a source that draws per process
    (change,) = resume_policy.compare(old, new, 10)
    assert change.field == "process_count" and not change.safe
    assert change.describe().startswith("process_count: 1 -> 2 (safe only for data.name in")
    assert all(change.safe for change in resume_policy.compare(old, new, 10, "process_count"))


def test_fields_the_library_does_not_classify_are_refused():
    old = resume_policy.flatten(configs.base_config())
    new = {**old, "model.new_knob": 3}
    (change,) = resume_policy.compare(old, new, 10)
    assert change.describe() == "model.new_knob: (absent) -> 3" and not change.safe


def test_validate_names_an_allow_list_entry_that_is_no_field():
    config = tiny_mnist_config()
    config.resume_allow_changes = "total_steps,optim.learning_rate,model,data.*,process_count"
    config_lib.validate(config, device_count=1)
    config.resume_allow_changes = "total_step"
    with pytest.raises(config_lib.ConfigError, match="config.resume_allow_changes = 'total_step'"):
        config_lib.validate(config, device_count=1)


def test_the_allow_list_comes_from_a_comma_separated_flag():
    argv = ["main", f"--config={REPO / 'tests' / 'tiny.py'}", "--config.resume_allow_changes=a,b"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    assert resume_policy.parse_allowed(values.config.resume_allow_changes) == ("a", "b")


def test_resume_refuses_a_changed_run_allows_named_fields_and_keeps_the_history(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_mnist_config(3), workdir)
    train.train_and_evaluate(tiny_mnist_config(5), workdir)  # constant schedule: safe

    changed = tiny_mnist_config(5)
    changed.batch_size = 32
    changed.seed = 7
    with pytest.raises(run_guard.ResumeMismatchError) as refusal:
        train.train_and_evaluate(changed, workdir)
    assert "from step 5" in str(refusal.value)
    assert "  batch_size: 16 -> 32\n  seed: 0 -> 7\n" in str(refusal.value)
    assert str(refusal.value).endswith("--config.resume_allow_changes=batch_size,seed")

    changed.total_steps = 6
    changed.resume_allow_changes = "batch_size,seed"
    history = train.train_and_evaluate(changed, workdir)
    assert list(history) == [6]

    starts = run_guard.read_history(workdir)
    assert [start["step"] for start in starts] == [0, 3, 5]
    assert starts[1]["changed"] == {"total_steps": [3, 5]}
    assert starts[2]["changed"] == {
        "batch_size": [16, 32],
        "resume_allow_changes": ["", "batch_size,seed"],
        "seed": [0, 7],
        "total_steps": [5, 6],
    }
    assert all(start["process_count"] == 1 and start["jax_version"] for start in starts)
    assert starts[0]["config"]["batch_size"] == 16
    current = config_lib.from_json((tmp_path / "run" / "config.json").read_text())
    assert current.batch_size == 32 and current.seed == 7  # config.json: the newest start


def test_a_resume_on_another_process_count_is_compared(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_mnist_config(3)
    config.data.name = "a_stream"  # a source that would draw batches per process
    config.model.name = "mlp"
    config.data.num_classes = 0
    manager = checkpoint.make_manager(workdir)
    checkpoint.save(manager, {"step": jnp.zeros((), jnp.int32)}, config, 3)
    manager.wait_until_finished()
    manager.close()
    run_guard.atomic_files.write_json(
        run_guard.history_path(workdir), [{"step": 0, "process_count": 2, "config": {}}]
    )
    with pytest.raises(run_guard.ResumeMismatchError, match="process_count: 2 -> 1"):
        run_guard.check_resume(config, workdir, process_count=1)
    assert run_guard.check_resume(config, workdir, process_count=2) == []
    config.resume_allow_changes = "process_count"
    assert [c.field for c in run_guard.check_resume(config, workdir, 1)] == [
        "process_count",
        "resume_allow_changes",
    ]


def test_a_second_run_in_a_locked_workdir_is_refused_until_the_lock_is_released(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = workdir_lock.WorkdirLock(workdir).acquire()
    with pytest.raises(run_guard.WorkdirBusyError, match=f"pid {os.getpid()} on "):
        workdir_lock.WorkdirLock(workdir).acquire()  # another open file description
    with pytest.raises(run_guard.WorkdirBusyError, match="another run is training in"):
        train.train_and_evaluate(tiny_mnist_config(3), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # refused before any work
    first.release()
    workdir_lock.WorkdirLock(workdir).acquire().release()


_HOLD = """
import sys
from shortcut_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_killed_holder_does_not_leave_the_workdir_locked(tmp_path):
    workdir = str(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, workdir],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_guard.WorkdirBusyError, match=f"pid {holder.pid} on "):
            workdir_lock.WorkdirLock(workdir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    workdir_lock.WorkdirLock(workdir).acquire().release()


def test_a_bucket_lease_refuses_a_live_run_and_is_taken_over_once_stale(tmp_path):
    now = [1000.0]

    def lease() -> workdir_lock.BucketLease:
        return workdir_lock.BucketLease(str(tmp_path), renew=3600, stale=180, clock=lambda: now[0])

    first = lease().acquire()
    now[0] += 60
    with pytest.raises(
        run_guard.WorkdirBusyError,
        match=rf"pid {os.getpid()} on .*, lease renewed 60 s ago\).* 180 s after its last renewal",
    ):
        lease().acquire()
    now[0] += 200  # the first run stopped renewing (killed): its lease is stale
    second = lease().acquire()
    with pytest.raises(run_guard.LeaseLostError, match="lost the lease"):
        first._renew_or_mark_lost()  # its next renewal finds the new holder...
        first.confirm()
    first.release()  # ...and a run that lost its lease leaves the new holder's alone
    assert second.read()["token"] == second.token and not second.read().get("released")
    second.release()
    assert second.read()["released"] is True
    lease().acquire().release()  # a released lease is free at once


def test_a_bucket_lease_is_renewed_by_its_heartbeat(tmp_path):
    lease = workdir_lock.BucketLease(str(tmp_path), renew=0.05).acquire()
    try:
        first = lease.read()["heartbeat"]
        time.sleep(0.5)
        assert lease.read()["heartbeat"] > first
        lease.confirm()
    finally:
        lease.release()


def test_of_two_bucket_starts_in_the_same_moment_one_wins(tmp_path):
    first = workdir_lock.BucketLease(str(tmp_path))
    other = workdir_lock.BucketLease(str(tmp_path))
    real_read = first._object.read

    def read_then_let_the_other_in():
        first._object.read = real_read  # once: the write re-reads under its lock
        value = real_read()
        other.acquire()  # another host writes between this start's read and its write
        return value

    first._object.read = read_then_let_the_other_in
    with pytest.raises(run_guard.WorkdirBusyError, match="started just now"):
        first.acquire()
    assert first.read()["token"] == other.token
    other.release()


def test_bucket_workdirs_get_a_lease_and_local_ones_a_flock(tmp_path):
    assert isinstance(workdir_lock.lock_for("gs://bucket/run"), workdir_lock.BucketLease)
    assert isinstance(workdir_lock.lock_for(str(tmp_path)), workdir_lock.WorkdirLock)


def test_the_flock_probe_tells_a_held_lock_from_a_free_one(tmp_path):
    lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # passes the probe on this disk
    try:
        assert workdir_lock._flock_excludes(lock.path)
    finally:
        lock.release()
    assert not workdir_lock._flock_excludes(lock.path)  # what a no-op flock looks like


def test_a_flock_that_fails_or_does_nothing_is_refused_naming_the_way_round(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "_flock_excludes", lambda path: False)
    with pytest.raises(run_guard.WorkdirUnusableError, match=r"does nothing on this file system"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    monkeypatch.undo()

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")  # ENOLCK, as on an NFS mount without lockd

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    with pytest.raises(
        run_guard.WorkdirUnusableError, match=r"no working flock.*--config.workdir_lock=false"
    ):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()


def test_workdir_lock_false_starts_without_the_lock_and_says_so(tmp_path, caplog):
    config = tiny_mnist_config()
    config.workdir_lock = False
    held = workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # another run holds the flock
    try:
        with run_guard.guard_start(config, str(tmp_path)):
            pass
    finally:
        held.release()
    assert "Running without the workdir lock" in caplog.text


def test_an_unwritable_workdir_is_refused_by_name(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(
        run_guard.WorkdirUnusableError, match=f"cannot write to the workdir {blocker}"
    ):
        run_guard.check_workdir_usable(str(blocker / "run"))


def test_a_full_disk_is_refused_before_anything_compiles(tmp_path, monkeypatch):
    monkeypatch.setattr(run_guard, "_free_bytes", lambda path: 10 * 2**20)
    with pytest.raises(run_guard.WorkdirUnusableError, match=r"has 10 MiB free; 256 MiB"):
        train.train_and_evaluate(tiny_mnist_config(3), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_room_for_one_checkpoint_is_checked_from_the_state_size(tmp_path, monkeypatch):
    state = {"params": jnp.zeros((1024, 1024), jnp.float32)}  # 4 MiB
    assert run_guard.state_bytes(state) == 4 * 2**20
    monkeypatch.setattr(run_guard, "_free_bytes", lambda path: 66 * 2**20)
    with pytest.raises(run_guard.WorkdirUnusableError, match="one checkpoint of this state"):
        run_guard.record_start(tiny_mnist_config(), str(tmp_path), 0, state)
    assert run_guard.read_history(str(tmp_path)) == []  # a refused start is not recorded
    monkeypatch.setattr(run_guard, "_free_bytes", lambda path: 70 * 2**20)
    entry = run_guard.record_start(tiny_mnist_config(), str(tmp_path), 0, state)
    assert run_guard.read_history(str(tmp_path)) == [json.loads(json.dumps(entry))]


def test_the_cli_reports_a_refused_start_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_module(
        "shortcut_jax.main", "--config", "tests/tiny.py", f"--workdir={blocker / 'run'}"
    )
    assert result.returncode == 1
    assert f"error: cannot write to the workdir {blocker / 'run'}" in result.stderr
    assert "Traceback" not in result.stderr


_START = """
import sys
from tiny import tiny_mnist_config
from shortcut_jax import distributed, run_guard
port, index, workdir = sys.argv[1:]
distributed.initialize_distributed(f"127.0.0.1:{port}", 2, int(index))
try:
    with run_guard.guard_start(tiny_mnist_config(), workdir):
        print("guard passed")
except run_guard.RunGuardError as error:
    print(f"error: {error}")
"""


def test_every_process_stops_when_process_0_refuses_the_start(tmp_path):
    workdir = str(tmp_path)
    lock = workdir_lock.WorkdirLock(workdir).acquire()  # a run already trains here
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO / "tests")}
    commands = [[sys.executable, "-c", _START, str(port), str(i), workdir] for i in range(2)]
    try:
        outputs = run_processes(commands, env, timeout=120)
    finally:
        lock.release()
    assert f"error: another run is training in {workdir} (pid {os.getpid()}" in outputs[0][0]
    assert "error: process 0 refused to start this run" in outputs[1][0]
    assert "guard passed" not in outputs[0][0] + outputs[1][0]


def test_a_field_added_later_at_its_default_does_not_stop_an_older_run_from_resuming():
    defaults = resume_policy.flatten(configs.base_config())
    old = {key: value for key, value in defaults.items() if not key.startswith("loss.")}
    assert resume_policy.compare(old, dict(defaults), 10, defaults=defaults) == []
    changed = {**defaults, "loss.kind": "pseudo_huber"}
    (change,) = resume_policy.compare(old, changed, 10, defaults=defaults)
    assert change.describe() == 'loss.kind: (absent) -> "pseudo_huber"' and not change.safe
