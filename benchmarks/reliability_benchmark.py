"""Reliability under kills and preemptions, and the CLIs' answers to bad input (BENCHMARKS.md 6).

    python benchmarks/reliability_benchmark.py [--kills 20] [--sigterms 4] \
        [--stages kills,bad_inputs]

Stage `kills`: trains the tiny MNIST config (`tests/tiny.py`, every 10 steps a checkpoint, all
kept) through `tests/hooked_main.py` (50 ms steps; every async save held 0.5 s before Orbax renames
it into place) and interrupts it `--kills` times with SIGKILL at seeded random moments (a random
time after the launch, after a random number of steps, or inside a save that follows a completed
one) and `--sigterms` times with SIGTERM after a random number of steps, rerunning the same command
after each, then lets it finish. Recorded per interruption: the moment, exit code, the step the
run had reached, the newest complete checkpoint afterwards, steps lost, temporary directories on
disk, and the step the next start resumed from. At the end every checkpoint of the interrupted
run is compared bitwise with the same step of an uninterrupted run.

Stage `bad_inputs`: runs the real CLIs on bad inputs and records the exit code and the last line
of stderr of each.

Writes benchmarks/results/reliability.json (both stages; a stage rerun replaces its part) and
prints the markdown tables of BENCHMARKS.md section 6.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/shortcut_jax_jit"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tiny import HookedRun, tiny_mnist_config  # noqa: E402

from shortcut_jax import atomic_files, checkpoint, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"
TOTAL_STEPS, EVERY = 400, 10
HOOKS = {"SHORTCUT_JAX_TEST_STEP_SECONDS": "0.05", "SHORTCUT_JAX_TEST_SAVE_DELAY_SECONDS": "0.5"}
TMP_MARK = ".orbax-checkpoint-tmp"
KILL_MOMENTS = ("at a random time", "after random steps", "inside a save")


def cli_args(workdir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "tests/tiny.py",
        f"--workdir={workdir}",
        f"--config.total_steps={TOTAL_STEPS}",
        f"--config.checkpoint_every_steps={EVERY}",
        "--config.max_checkpoints_to_keep=1000",
        *extra,
    ]


def saved_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def temporary_dirs(workdir: Path, newer_than: float = 0.0) -> list[str]:
    directory = workdir / "checkpoints"
    names = []
    for path in directory.iterdir() if directory.is_dir() else ():
        try:
            if TMP_MARK in path.name and path.stat().st_mtime > newer_than:
                names.append(path.name)
        except FileNotFoundError:
            continue
    return sorted(names)


def resumed_from(log: str) -> int | None:
    for line in log.splitlines():
        if "Resumed at step " in line:
            return int(line.split("Resumed at step ")[1].split()[0])
        if "Initialised at step 0" in line:
            return 0
    return None


# ------------------------------------------------------------------------------------ kills


def interruption_plan(kills: int, sigterms: int, rng: random.Random) -> list[str]:
    """SIGKILL moments in a shuffled, balanced order, with the SIGTERMs spread among them."""
    moments = [KILL_MOMENTS[index % len(KILL_MOMENTS)] for index in range(kills)]
    rng.shuffle(moments)
    for index in range(sigterms):
        moments.insert((index + 1) * len(moments) // (sigterms + 1), "SIGTERM")
    return moments


def interrupt(run: HookedRun, moment: str, workdir: Path, rng: random.Random) -> dict[str, Any]:
    """Waits for `moment`, sends the signal and waits for the exit."""
    launched, saved_before = time.time(), saved_steps(workdir)
    detail: dict[str, Any] = {}
    if moment == "inside a save":

        def inside_a_save() -> bool:
            completed = saved_steps(workdir) != saved_before
            return completed and bool(temporary_dirs(workdir, newer_than=launched))

        run.wait_for(inside_a_save, timeout=300, what="a save in flight after a completed one")
    elif moment in ("after random steps", "SIGTERM"):
        detail["steps_to_wait"] = rng.randint(1, 15)
        run.wait_for_steps(detail["steps_to_wait"], timeout=300)
        time.sleep(rng.uniform(0.0, 0.05))
    else:
        detail["seconds_after_launch"] = round(rng.uniform(0.0, 30.0), 2)
        time.sleep(detail["seconds_after_launch"])
    finished = run.process.poll() is not None
    run.send(signal.SIGTERM if moment == "SIGTERM" else signal.SIGKILL)
    code = run.wait(timeout=300)
    return {
        **detail,
        "signal": "SIGTERM" if moment == "SIGTERM" else "SIGKILL",
        "moment": moment,
        "exit_code": code,
        "finished_before_the_signal": finished,
        "steps_seen_this_start": len(run.steps),
        "step_reached": run.steps[-1] if run.steps else None,
        "seconds_alive": round(time.time() - launched, 2),
    }


def kills_stage(kills: int, sigterms: int, seed: int, scratch: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    workdir = scratch / "interrupted"
    records = []
    plan = interruption_plan(kills, sigterms, rng)
    for attempt, moment in enumerate(plan):
        log = scratch / f"start_{attempt:02d}.log"
        newest_before = (saved_steps(workdir) or [0])[-1]
        with HookedRun(cli_args(workdir), log, HOOKS) as run:
            record = interrupt(run, moment, workdir, rng)
        text = log.read_text(errors="replace")
        newest = (saved_steps(workdir) or [0])[-1]
        reached = record["step_reached"]
        record.update(
            attempt=attempt,
            newest_checkpoint_at_start=newest_before,
            resumed_from=resumed_from(text),
            newest_checkpoint_after=newest,
            steps_lost=max(0, reached - newest) if reached is not None else 0,
            temporary_dirs_after=temporary_dirs(workdir),
            preemption_logged="Preempted: saved step" in text,
        )
        records.append(record)
        print(json.dumps(record), flush=True)
        if record["finished_before_the_signal"]:
            break

    final_log = scratch / "final.log"
    with HookedRun(cli_args(workdir), final_log) as run:
        final_code = run.wait(timeout=600)
    final_text = final_log.read_text(errors="replace")

    reference = scratch / "uninterrupted"
    config = tiny_mnist_config(TOTAL_STEPS)
    config.checkpoint_every_steps = 1  # every step, for the SIGTERM saves between the periodic ones
    config.max_checkpoints_to_keep = TOTAL_STEPS
    train.train_and_evaluate(config, str(reference))
    comparison = compare_checkpoints(workdir, reference)

    sigkills = [r for r in records if r["signal"] == "SIGKILL"]
    sigterm_records = [r for r in records if r["signal"] == "SIGTERM"]
    # Every start that got as far as restoring, and what it restored against what was on disk.
    starts = [(r["resumed_from"], r["newest_checkpoint_at_start"]) for r in records] + [
        (resumed_from(final_text), (records[-1]["newest_checkpoint_after"] if records else 0))
    ]
    restored = [(got, newest) for got, newest in starts if got is not None]
    return {
        "config": {
            "total_steps": TOTAL_STEPS,
            "checkpoint_every_steps": EVERY,
            "hooks": HOOKS,
            "seed": seed,
        },
        "interruptions": records,
        "final_exit_code": final_code,
        "final_resumed_from": resumed_from(final_text),
        "summary": {
            "sigkills": len(sigkills),
            "sigkills_by_moment": {
                m: sum(r["moment"] == m for r in sigkills) for m in KILL_MOMENTS
            },
            "sigkills_inside_a_save_leaving_a_temporary_dir": sum(
                bool(r["temporary_dirs_after"]) for r in sigkills if r["moment"] == "inside a save"
            ),
            "sigterms": len(sigterm_records),
            "sigterms_exit_0_after_saving": sum(
                r["exit_code"] == 0 and r["preemption_logged"] for r in sigterm_records
            ),
            "starts": len(starts),
            "starts_killed_before_restoring": len(starts) - len(restored),
            "starts_restoring_the_newest_complete_checkpoint": sum(
                got == newest for got, newest in restored
            ),
            "starts_restoring": len(restored),
            "steps_lost_per_sigterm": [r["steps_lost"] for r in sigterm_records],
            "steps_lost_per_sigkill_mean": float(np.mean([r["steps_lost"] for r in sigkills]))
            if sigkills
            else 0.0,
            "steps_lost_per_sigkill_max": max((r["steps_lost"] for r in sigkills), default=0),
            "temporary_dirs_left_at_the_end": temporary_dirs(workdir),
            **comparison,
        },
    }


def compare_checkpoints(interrupted: Path, reference: Path) -> dict[str, Any]:
    """Every checkpoint of the interrupted run against the same step of the reference, bitwise."""
    _, template = checkpoint.load_run(str(reference))
    abstract = checkpoint.abstract_like(template)
    managers = [checkpoint.make_manager(str(path)) for path in (interrupted, reference)]
    steps = [step for step in saved_steps(interrupted) if step in set(saved_steps(reference))]
    identical = []
    for step in steps:
        state_a, state_b = (checkpoint.restore_state(m, abstract, step) for m in managers)
        identical.append(
            all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True)
            )
        )
    for manager in managers:
        manager.close()
    return {
        "checkpoints_of_the_interrupted_run": len(saved_steps(interrupted)),
        "checkpoints_compared": len(steps),
        "checkpoints_bitwise_equal_to_uninterrupted": int(sum(identical)),
        "final_step": steps[-1] if steps else None,
        "final_state_bitwise_equal": bool(identical and identical[-1] and steps[-1] == TOTAL_STEPS),
    }


# ------------------------------------------------------------------------------------ bad inputs


def run_cli(args: list[str], timeout: float = 600) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith(("error", "fatal"))]
    return {
        "exit_code": result.returncode,
        "last_stderr_line": lines[-1] if lines else "",
        "first_error_line": errors[0] if errors else None,
        "traceback": "Traceback (most recent call last)" in result.stderr,
    }


def bad_inputs_stage(scratch: Path) -> list[dict[str, Any]]:
    run = scratch / "run"
    config = tiny_mnist_config(6)
    train.train_and_evaluate(config, str(run))  # checkpoints at 3 and 6
    sample = ["-m", "shortcut_jax.sample", f"--workdir={run}", f"--out={scratch / 's.npz'}"]
    main = ["-m", "shortcut_jax.main", "--config", "tests/tiny.py"]

    corrupt = scratch / "corrupt"
    shutil.copytree(run, corrupt)
    for path in (corrupt / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"corrupt")
    poisoned = scratch / "poisoned"
    shutil.copytree(run, poisoned)
    poison_newest(poisoned, config)
    (scratch / "not_a_run").mkdir()

    cases = [
        ("sample --num=0", [*sample, "--num=0"]),
        ("sample --steps=1000 (more than denoise_timesteps)", [*sample, "--steps=1000"]),
        ("sample --checkpoint_step=5 (not saved)", [*sample, "--checkpoint_step=5"]),
        (
            "sample --workdir of a directory that is not a run",
            [
                "-m",
                "shortcut_jax.sample",
                f"--workdir={scratch / 'not_a_run'}",
            ],
        ),
        (
            "sample from a corrupt checkpoint",
            [
                "-m",
                "shortcut_jax.sample",
                f"--workdir={corrupt}",
                f"--out={scratch / 'c.npz'}",
            ],
        ),
        (
            "evaluate --cfg=nan",
            [
                "-m",
                "shortcut_jax.evaluate",
                f"--workdir={run}",
                "--cfg=nan",
                "--num=10",
            ],
        ),
        ("main --workdir=''", [*main, "--workdir="]),
        ("sample --workdir=''", ["-m", "shortcut_jax.sample", "--workdir="]),
        (
            "main --config of a missing file",
            [
                "-m",
                "shortcut_jax.main",
                "--config",
                "experiments/missing.py",
                f"--workdir={scratch / 'x'}",
            ],
        ),
        (
            "main --config.total_steps=-1",
            [*main, f"--workdir={scratch / 'y'}", "--config.total_steps=-1"],
        ),
        (
            "main resuming with another model width",
            [
                *main,
                f"--workdir={run}",
                "--config.model.hidden_size=64",
            ],
        ),
        ("main resuming from a corrupt checkpoint", [*main, f"--workdir={corrupt}"]),
        ("main resuming from a checkpoint holding NaN", [*main, f"--workdir={poisoned}"]),
    ]
    results = []
    for name, args in cases:
        record = {"input": name, **run_cli(args)}
        print(json.dumps(record), flush=True)
        results.append(record)

    busy = scratch / "busy"
    with HookedRun(
        ["--config", "tests/tiny.py", f"--workdir={busy}", "--config.total_steps=100000"],
        scratch / "busy.log",
        {"SHORTCUT_JAX_TEST_STEP_SECONDS": "0.05"},
    ) as holder:
        holder.wait_for_steps(1, timeout=300)
        record = {
            "input": "main on a workdir another run is training in",
            **run_cli([*main, f"--workdir={busy}"]),
        }
        holder.send(signal.SIGTERM)
        holder.wait(timeout=300)
    print(json.dumps(record), flush=True)
    results.append(record)
    return results


def poison_newest(workdir: Path, config) -> None:
    """Adds a checkpoint whose EMA is NaN, as code from before the finite check could save."""
    import jax.numpy as jnp

    _, state = checkpoint.load_run(str(workdir))
    state = state.replace(ema_params=jax.tree.map(lambda x: x * jnp.nan, state.ema_params))
    manager = checkpoint.make_manager(str(workdir))
    manager.save(
        7,
        args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardSave(state),
            config=checkpoint.ocp.args.JsonSave(config.to_dict()),
        ),
    )
    manager.wait_until_finished()
    manager.close()


# ------------------------------------------------------------------------------------ report


def markdown(results: dict[str, Any]) -> str:
    lines = []
    kills = results.get("kills")
    if kills:
        s = kills["summary"]
        lines += [
            "| measure | value |",
            "|---|---|",
            f"| SIGKILLs (random time / after random steps / inside a save) | {s['sigkills']} "
            f"({' / '.join(str(s['sigkills_by_moment'][m]) for m in KILL_MOMENTS)}) |",
            f"| kills inside a save that left a temporary directory | "
            f"{s['sigkills_inside_a_save_leaving_a_temporary_dir']} |",
            f"| SIGTERMs; exited 0 after saving | {s['sigterms']}; "
            f"{s['sigterms_exit_0_after_saving']} |",
            f"| starts (killed before restoring) | {s['starts']} "
            f"({s['starts_killed_before_restoring']}) |",
            f"| starts that restored the newest complete checkpoint | "
            f"{s['starts_restoring_the_newest_complete_checkpoint']} of {s['starts_restoring']} |",
            f"| checkpoints bitwise equal to the uninterrupted run's | "
            f"{s['checkpoints_bitwise_equal_to_uninterrupted']} of {s['checkpoints_compared']} |",
            f"| final state (step {s['final_step']}) bitwise equal | "
            f"{s['final_state_bitwise_equal']} |",
            f"| steps lost per SIGTERM | {s['steps_lost_per_sigterm']} |",
            f"| steps lost per SIGKILL, mean / max (checkpoint every {EVERY}) | "
            f"{s['steps_lost_per_sigkill_mean']:.1f} / {s['steps_lost_per_sigkill_max']} |",
            "| temporary directories left at the end | "
            f"{len(s['temporary_dirs_left_at_the_end'])} |",
            "",
        ]
    bad = results.get("bad_inputs")
    if bad:
        lines += ["| bad input | exit | traceback | last line of stderr |", "|---|---|---|---|"]
        for record in bad:
            message = record["last_stderr_line"].replace("|", "\\|")
            traceback = "yes" if record.get("traceback") else "no"
            lines.append(f"| {record['input']} | {record['exit_code']} | {traceback} | {message} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--sigterms", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="kills,bad_inputs")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flops_benchmark

    with tempfile.TemporaryDirectory(prefix="reliability_") as scratch:
        for stage in args.stages.split(","):
            meta = {  # the machine before the stage: load and matmul rate
                **flops_benchmark.run_meta(quick=False),
                "matmul_gflops_2048": float(flops_benchmark.matmul_rate(2048, 15)["gflops_median"]),
            }
            started = time.perf_counter()
            directory = Path(scratch) / stage
            directory.mkdir()
            if stage == "kills":
                results["kills"] = kills_stage(args.kills, args.sigterms, args.seed, directory)
            elif stage == "bad_inputs":
                results["bad_inputs"] = bad_inputs_stage(directory)
            else:
                raise SystemExit(f"--stages: unknown stage {stage!r} (kills, bad_inputs)")
            meta["seconds"] = round(time.perf_counter() - started, 1)
            results.setdefault("meta", {})[stage] = meta
            atomic_files.write_json(out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
