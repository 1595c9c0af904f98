"""Benchmark: achieved FLOP/s of the train step against this machine's float32 matmul rate.

    python benchmarks/flops_benchmark.py            # -> benchmarks/results/flops.json
    python benchmarks/flops_benchmark.py --quick    # tiny models, 2 steps, small matmul (smoke)

In one process: the float32 2048^3 matmul rate (`matmul_benchmark.matmul_rate`), then for the
MNIST default (experiments/mnist.py, batch 32) and a DiT-B/2 step at a small batch
(experiments/imagenet256.py, float32, 32x32x4 random latents, 1000 classes) the train step as the
train loop builds it (`compiled_step.build`): its FLOPs (`compiled.cost_analysis()`), compile
time, the matmul share of the FLOPs (from the HLO), memory, the median step time with the
donated state threaded through, page faults and CPU seconds per step (getrusage), and achieved
FLOP/s as a fraction of the matmul rate, against `TARGET_FRACTIONS`.

The other measurements live in their own scripts: `matmul_benchmark.py` (matmul rates at the
steps' shapes), `step_profile.py` (where the MNIST step's time goes), `imagenet_flops.py`
(FLOPs of the batch-256 ImageNet configs), `allocator_benchmark.py` (glibc malloc settings),
`mesh_benchmark.py` (device meshes) and `step_loop_benchmark.py` (the loop's per-step host work).
Random arrays stand in for data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import workloads  # noqa: E402

# The benchmarks outside this split (latents, vae, reliability, mnist_latent) import these
# helpers from here as `flops_benchmark.<name>`.
from matmul_benchmark import matmul_rate  # noqa: E402
from timing import (  # noqa: E402, F401
    cost,
    lower_and_compile,
    memory,
    run_meta,
    run_steps_with_usage,
    summarize_times,
    time_calls,
)

from shortcut_jax import models, sharding  # noqa: E402

# Achieved FLOP/s the steps aim at, as a fraction of the matmul rate.
TARGET_FRACTIONS = {"mnist": 0.45, "dit_b2_small_batch": 0.65}  # issue 12


def benchmark_step(
    name: str,
    config: ml_collections.ConfigDict,
    num_steps: int,
    warmup: int,
    matmul_gflops: float,
) -> dict[str, Any]:
    """FLOPs, compile time, median step time and fraction of the matmul rate of one config."""
    mesh = workloads.single_device_mesh(config)
    state, step, *_ = workloads.build_state_and_step(config, mesh)
    batch = sharding.global_batch(mesh, workloads.random_batch(config, config.batch_size))
    lowered, compiled, lowered_seconds, compile_seconds = lower_and_compile(step, state, batch)
    step_cost = cost(compiled)
    split = hlo_flops.matmul_flops(lowered.as_text(dialect="hlo"))
    step = step.with_program(compiled)
    state, times, last_loss, usage = run_steps_with_usage(step, state, batch, num_steps, warmup)
    loss = float(np.asarray(last_loss[0]) / max(float(np.asarray(last_loss[1])), 1.0))
    median = statistics.median(times)
    achieved = step_cost["flops"] / median / 1e9
    fraction = achieved / matmul_gflops
    return {
        "name": name,
        "config": {
            "objective": config.objective,
            "batch_size": int(config.batch_size),
            "image": [config.data.image_size, config.data.image_size, config.data.channels],
            "num_classes": int(config.data.num_classes),
            "model": {
                **hlo_flops.dit_dims(config),
                "preset": config.model.preset,
                "dtype": config.model.dtype,
            },
            "bootstrap_every": int(config.bootstrap_every),
            "bootstrap_teacher": config.bootstrap_teacher,
            "bootstrap_cfg": bool(config.bootstrap_cfg),
        },
        "num_params": models.count_params(state.params),
        "trace_and_lower_seconds": lowered_seconds,
        "compile_seconds": compile_seconds,
        "cost_analysis": step_cost,
        "matmul_flops_in_lowered_hlo": split["dot"] + split["convolution"],
        "matmul_share_of_flops": (split["dot"] + split["convolution"]) / max(step_cost["flops"], 1),
        "analytic": hlo_flops.analytic_step_flops(config, hlo_flops.analytic_forward(config)),
        "memory": memory(compiled),
        "step_seconds": summarize_times(times),
        "step_seconds_all": times,
        "per_step_os": usage,
        "images_per_second": config.batch_size / median,
        "achieved_gflops": achieved,
        "achieved_gflops_best_step": step_cost["flops"] / min(times) / 1e9,
        "fraction_of_matmul_rate": fraction,
        "target_fraction": TARGET_FRACTIONS.get(name),
        "meets_target": fraction >= TARGET_FRACTIONS[name] if name in TARGET_FRACTIONS else None,
        "final_loss": loss,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measures the matmul rate and both steps and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 steps (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "flops.json"))
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--matmul_reps", type=int, default=30)
    parser.add_argument("--mnist_steps", type=int, default=200)
    parser.add_argument("--dit_batch", type=int, default=8)
    parser.add_argument("--dit_steps", type=int, default=5)
    args = parser.parse_args(argv)
    quick = args.quick
    if not quick:  # compile times are results: never read them from a persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    if quick:
        args.matmul_n, args.matmul_reps = min(args.matmul_n, 256), 3
        args.mnist_steps, args.dit_steps, args.dit_batch = 2, 2, 8

    from shortcut_jax import atomic_files

    results: dict[str, Any] = {"meta": run_meta(quick), "steps": {}}
    results["matmul"] = matmul_rate(args.matmul_n, args.matmul_reps)
    matmul = results["matmul"]["gflops_median"]
    print(f"matmul {args.matmul_n}^3 float32: median {matmul:.1f} GFLOP/s", flush=True)
    configs = {
        "mnist": (workloads.mnist_config(quick), args.mnist_steps, 5),
        "dit_b2_small_batch": (
            workloads.imagenet_config("DiT-B/2", args.dit_batch, dtype="float32", quick=quick),
            args.dit_steps,
            1,
        ),
    }
    for name, (config, num_steps, warmup) in configs.items():
        step = benchmark_step(name, config, num_steps, warmup, matmul)
        results["steps"][name] = step
        print(
            f"{name} step: {step['cost_analysis']['flops'] / 1e9:.3f} GFLOP, compile "
            f"{step['compile_seconds']:.1f} s, median "
            f"{1e3 * step['step_seconds']['median_seconds']:.1f} ms -> "
            f"{step['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * step['fraction_of_matmul_rate']:.1f}% of matmul "
            f"(target {100 * step['target_fraction']:.0f}%)",
            flush=True,
        )
    results["matmul_after"] = matmul_rate(args.matmul_n, args.matmul_reps)
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    atomic_files.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
