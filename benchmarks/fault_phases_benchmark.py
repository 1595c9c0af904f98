"""Faults injected in every phase of a run, and what each one lost (BENCHMARKS.md section 6).

    python benchmarks/fault_phases_benchmark.py [--repeats 2] [--lease_takeovers 2]

For each phase (training steps, the checkpoint write, the final grids and evaluation, the
`sample` CLI, the `evaluate` CLI) and each signal (SIGKILL, SIGTERM), `--repeats` times: start the
tiny MNIST config (`tests/tiny.py` through `tests/hooked_main.py`, whose hooks slow the steps,
hold each save before its commit and slow each evaluation so a signal lands in the phase), send
the signal there, record the exit code and what is on disk, rerun the same command to the end
and record what the rerun had to redo. Then `--lease_takeovers` times on a GCS emulator: a run on
a bucket workdir is paused (SIGSTOP) past its lease, a second start takes the workdir over, the
first is continued (SIGCONT); recorded: its exit, and the saves it started after the takeover.
Also counted: the config fields and wrong values `tests/test_config_fuzz.py` tries.

Writes benchmarks/results/fault_phases.json and prints the tables of BENCHMARKS.md section 6.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

import gcs_emulator  # noqa: E402

gcs_emulator.configure(os.environ)

from reliability_benchmark import saved_steps  # noqa: E402
from tiny import HookedRun, handles_sigterm  # noqa: E402

from shortcut_jax import atomic_files, workdir_lock  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fault_phases.json"
TOTAL, EVERY = 12, 4
EVAL = ["--config.eval_every_steps=12", "--config.eval_steps=(1,)", "--config.eval_num=16",
        "--config.eval_metrics=fd_mnist", "--config.eval_batch_size=16"]  # fmt: skip
TRAIN_PHASES = ("training steps", "checkpoint write", "final evaluation")
CLI_PHASES = ("sample", "evaluate")


def train_args(workdir: Path | str, total: int = TOTAL) -> list[str]:
    return ["--config", "tests/tiny.py", f"--workdir={workdir}", f"--config.total_steps={total}",
            f"--config.checkpoint_every_steps={EVERY}", "--config.max_checkpoints_to_keep=100",
            *EVAL]  # fmt: skip


def final_record(workdir: Path) -> dict[str, Any] | None:
    path = workdir / "final.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_fault(phase: str, signum: int, scratch: Path, rng: random.Random) -> dict[str, Any]:
    """One fault in a training phase, then the rerun of the same command."""
    workdir = scratch / f"{phase.replace(' ', '_')}-{signum}-{rng.randrange(10**6)}"
    hooks = {"SHORTCUT_JAX_TEST_STEP_SECONDS": "0.1"}
    if phase == "checkpoint write":
        hooks["SHORTCUT_JAX_TEST_SAVE_DELAY_SECONDS"] = "3"
    if phase == "final evaluation":
        hooks["SHORTCUT_JAX_TEST_EVAL_SECONDS"] = "20"
    with HookedRun(train_args(workdir), scratch / f"{workdir.name}.log", hooks) as run:
        if phase == "training steps":
            run.wait_for_steps(rng.randint(2, TOTAL - 2), timeout=300)
        elif phase == "checkpoint write":
            target = rng.choice([EVERY, 2 * EVERY, TOTAL])
            run.wait_for(lambda: target in run.saves, timeout=300, what=f"the save of {target}")
        else:
            run.wait_for(lambda: TOTAL in run.evals, timeout=300, what="the final evaluation")
        reached = run.steps[-1] if run.steps else 0
        run.send(signum)
        code = run.wait(timeout=300)
    after_fault = saved_steps(workdir)
    with HookedRun(train_args(workdir), scratch / f"{workdir.name}.rerun.log") as rerun:
        rerun_code = rerun.wait(timeout=600)
    log = rerun.log.read_text()
    resumed = None
    for line in log.splitlines():
        if "Resumed at step " in line:
            resumed = int(line.split("Resumed at step ")[1].split()[0])
    return {
        "phase": phase,
        "signal": signal.Signals(signum).name,
        "exit_code": code,
        "step_reached": reached,
        "checkpoints_after_fault": after_fault,
        "rerun_exit_code": rerun_code,
        "rerun_resumed_from": resumed,
        "rerun_trained": "First step" in log,
        "steps_lost": max(0, reached - (after_fault[-1] if after_fault else 0)),
        "final_outputs_complete": final_record(workdir) == {"evaluated": True, "step": TOTAL},
        "checkpoints_at_the_end": saved_steps(workdir),
    }


def cli_fault(cli: str, signum: int, workdir: Path, scratch: Path, index: int) -> dict[str, Any]:
    """SIGKILL or SIGTERM while `sample` / `evaluate` works, then the same command again."""
    folder = scratch / f"{cli}-{signal.Signals(signum).name}-{index}"
    out = folder / ("s.npz" if cli == "sample" else "r")
    common = [f"--workdir={workdir}", "--batch_size=16", f"--out={out}"]
    args = {
        "sample": ["--num=64", "--steps=8", *common],
        "evaluate": ["--num=64", "--steps=1,8", "--metrics=fd_mnist", "--pr_num=0", *common],
    }[cli]
    command = [sys.executable, "-m", f"shortcut_jax.{cli}", *args]
    long_command = [*command[:3], *[a.replace("=64", "=100000") for a in command[3:]]]
    process = subprocess.Popen(long_command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not handles_sigterm(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3.0)  # into the restore, compile or sampling
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    written = out.exists() and (out.is_file() or any(out.iterdir()))
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = stderr.strip().splitlines()
    return {
        "phase": cli,
        "signal": signal.Signals(signum).name,
        "exit_code": process.returncode,
        "last_stderr_line": lines[-1] if lines else "",
        "output_written_by_the_interrupted_run": written,
        "rerun_exit_code": rerun.returncode,
        "rerun_output_written": out.exists(),
    }


def lease_takeover(emulator: gcs_emulator.Emulator, scratch: Path, index: int) -> dict[str, Any]:
    """A paused owner of a bucket workdir, a takeover, and what the owner does when continued."""
    workdir = f"{emulator.bucket()}/run"
    args = [*train_args(workdir, total=60)[: -len(EVAL)], "--config.log_every_steps=1"]
    timing = {workdir_lock.RENEW_ENV: "0.5", workdir_lock.STALE_ENV: "4"}
    with HookedRun(args, scratch / f"owner{index}.log",
                   {**timing, "SHORTCUT_JAX_TEST_STEP_SECONDS": "1.0"}) as owner:  # fmt: skip
        owner.wait_for_steps(3, timeout=300)
        owner.send(signal.SIGSTOP)
        time.sleep(0.5)
        saves_before = list(owner.saves)
        time.sleep(5)
        with HookedRun(args, scratch / f"other{index}.log",
                       {**timing, "SHORTCUT_JAX_TEST_STEP_SECONDS": "0.02"}) as other:  # fmt: skip
            other.wait_for_steps(1, timeout=300)
            owner.send(signal.SIGCONT)
            owner_code = owner.wait(timeout=120)
            other_code = other.wait(timeout=600)
    return {
        "owner_exit_code": owner_code,
        "owner_said_lease_lost": "lost the lease" in owner.log.read_text(),
        "owner_saves_after_the_takeover": [s for s in owner.saves if s not in saves_before],
        "taker_exit_code": other_code,
        "taker_took_over": "Taking over the lease" in other.log.read_text(),
    }


def fuzz_counts() -> dict[str, int]:
    import test_config_fuzz as fuzz

    fields = values = 0
    for name, variant in fuzz.CONFIGS:
        for _, value in fuzz.leaves(fuzz.load(name, variant)):
            fields += 1
            values += len(fuzz.wrong_values(value))
    return {"config_files_and_variants": len(fuzz.CONFIGS), "fields": fields, "values": values}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| phase | signal | runs | exit codes | lost | the rerun |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in results["faults"]:
        groups.setdefault((record["phase"], record["signal"]), []).append(record)
    for (phase, name), records in groups.items():
        codes = ", ".join(str(r["exit_code"]) for r in records)
        if phase in CLI_PHASES:
            lost = (
                "no output written"
                if not any(r["output_written_by_the_interrupted_run"] for r in records)
                else "partial output"
            )
            rerun = (
                "wrote it"
                if all(r["rerun_exit_code"] == 0 and r["rerun_output_written"] for r in records)
                else "FAILED"
            )
        else:
            lost = "steps since the last checkpoint: " + ", ".join(
                str(r["steps_lost"]) for r in records
            )
            complete = all(
                r["rerun_exit_code"] == 0 and r["final_outputs_complete"] for r in records
            )
            trained = [r["rerun_trained"] for r in records]
            rerun = ("completed the run and its final evaluation" if complete else "FAILED") + (
                "; trained nothing" if not any(trained) else ""
            )
        lines.append(f"| {phase} | {name} | {len(records)} | {codes} | {lost} | {rerun} |")
    takeovers = results.get("lease_takeovers", [])
    if takeovers:
        lines += [
            "",
            "| lease takeovers on the GCS emulator | value |",
            "|---|---|",
            f"| takeovers | {len(takeovers)} |",
            f"| paused owners that stopped (exit 1, 'lost the lease') | "
            f"{sum(t['owner_exit_code'] == 1 and t['owner_said_lease_lost'] for t in takeovers)} |",
            f"| saves the owners started after the takeover | "
            f"{sum(len(t['owner_saves_after_the_takeover']) for t in takeovers)} |",
            f"| takers that finished (exit 0) | "
            f"{sum(t['taker_exit_code'] == 0 for t in takeovers)} |",
        ]
    fuzz = results.get("fuzz")
    if fuzz:
        lines += ["", f"Fuzzed: {fuzz['fields']} fields of {fuzz['config_files_and_variants']} "
                  f"configs and variants, {fuzz['values']} wrong values."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lease_takeovers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import matmul_benchmark
    import timing

    rng = random.Random(args.seed)
    results: dict[str, Any] = {
        "meta": {
            **timing.run_meta(quick=False),
            "matmul_gflops_2048": float(matmul_benchmark.matmul_rate(2048, 15)["gflops_median"]),
        },
        "faults": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault_phases_") as scratch_name:
        scratch = Path(scratch_name)
        for phase in TRAIN_PHASES:
            for signum in (signal.SIGKILL, signal.SIGTERM):
                for _ in range(args.repeats):
                    results["faults"].append(train_fault(phase, signum, scratch, rng))
                    print(json.dumps(results["faults"][-1]), flush=True)
        run = scratch / "finished"
        with HookedRun(train_args(run), scratch / "finished.log") as finished:
            assert finished.wait(timeout=600) == 0, finished.stderr_tail()
        for cli in CLI_PHASES:
            for signum in (signal.SIGKILL, signal.SIGTERM):
                for index in range(args.repeats):
                    results["faults"].append(cli_fault(cli, signum, run, scratch, index))
                    print(json.dumps(results["faults"][-1]), flush=True)
        if args.lease_takeovers and gcs_emulator.binary():
            emulator = gcs_emulator.Emulator(os.environ["STORAGE_EMULATOR_HOST"])
            emulator.start()
            try:
                results["lease_takeovers"] = [
                    lease_takeover(emulator, scratch, index)
                    for index in range(args.lease_takeovers)
                ]
            finally:
                emulator.stop()
    results["fuzz"] = fuzz_counts()
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    atomic_files.write_json(Path(args.out), results)
    print(markdown(results))


if __name__ == "__main__":
    main()
