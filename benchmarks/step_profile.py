"""Benchmark: where the MNIST default train step's time goes.

    python benchmarks/step_profile.py            # -> benchmarks/results/step_profile.json
    python benchmarks/step_profile.py --quick    # tiny DiT, few repetitions (smoke test)

(a) The parts of the step compiled and timed as separate programs, with the step's own pieces
(`steps.make_loss_fn`, `steps.make_update_fn`): student forward on the whole batch, targets
(noise, times and the teacher passes), loss forward + backward, optimizer + EMA + norms; each
as a share of the full step's median time. (b) A `jax.profiler` trace of the compiled step
(built by `compiled_step.build`, as the train loop runs it), summed per entry HLO op and per
category (matmul-bearing ops, elementwise/reduce, data movement; `hlo_flops.classify_entry_ops`).
Random arrays stand in for data.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import hlo_flops  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
import timing  # noqa: E402
import workloads  # noqa: E402

from shortcut_jax import objectives, sharding, steps  # noqa: E402


def time_jitted(fn: Callable, args: tuple, reps: int) -> dict[str, Any]:
    """Compile `fn` on `args`, then its FLOPs, median seconds and GFLOP/s over `reps` calls."""
    compiled = jax.jit(fn).lower(*args).compile()
    flops = timing.cost(compiled)["flops"]
    times = timing.time_calls(lambda: compiled(*args), reps, warmup=3)
    median = statistics.median(times)
    return {
        "flops": flops,
        "median_seconds": median,
        "best_seconds": min(times),
        "gflops": flops / median / 1e9,
    }


def step_breakdown(live: dict[str, Any], reps: int, full_step_seconds: float) -> dict[str, Any]:
    """Times the parts of the train step of `live['config']` as separate programs.

    Parts: student forward on the whole regression batch, targets (objective.build_targets: noise,
    times and the teacher passes), student loss forward + backward (value_and_grad), optimizer +
    EMA update on given gradients. Shares are relative to the measured full step.
    """
    config, model, optimizer = live["config"], live["model"], live["optimizer"]
    state, batch = live["state"], live["batch"]
    objective = objectives.get(config.objective)
    objective_config = objectives.ObjectiveConfig.from_config(config)
    apply_fn = steps.make_apply_fn(model)
    loss_fn = steps.make_loss_fn(config, model)  # the train step's own loss and update
    update = steps.make_update_fn(config, optimizer)
    rng = jax.random.PRNGKey(3)

    def targets(params, batch):
        return objective.build_targets(apply_fn, params, batch, rng, objective_config)[0]

    regression = jax.jit(targets)(state.params, batch)

    def forward(params, regression):
        x = (regression.x_t, regression.t, regression.d, regression.labels)
        return apply_fn(params, *x)

    def forward_backward(params, regression):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, regression)

    grads = jax.jit(forward_backward)(state.params, regression)[1]

    def update_and_norms(state, grads):
        new_state = update(state, grads)
        return new_state, optax.global_norm(grads), optax.global_norm(new_state.params)

    parts = {
        "forward (student, whole batch)": time_jitted(forward, (state.params, regression), reps),
        "targets (noise, t, teacher passes)": time_jitted(targets, (state.params, batch), reps),
        "loss forward + backward": time_jitted(forward_backward, (state.params, regression), reps),
        "optimizer + EMA + norms": time_jitted(update_and_norms, (state, grads), reps),
    }
    for part in parts.values():
        part["share_of_full_step"] = part["median_seconds"] / full_step_seconds
    parts_sum = sum(
        parts[name]["median_seconds"]
        for name in (
            "targets (noise, t, teacher passes)",
            "loss forward + backward",
            "optimizer + EMA + norms",
        )
    )
    return {
        "parts": parts,
        "full_step_median_seconds": full_step_seconds,
        "targets + fwd/bwd + optimizer, run separately (seconds)": parts_sum,
        "backward / forward time ratio": (
            parts["loss forward + backward"]["median_seconds"]
            / parts["forward (student, whole batch)"]["median_seconds"]
        ),
    }


def profile_step(live: dict[str, Any], num_steps: int, top: int = 25) -> dict[str, Any]:
    """A jax.profiler trace of `num_steps` train steps, summarised per compiled HLO op.

    The trace's per-op events (CPU thunks, named like the entry instructions of the optimised
    HLO) are summed per op and per category (matmul-bearing ops vs the rest).
    """
    compiled, step = live["compiled"], live["step"]
    state, batch = live["state"], live["batch"]
    sums = step.zero_sums(state, batch)
    ops = hlo_flops.classify_entry_ops(compiled.as_text())
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(num_steps):
                state, sums, loss = step(state, sums, batch)
                jax.block_until_ready((state, sums, loss))
            wall = time.perf_counter() - start
        traces = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
        traces = [path for path in traces if "perfetto" not in os.path.basename(path)] or traces
        if not traces:
            return {"error": "the profiler wrote no trace.json.gz"}
        with gzip.open(traces[0], "rt") as file:
            trace = json.load(file)
    live["state"] = state
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event in events:
        name = event.get("name")
        if event.get("ph") == "X" and name in ops:
            per_op[name] = per_op.get(name, 0.0) + float(event.get("dur", 0.0)) * 1e-6
            counts[name] = counts.get(name, 0) + 1
    total = sum(per_op.values())
    if not total:
        return {"error": "no trace event matched an HLO op", "wall_seconds": wall}
    by_category: dict[str, float] = {}
    for name, seconds in per_op.items():
        category = ops[name]["category"]
        by_category[category] = by_category.get(category, 0.0) + seconds
    ranked = sorted(per_op.items(), key=lambda item: -item[1])
    top_ops = []
    for name, seconds in ranked[:top]:
        info = ops[name]
        per_step = seconds / num_steps
        top_ops.append(
            {
                "op": name,
                "category": info["category"],
                "ms_per_step": per_step * 1e3,
                "share_of_op_time": seconds / total,
                "calls_per_step": counts[name] / num_steps,
                "matmul_gflops": info["matmul_flops"] / per_step / 1e9
                if info["matmul_flops"]
                else 0.0,
                "fused_ops": info["fused_ops"],
            }
        )
    matmul_flops_total = sum(info["matmul_flops"] for info in ops.values())
    matmul_seconds = by_category.get("matmul", 0.0) / num_steps
    return {
        "steps_traced": num_steps,
        "wall_seconds_per_step_under_trace": wall / num_steps,
        "op_seconds_per_step": total / num_steps,
        "num_entry_ops": len(ops),
        "num_ops_run_per_step": sum(counts.values()) / num_steps,
        "op_time_share_by_category": {k: v / total for k, v in sorted(by_category.items())},
        "matmul_ops_gflops": (matmul_flops_total / matmul_seconds / 1e9 if matmul_seconds else 0.0),
        "top_ops": top_ops,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Builds the MNIST step, times it, its parts and a profiled run; writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny DiT, few reps (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "step_profile.json"))
    parser.add_argument("--steps", type=int, default=100, help="timed full steps")
    args = parser.parse_args(argv)
    quick = args.quick

    from shortcut_jax import atomic_files

    config = workloads.mnist_config(quick)
    mesh = workloads.single_device_mesh(config)
    state, step, model, optimizer, _ = workloads.build_state_and_step(config, mesh)
    batch = sharding.global_batch(mesh, workloads.random_batch(config, config.batch_size))
    compiled = step.lower(state, batch).compile()
    step = step.with_program(compiled)
    state, times, _ = timing.run_steps(step, state, batch, 2 if quick else args.steps, warmup=5)
    live = dict(
        config=config,
        state=state,
        batch=batch,
        compiled=compiled,
        step=step,
        model=model,
        optimizer=optimizer,
    )
    full_step = statistics.median(times)
    results: dict[str, Any] = {
        "meta": timing.run_meta(quick),
        "full_step": timing.summarize_times(times),
        "breakdown": step_breakdown(live, 3 if quick else 100, full_step),
        "trace": profile_step(live, 2 if quick else 30),
    }
    for name, part in results["breakdown"]["parts"].items():
        print(
            f"{name}: {1e3 * part['median_seconds']:.2f} ms, {part['flops'] / 1e9:.3f} GFLOP, "
            f"{part['gflops']:.1f} GFLOP/s",
            flush=True,
        )
    trace = results["trace"]
    if "top_ops" in trace:
        print(f"op time by category: {trace['op_time_share_by_category']}")
        for op in trace["top_ops"][:10]:
            print(
                f"  {op['op']:28s} {op['category']:20s} {op['ms_per_step']:7.3f} ms "
                f"{op['matmul_gflops']:7.1f} GFLOP/s {','.join(op['fused_ops'][:6])}"
            )
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    atomic_files.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
