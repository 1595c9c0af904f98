"""Benchmark: the train loop's per-step host work, variants A/B in fresh processes, interleaved.

    python benchmarks/step_loop_benchmark.py            # -> benchmarks/results/step_loop.json
    python benchmarks/step_loop_benchmark.py --quick    # tiny model, few steps (smoke test)

Each variant runs the MNIST default (experiments/mnist.py, batch 32, the real MNIST source) for
`--steps` timed steps after compilation and a warm-up, the way `shortcut_jax.train` drives the
step: next batch, step, and at every `log_every_steps` the metric sums fetched and reset.
Variants:
  host_sums: the loop before the change: the step returns its metrics and the loop adds them
    eagerly (one dispatch per metric and per step) and places each batch just before its step;
  device_sums: `compiled_step.build`'s step, which sums the metrics inside the jitted program;
  device_sums_prefetch: that step with batches placed two ahead (`prefetch.to_devices`), what
    the train loop runs;
  scan_K (with --scan K): K steps per call in one `lax.scan` over K stacked batches, device sums.
A first process times each piece of that host work alone (`host_costs`). Every variant runs in
its own process, in the order A B C ... repeated `--rounds` times, and reports wall and CPU
(user + system, getrusage) seconds per step; the summary gives each variant's over the first
variant's, per round (the machine's load changes over minutes: compare within a round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import timing  # noqa: E402

VARIANTS = ("host_sums", "device_sums", "device_sums_prefetch")


def _loop(variant: str, config: Any, num_steps: int, warmup: int, scan: int) -> dict[str, Any]:
    """Runs one variant in this process; returns its seconds per step and last logged loss."""
    import functools
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    from shortcut_jax import compiled_step, data, models, optim, prefetch, sharding, steps
    from shortcut_jax.state import init_state, sharded_abstract_state

    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    _, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    state = jax.jit(
        functools.partial(init_state, config, model, optimizer), out_shardings=state_sharding
    )()
    host = data.get_source(config).iterate(0)
    step = compiled_step.build(config, mesh, model, optimizer, state_sharding)
    log_every = int(config.log_every_steps)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    if variant == "host_sums":
        # The wiring and loop of shortcut_jax/train.py before the metric sums moved on device.
        old_step = jax.jit(
            steps.make_train_step(config, model, optimizer),
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        )
        accumulated = None

        def run_one(state: Any, index: int) -> Any:
            nonlocal accumulated
            batch = sharding.global_batch(mesh, next(host))
            state, metrics = old_step(state, batch)
            accumulated = (
                metrics if accumulated is None else jax.tree.map(jnp.add, accumulated, metrics)
            )
            if index % log_every == 0:
                steps.summarize(jax.tree.map(sharding.to_host, accumulated))
                accumulated = None
            return state

        steps_per_call = 1
    elif variant.startswith("device_sums"):
        batches = (
            prefetch.to_devices(host, mesh, depth=2)
            if variant.endswith("prefetch")
            else (sharding.global_batch(mesh, batch) for batch in host)
        )
        sums = None

        def run_one(state: Any, index: int) -> Any:
            nonlocal sums
            batch = next(batches)
            if sums is None:
                sums = step.zero_sums(state, batch)
            state, sums, _ = step(state, sums, batch)
            if index % log_every == 0:
                steps.summarize(jax.tree.map(sharding.to_host, sums))
                sums = step.zero_sums(state, batch)
            return state

        steps_per_call = 1
    else:
        run_one = _scan_runner(config, step, mesh, host, scan, log_every)
        steps_per_call = scan

    calls_warmup = max(1, warmup // steps_per_call)
    calls_timed = max(1, num_steps // steps_per_call)
    index = 0
    for _ in range(calls_warmup):
        index += steps_per_call
        state = run_one(state, index)
    jax.block_until_ready(state)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(calls_timed):
        index += steps_per_call
        state = run_one(state, index)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    timed = calls_timed * steps_per_call
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "variant": variant,
        "steps_timed": timed,
        "seconds_per_step": seconds / timed,
        "cpu_seconds_per_step": cpu / timed,
        "final_step": int(np.asarray(state.step)),
    }


def _scan_runner(config: Any, step: Any, mesh: Any, host: Any, k: int, log_every: int) -> Any:
    """A run_one(state, index) doing `k` steps in one lax.scan call over stacked batches."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from shortcut_jax import sharding, steps

    stacked_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))
    accumulate = step.program  # the jitted accumulating step; traced inside the scan

    def scan_steps(state: Any, sums: Any, batches: Any, frozen: Any) -> Any:
        def body(carry: Any, batch: Any) -> Any:
            state, sums, loss = accumulate(*carry, batch, frozen)
            return (state, sums), loss

        (state, sums), losses = jax.lax.scan(body, (state, sums), batches)
        return state, sums, losses

    program = jax.jit(
        scan_steps,
        in_shardings=(step.state_sharding, sharding.replicated(mesh), stacked_sharding, {}),
        out_shardings=(step.state_sharding, sharding.replicated(mesh), sharding.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    holder: dict[str, Any] = {"sums": None, "example": None}

    def run_one(state: Any, index: int) -> Any:
        group = [next(host) for _ in range(k)]
        stacked = {key: np.stack([batch[key] for batch in group]) for key in group[0]}
        batches = {
            key: jax.make_array_from_process_local_data(stacked_sharding, value)
            for key, value in stacked.items()
        }
        if holder["sums"] is None:
            holder["example"] = sharding.global_batch(mesh, group[0])
            holder["sums"] = step.zero_sums(state, holder["example"])
        state, holder["sums"], _ = program(state, holder["sums"], batches, {})
        if index % log_every < k:
            steps.summarize(jax.tree.map(sharding.to_host, holder["sums"]))
            holder["sums"] = step.zero_sums(state, holder["example"])
        return state

    return run_one


def _host_costs(config: Any, reps: int) -> dict[str, Any]:
    """Median host seconds of each piece of per-step loop work, timed alone (blocking).

    The pieces: the next host batch from the MNIST source, placing it on the device
    (`sharding.global_batch`), the eager metric adds of the old loop (one `jnp.add` per leaf of
    the step's metrics), and a fresh zero metric-sum tree (`CompiledStep.zero_sums`, per log).
    """
    import functools

    import jax
    import jax.numpy as jnp

    from shortcut_jax import compiled_step, data, models, optim, sharding
    from shortcut_jax.state import sharded_abstract_state

    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    abstract, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    step = compiled_step.build(config, mesh, model, optimizer, state_sharding)
    host = data.get_source(config).iterate(0)
    batch = next(host)
    device_batch = sharding.global_batch(mesh, batch)
    sums = step.zero_sums(abstract, device_batch)
    metrics = step.zero_sums(abstract, device_batch)
    add = functools.partial(jax.tree.map, jnp.add)
    pieces = {
        "next_host_batch": lambda: next(host),
        "global_batch": lambda: sharding.global_batch(mesh, batch),
        "eager_metric_adds": lambda: add(sums, metrics),
        "zero_sums": lambda: step.zero_sums(abstract, device_batch),
    }
    costs = {
        name: timing.summarize_times(timing.time_calls(fn, reps, warmup=5))["median_seconds"]
        for name, fn in pieces.items()
    }
    return {"median_seconds": costs, "metric_leaves": len(jax.tree.leaves(metrics))}


def worker(variant: str, quick: bool, num_steps: int, scan: int) -> dict[str, Any]:
    """One variant in this process, on the MNIST default (a tiny DiT with `quick`)."""
    import workloads

    config = workloads.mnist_config(quick)
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    if variant == "host_costs":
        return _host_costs(config, reps=20 if quick else 500)
    return _loop(variant, config, num_steps, warmup=4 if quick else 20, scan=scan)


def run_worker(variant: str, quick: bool, num_steps: int, scan: int) -> dict[str, Any]:
    """`worker` in a fresh process."""
    args = ["--worker", variant, "--steps", str(num_steps), "--scan", str(scan)]
    return timing.run_fresh(__file__, args + (["--quick"] if quick else []), what=variant)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the variants interleaved in fresh processes and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per process")
    parser.add_argument("--scan", type=int, default=0, help="also run K steps per lax.scan call")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="'' to time the host work only"
    )
    parser.add_argument("--out", default=str(RESULTS / "step_loop.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, args.steps, args.scan)), flush=True)
        return {}

    from shortcut_jax import atomic_files

    variants = [name for name in args.variants.split(",") if name]
    if args.scan > 1:
        variants.append(f"scan_{args.scan}")
    num_steps = 8 if args.quick else args.steps
    results: dict[str, Any] = {"meta": timing.run_meta(args.quick), "rounds": []}
    results["host_costs"] = run_worker("host_costs", args.quick, num_steps, args.scan)
    print(f"host costs per call: {results['host_costs']['median_seconds']}", flush=True)
    rounds = (1 if args.quick else args.rounds) if variants else 0  # --variants '': costs only
    for round_index in range(rounds):
        row = {name: run_worker(name, args.quick, num_steps, args.scan) for name in variants}
        base = row[variants[0]]
        for run in row.values():
            run["time_over_first_variant"] = run["seconds_per_step"] / base["seconds_per_step"]
            run["cpu_over_first_variant"] = (
                run["cpu_seconds_per_step"] / base["cpu_seconds_per_step"]
            )
        results["rounds"].append(row)
        ratios = ", ".join(f"{name} x{r['time_over_first_variant']:.3f}" for name, r in row.items())
        print(f"round {round_index + 1}: {ratios}", flush=True)
    keys = ("time_over_first_variant", "cpu_over_first_variant") if rounds else ()
    for key in keys:
        results[f"{key}_median"] = {
            name: statistics.median(row[name][key] for row in results["rounds"])
            for name in variants
        }
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    atomic_files.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
