"""Benchmark: the MNIST default train step on several device meshes of 8 CPU devices.

    python benchmarks/mesh_benchmark.py            # -> benchmarks/results/mesh.json
    python benchmarks/mesh_benchmark.py --quick    # tiny model, 2 steps (smoke)

Each mesh runs in its own process; the multi-device ones with
XLA_FLAGS=--xla_force_host_platform_device_count=8. The baseline is a process with one device
(no flag); '1 device of 8' is a one-device mesh inside an 8-device process, which isolates what
the flag alone costs. Per mesh: compile time, median step time (donated state threaded through,
random data) and the per-device memory of the compiled program (`compiled.memory_analysis()`:
argument, output, alias, temp and generated-code bytes), all relative to the baseline.

The 8 "devices" are threads sharing the machine's cores: step-time ratios measure the overhead of
partitioning and collectives, not a speedup.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import timing  # noqa: E402

DEVICE_FLAG = "--xla_force_host_platform_device_count"
MALLOC_TUNING_ENV = "SHORTCUT_JAX_MALLOC_TUNING"  # shortcut_jax/allocator.py (not imported here)

# name -> (process device count, mesh sizes).
MESHES: dict[str, tuple[int, dict[str, int]]] = {
    "1 device": (1, {"data": 1, "fsdp": 1, "tensor": 1}),
    "1 device of 8": (8, {"data": 1, "fsdp": 1, "tensor": 1}),
    "data=8": (8, {"data": 8, "fsdp": 1, "tensor": 1}),
    "fsdp=8": (8, {"data": 1, "fsdp": 8, "tensor": 1}),
    "data=2 x fsdp=4": (8, {"data": 2, "fsdp": 4, "tensor": 1}),
    "data=4 x tensor=2": (8, {"data": 4, "fsdp": 1, "tensor": 2}),
    # One device per core: can data parallelism use the cores one program leaves idle?
    "data=2 of 2 devices": (2, {"data": 2, "fsdp": 1, "tensor": 1}),
}
BASELINE = "1 device"


def worker(mesh_sizes: dict[str, int], num_steps: int, quick: bool) -> dict[str, Any]:
    """Compiles and times the MNIST step on a mesh of the first prod(sizes) devices.

    Runs inside the subprocess; returns the JSON-able measurements.
    """
    import jax
    import numpy as np
    import workloads

    from shortcut_jax import allocator, models, sharding

    if not quick:  # compile times are results: never read them from a persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    config = workloads.mnist_config(quick)
    config.mesh = dict(mesh_sizes)
    num_devices = math.prod(mesh_sizes.values())
    mesh = sharding.make_mesh(config, jax.devices()[:num_devices])
    state, step, *_ = workloads.build_state_and_step(config, mesh)
    batch = sharding.global_batch(mesh, workloads.random_batch(config, config.batch_size))

    lowered, compiled, lower_seconds, compile_seconds = timing.lower_and_compile(step, state, batch)

    state_per_device: dict[int, int] = {}
    params_per_device: dict[int, int] = {}
    for tree, totals in ((state, state_per_device), (state.params, params_per_device)):
        for leaf in jax.tree.leaves(tree):
            for shard in leaf.addressable_shards:
                totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes

    state, times, loss, usage = timing.run_steps_with_usage(
        step.with_program(compiled), state, batch, num_steps, warmup=3
    )
    total, count = (float(np.asarray(value)) for value in loss)
    return {
        "process_devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "batch_size": int(config.batch_size),
        "num_params": models.count_params(state.params),
        "trace_and_lower_seconds": lower_seconds,
        "compile_seconds": compile_seconds,
        "step_seconds": timing.summarize_times(times),
        "images_per_second": config.batch_size / statistics.median(times),
        "flops_per_device_program": timing.cost(compiled)["flops"],
        "memory_per_device": timing.memory(compiled),
        "state_bytes_per_device_max": max(state_per_device.values()),
        "state_bytes_total": sum(state_per_device.values()),
        "params_bytes_per_device_max": max(params_per_device.values()),
        "per_step_os": usage,
        "malloc_tuned": allocator.is_tuned(),
        "final_loss": total / max(count, 1.0),
    }


def run_worker(
    name: str,
    devices: int,
    sizes: dict[str, int],
    steps: int,
    quick: bool,
    timeout: float,
    malloc_tuning: bool = True,
) -> dict[str, Any]:
    """Runs `worker` for one mesh in a fresh process with `devices` CPU devices.

    Without `malloc_tuning` the worker keeps glibc's malloc defaults (SHORTCUT_JAX_MALLOC_TUNING=0).
    """
    env = dict(os.environ)
    env[MALLOC_TUNING_ENV] = "1" if malloc_tuning else "0"
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    flags = [flag for flag in env.get("XLA_FLAGS", "").split() if not flag.startswith(DEVICE_FLAG)]
    if devices > 1:
        flags.append(f"{DEVICE_FLAG}={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    mesh_text = ",".join(f"{axis}={size}" for axis, size in sizes.items())
    args = ["--worker", "--mesh", mesh_text, "--steps", str(steps)] + (["--quick"] if quick else [])
    start = time.perf_counter()
    result = timing.run_fresh(__file__, args, env, timeout, what=f"mesh {name}")
    result["process_seconds"] = time.perf_counter() - start
    return result


def relative(results: dict[str, dict[str, Any]]) -> None:
    """Adds, to each mesh, its compile time, step time and memory relative to the baseline."""
    base = results[BASELINE]
    for result in results.values():
        memory, base_memory = result["memory_per_device"], base["memory_per_device"]
        result["relative_to_1_device"] = {
            "compile_seconds": result["compile_seconds"] / base["compile_seconds"],
            "step_seconds_median": (
                result["step_seconds"]["median_seconds"] / base["step_seconds"]["median_seconds"]
            ),
            "flops_per_device_program": (
                result["flops_per_device_program"] / base["flops_per_device_program"]
            ),
            "state_bytes_per_device": (
                result["state_bytes_per_device_max"] / base["state_bytes_per_device_max"]
            ),
            **{
                key: memory[key] / base_memory[key]
                for key in memory
                if base_memory.get(key) and key in base_memory
            },
        }


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        axis, size = part.split("=")
        sizes[axis.strip()] = int(size)
    return sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps (smoke test)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per mesh")
    parser.add_argument("--out", default=str(RESULTS / "mesh.json"))
    parser.add_argument("--meshes", default=",".join(MESHES), help="subset of mesh names")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mesh process")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds over the meshes, order reversed every other round (each mesh's first round "
        "is its main result; every round's median step and CPU time are in its `rounds`)",
    )
    parser.add_argument(
        "--glibc_malloc_defaults",
        action="store_true",
        help="workers run without shortcut_jax's malloc tuning (per-step page faults come back)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default="data=1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(parse_mesh(args.mesh), args.steps, args.quick)), flush=True)
        return {}

    steps = 2 if args.quick else args.steps
    names = [name.strip() for name in args.meshes.split(",") if name.strip()]
    if BASELINE not in names:
        names.insert(0, BASELINE)
    started = time.perf_counter()
    load_at_start = list(os.getloadavg())
    results: dict[str, dict[str, Any]] = {}
    malloc_tuning = not args.glibc_malloc_defaults
    num_rounds = max(1, args.rounds)
    for round_index in range(num_rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            devices, sizes = MESHES[name]
            result = run_worker(
                name, devices, sizes, steps, args.quick, args.timeout, malloc_tuning
            )
            usage = result["per_step_os"]
            cpu_seconds = usage["user_cpu_seconds"] + usage["system_cpu_seconds"]
            rounds = results.setdefault(name, result).setdefault("rounds", [])
            rounds.append(
                {
                    "step_seconds_median": result["step_seconds"]["median_seconds"],
                    "cpu_seconds_per_step": cpu_seconds,
                }
            )
            print(
                f"[{time.perf_counter() - started:6.1f} s] round {round_index + 1} {name:18s} "
                f"compile {result['compile_seconds']:6.2f} s  step "
                f"{1e3 * result['step_seconds']['median_seconds']:7.2f} ms  "
                f"temp {result['memory_per_device'].get('temp_bytes', 0) / 2**20:7.2f} MiB  "
                f"args {result['memory_per_device'].get('argument_bytes', 0) / 2**20:6.2f} MiB  "
                f"faults/step {usage['minor_page_faults']:8.0f}  CPU s/step {cpu_seconds:.3f}",
                flush=True,
            )
    relative(results)
    output = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "quick": args.quick,
            "steps_timed": steps,
            "rounds": num_rounds,
            "malloc_tuned": not args.glibc_malloc_defaults,
            "load_average_1_5_15_min_at_start": load_at_start,
            "load_average_1_5_15_min_at_end": list(os.getloadavg()),
            "workload": "experiments/mnist.py train step (tiny DiT with --quick), random data",
            "notes": (
                f"The multi-device meshes run on fake CPU devices ({DEVICE_FLAG}) that share the "
                "machine's cores: step-time ratios measure the overhead of partitioning and "
                "collectives, not a speedup. The baseline of every ratio is '1 device'. "
                "Interpretation: BENCHMARKS.md."
            ),
        },
        "meshes": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump(output, file, indent=2)
    print(f"wrote {args.out}")
    return output


if __name__ == "__main__":
    main()
