"""Running and timing the training and evaluation CLIs for the studies (`budget_sweep.py`,
`recipe_study.py`). Not a script.

Every number a study reports comes from `python -m shortcut_jax.main` and `python -m
shortcut_jax.evaluate` run as a user runs them; this module builds their command lines, runs them
with their output in a log file, and reads what they leave behind (the logged throughput, the
evaluation's results.json).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "mnist.py"


def cli_value(value: Any) -> str:
    """A Python value as `--config.field=` text that ml_collections parses back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return (
            "("
            + ",".join(cli_value(item) for item in value)
            + ("," if len(value) == 1 else "")
            + ")"
        )
    return str(value)


def images_per_second(train_log: Path) -> float | None:
    """Median of the `perf/images_per_second` values the run logged, if any."""
    values = [
        float(match)
        for match in re.findall(r"perf/images_per_second=([0-9.eE+-]+)", train_log.read_text())
    ]
    return statistics.median(values) if values else None


def config_commit(path: Path = CONFIG) -> str:
    """The commit a config file was read at, with '+changes' when it differs from it."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    command = ["git", "status", "--porcelain", "--", str(path)]
    status = subprocess.run(command, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+changes" if status else "")


HEARTBEAT_SECONDS = 10.0


def _process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process and its reaped children (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _write_ledger(path: Path, record: Mapping[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)


def run_timed(
    command: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    resumable: bool = False,
) -> dict[str, float]:
    """Runs a command to completion, its output to `log`; its wall and CPU seconds and peak RSS.

    With `resumable` (a training run that resumes from its checkpoint when started again), the
    time of sittings that were cut off counts too: a ledger beside the log
    (`<log>.sittings.json`, rewritten every HEARTBEAT_SECONDS and at the end) carries the seconds
    spent so far into the next sitting, the log is appended to, and the result adds 'sittings'.
    A sitting killed outright loses at most the last heartbeat's worth.

    Raises:
      RuntimeError naming the command and the log when it exits with a non-zero status.
    """
    ledger = log.with_name(log.name + ".sittings.json")
    prior = {"wall_seconds": 0.0, "cpu_seconds": 0.0, "sittings": 0}
    if resumable and ledger.exists():
        prior.update(json.loads(ledger.read_text()))

    def spent(wall: float, cpu: float) -> dict[str, float]:
        return {
            "wall_seconds": prior["wall_seconds"] + wall,
            "cpu_seconds": prior["cpu_seconds"] + cpu,
            "sittings": prior["sittings"] + 1,
        }

    start = time.perf_counter()
    with open(log, "a" if resumable else "w", encoding="utf-8") as out:
        if resumable:
            out.write(
                f"=== sitting {prior['sittings'] + 1}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
            )
            out.flush()
        process = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        cpu, beat = 0.0, start
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            if resumable and now - beat >= HEARTBEAT_SECONDS:
                cpu = _process_cpu_seconds(process.pid) or cpu
                _write_ledger(ledger, spent(now - start, cpu))
                beat = now
            time.sleep(0.2)
    wall = time.perf_counter() - start
    cpu = usage.ru_utime + usage.ru_stime
    total = spent(wall, cpu)
    if os.waitstatus_to_exitcode(status) != 0:
        if resumable:
            _write_ledger(ledger, total)
        raise RuntimeError(f"{' '.join(command)} failed; its output is in {log}")
    if resumable:
        ledger.unlink(missing_ok=True)
        return {**total, "peak_rss_bytes": usage.ru_maxrss * 1024}
    return {"wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_bytes": usage.ru_maxrss * 1024}


def train_command(workdir: Path, overrides: Mapping[str, Any], config: Path = CONFIG) -> list[str]:
    """`python -m shortcut_jax.main --config CONFIG --workdir W --config.k=v ...`."""
    command = [sys.executable, "-m", "shortcut_jax.main", f"--config={config}"]
    command.append(f"--workdir={workdir}")
    return command + [f"--config.{key}={cli_value(value)}" for key, value in overrides.items()]


def evaluate_command(
    workdir: Path,
    out: Path,
    steps: Sequence[int],
    num: int,
    cache_dir: Path,
    metrics: str = "fd_mnist",
    cfg: float | None = None,
    seed: int = 0,
    raw_params: bool = False,
    inception: str | None = None,
) -> list[str]:
    """`python -m shortcut_jax.evaluate` scoring `num` samples at each step count into `out`.

    `inception`: the converted FID Inception weights (default: the evaluate CLI's).
    """
    command = [sys.executable, "-m", "shortcut_jax.evaluate", f"--workdir={workdir}"]
    command += [f"--num={num}", f"--metrics={metrics}", f"--steps={','.join(map(str, steps))}"]
    command += [f"--out={out}", f"--cache_dir={cache_dir}", f"--seed={seed}"]
    if cfg is not None:
        command.append(f"--cfg={cfg}")
    if raw_params:
        command.append("--raw_params")
    if inception:
        command.append(f"--inception={inception}")
    return command


def evaluation_rows(out: Path) -> dict[int, dict[str, float]]:
    """{step count: row} of an evaluation's results.json (scores, precision/recall, seconds)."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    return {int(row["steps"]): row for row in rows}


def evaluation_metrics(out: Path) -> dict[str, Any]:
    """The metrics' descriptions of an evaluation's results.json (floor, ceiling, reference)."""
    return json.loads((out / "results.json").read_text())["metrics"]


# Floors of one feature network on one reference agree to float rounding across machines (~1e-6);
# two trainings of the FD-MNIST classifier on different CPUs gave floors 1 % apart.
FLOOR_RTOL = 1e-3


def network_mismatches(scored: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]]) -> list[str]:
    """Why some results were scored by other feature-network weights than the first ([] = same).

    Args:
      scored: (name, {metric: {'floor': float | None, 'weights_digest': str | None}}) per
        result, e.g. the 'metrics' of evaluate's results.json. The digest decides where both
        results record one; results written before evaluations recorded it are compared by their
        floor (the real halves' distance), which the network's weights fix.

    Returns:
      One message per result that differs from the first result scored with that metric.
    """
    problems = []
    first: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for name, metrics in scored:
        for metric, described in metrics.items():
            if described.get("floor") is None:
                continue
            if metric not in first:
                first[metric] = (name, described)
                continue
            other_name, other = first[metric]
            digests = (described.get("weights_digest"), other.get("weights_digest"))
            floors = (described["floor"], other["floor"])
            differ = all(digests) and digests[0] != digests[1]
            if differ or abs(floors[0] - floors[1]) > FLOOR_RTOL * abs(floors[1]):
                problems.append(
                    f"{name}: its {metric} comes from other feature-network weights than "
                    f"{other_name}'s (floor {floors[0]:.4f} vs {floors[1]:.4f}, weights "
                    f"{digests[0]} vs {digests[1]}): rerun its evaluation with the shipped weights"
                )
    return problems


