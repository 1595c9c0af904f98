"""The timing helpers every benchmark shares: run metadata, timed calls, train steps, workers.

Not a script. `run_meta` is what each result JSON records about its run; `time_calls` and
`timed_with_usage` time blocking calls; `run_steps` drives a `compiled_step.CompiledStep` the way
the train loop does; `run_fresh` runs a benchmark's worker in a fresh process and reads the JSON
line it prints.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

ROOT = Path(__file__).resolve().parents[1]


def run_meta(quick: bool) -> dict[str, Any]:
    """What every benchmark result records about its run: date, machine, jax, devices, load."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "quick": quick,
        "load_average_1_5_15_min_at_start": list(os.getloadavg()),
    }


def cost(compiled_or_lowered: Any) -> dict[str, float]:
    """flops, transcendentals and bytes accessed of a compiled or lowered program (one device)."""
    analysis = compiled_or_lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "flops": float(analysis.get("flops", 0.0)),
        "transcendentals": float(analysis.get("transcendentals", 0.0)),
        "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
    }


def memory(compiled: Any) -> dict[str, int]:
    """Argument, output, alias, temp and generated-code bytes of one device's program."""
    analysis = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    if analysis is None:
        return {}
    return {
        f"{field}_bytes": int(getattr(analysis, f"{field}_size_in_bytes", 0)) for field in fields
    }


def lower_and_compile(fn: Any, *args: Any) -> tuple[Any, Any, float, float]:
    """Lowers and compiles a jitted function (or `CompiledStep`) for `args`.

    Returns:
      (lowered, compiled, lower seconds, compile seconds).
    """
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return lowered, compiled, lower_seconds, time.perf_counter() - start


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `reps` calls of fn() (each waited for), after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def summarize_times(times: list[float]) -> dict[str, float]:
    """Median, best and count of a list of durations in seconds."""
    return {
        "median_seconds": statistics.median(times),
        "best_seconds": min(times),
        "num_timed": len(times),
    }


def usage_between(before: Any, after: Any, calls: int) -> dict[str, float]:
    """Minor page faults and user / system CPU seconds per call between two getrusage()s."""
    return {
        "minor_page_faults": (after.ru_minflt - before.ru_minflt) / calls,
        "user_cpu_seconds": (after.ru_utime - before.ru_utime) / calls,
        "system_cpu_seconds": (after.ru_stime - before.ru_stime) / calls,
    }


def timed_with_usage(fn: Callable[[], Any], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds, minor page faults and CPU seconds per blocking call of fn()."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = time_calls(fn, reps, warmup=0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"median_seconds": statistics.median(times), **usage_between(before, after, reps)}


def run_steps(step: Any, state: Any, batch: dict, num_steps: int, warmup: int):
    """Runs `warmup` then `num_steps` timed steps of a `CompiledStep`, as the train loop does.

    The donated state and metric sums are threaded through; each step is waited for.

    Returns:
      (final state, list of step seconds, the last step's loss (total, count)).
    """
    sums = step.zero_sums(state, batch)
    loss = None
    for _ in range(warmup):
        state, sums, loss = step(state, sums, batch)
    jax.block_until_ready((state, sums, loss))
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        state, sums, loss = step(state, sums, batch)
        jax.block_until_ready((state, sums, loss))
        times.append(time.perf_counter() - start)
    return state, times, loss


def run_steps_with_usage(step: Any, state: Any, batch: dict, num_steps: int, warmup: int):
    """`run_steps` plus this process's page faults and user / system CPU seconds per timed step.

    Returns:
      (final state, step seconds, last loss (total, count), {'minor_page_faults',
      'user_cpu_seconds', 'system_cpu_seconds'} per step).
    """
    state, _, _ = run_steps(step, state, batch, 0, warmup)
    before = resource.getrusage(resource.RUSAGE_SELF)
    state, times, loss = run_steps(step, state, batch, num_steps, 0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return state, times, loss, usage_between(before, after, num_steps)


def run_fresh(
    script: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 1800,
    what: str = "",
) -> dict[str, Any]:
    """Runs `python script args` in a fresh process; returns the JSON of its last stdout line.

    Args:
      script: the benchmark file (its --worker mode prints one JSON line).
      env: the whole environment (default: this one); the repository is put on PYTHONPATH.
      what: names the run in the error raised when it fails.
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    process = subprocess.run(
        [sys.executable, script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if process.returncode != 0:
        raise RuntimeError(f"{what or script} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])