def load_config(overrides: Mapping[str, Any], config: Path = CONFIG) -> Any:
    """`get_config()` of a config file with `overrides` ({'a.b': value}) set, as the CLI sets them.

    Raises:
      KeyError naming the field when the config has no such field.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_config", config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    resolved = module.get_config()
    for field, value in overrides.items():
        *parents, last = field.split(".")
        node = resolved
        for parent in parents:
            node = node[parent]
        if last not in node:
            raise KeyError(f"config.{field}: no such field in {config.name}")
        node[last] = tuple(value) if isinstance(value, list) else value
    return resolved


def time_configs(
    configs: Mapping[str, Any], rounds: int, burst: int, warmup: int = 2
) -> dict[str, Any]:
    """Seconds per train step of each config, timed in alternating bursts in this process.

    Each config's state and step are built as the train loop builds them (`workloads`, one
    device, a random batch of the config's shape). After `warmup` steps each (compilation), every
    round times one burst of `burst` steps per config, in reversed order every other round
    (A B, B A, ...) so that a drifting machine weighs on all configs alike.

    Returns:
      {'seconds_per_step': {name: median over rounds}, 'bursts': {name: [seconds per step of
      each round]}, 'rounds', 'burst', 'compile_seconds': {name: seconds of the warm-up steps}}.
    """
    import timing
    import workloads

    prepared = {}
    compile_seconds = {}
    for name, config in configs.items():
        mesh = workloads.single_device_mesh(config)
        state, step, *_ = workloads.build_state_and_step(config, mesh)
        batch = workloads.random_batch(config, config.batch_size)
        start = time.perf_counter()
        state, _, _ = timing.run_steps(step, state, batch, 0, warmup)
        compile_seconds[name] = time.perf_counter() - start
        prepared[name] = [step, state, batch]
    bursts: dict[str, list[float]] = {name: [] for name in configs}
    order = list(configs)
    for index in range(rounds):
        for name in order if index % 2 == 0 else order[::-1]:
            step, state, batch = prepared[name]
            state, times, _ = timing.run_steps(step, state, batch, burst, 0)
            prepared[name][1] = state
            bursts[name].append(sum(times) / burst)
    return {
        "seconds_per_step": {name: statistics.median(values) for name, values in bursts.items()},
        "bursts": bursts,
        "rounds": rounds,
        "burst": burst,
        "compile_seconds": compile_seconds,
    }
