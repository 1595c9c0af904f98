"""Benchmark: this machine's float32 matmul rate, alone and at the train steps' matmul shapes.

    python benchmarks/matmul_benchmark.py            # -> benchmarks/results/matmul.json
    python benchmarks/matmul_benchmark.py --quick    # 256^3, tiny shapes (smoke test)
    python benchmarks/matmul_benchmark.py --rate_only  # only (a), printed (about 10 s)

(a) A jitted n x n @ n x n `jnp.dot` (2 n^3 FLOPs a call, default n = 2048), best and median over
many calls: the reference every utilisation figure is a fraction of (`matmul_rate`, imported by
the other benchmarks). (b) Loops of the matmul shapes the MNIST default step and a small-batch
DiT-B/2 step run (MLP, q/k/v-sized, per-head attention), inside one jitted `fori_loop` so that
per-call dispatch does not count (`matmul_shape_rates`).
"""

from __future__ import annotations

import argparse
import math
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
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import timing  # noqa: E402
import workloads  # noqa: E402


def matmul_rate(n: int, reps: int) -> dict[str, Any]:
    """float32 n x n @ n x n with jnp.dot: seconds per call and GFLOP/s (2 n^3 per call)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    times = timing.time_calls(lambda: dot(a, b), reps, warmup=3)
    flops = 2 * n**3
    compiled_flops = timing.cost(dot.lower(a, b).compile())["flops"]
    return {
        "n": n,
        "dtype": "float32",
        "flops_per_call": flops,
        "cost_analysis_flops": compiled_flops,
        **timing.summarize_times(times),
        "gflops_best": flops / min(times) / 1e9,
        "gflops_median": flops / statistics.median(times) / 1e9,
    }


def shape_rate(
    name: str, x_shape: tuple, w1_shape: tuple, w2_shape: tuple, iterations: int, reps: int
) -> dict[str, Any]:
    """GFLOP/s of `iterations` chained (x @ w1) @ w2 products inside one jitted loop.

    x: (..., M, K), w1: (..., K, N), w2: (..., N, K); each iteration updates x += 1e-6 (x w1) w2
    so the loop cannot be hoisted. Per-call dispatch is amortised over the iterations.
    """
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(keys[0], x_shape, jnp.float32)
    w1 = jax.random.normal(keys[1], w1_shape, jnp.float32)
    w2 = jax.random.normal(keys[2], w2_shape, jnp.float32)

    @jax.jit
    def loop(x, w1, w2):
        def body(_, x):
            return x + 1e-6 * jnp.matmul(jnp.matmul(x, w1), w2)

        return jax.lax.fori_loop(0, iterations, body, x)

    times = timing.time_calls(lambda: loop(x, w1, w2), reps, warmup=2)
    batch = math.prod(x_shape[:-2])
    m, k = x_shape[-2:]
    n = w1_shape[-1]
    flops = iterations * 2 * (2 * batch * m * k * n)
    return {
        "name": name,
        "x": list(x_shape),
        "w1": list(w1_shape),
        "w2": list(w2_shape),
        "flops_per_call": flops,
        **timing.summarize_times(times),
        "gflops_median": flops / statistics.median(times) / 1e9,
    }


def matmul_shape_rates(config: ml_collections.ConfigDict, quick: bool) -> list[dict[str, Any]]:
    """Rates of the matmul shapes of a step of `config` (MLP, q/k/v + out, attention)."""
    dims = hlo_flops.dit_dims(config)
    hidden, heads = dims["hidden_size"], dims["num_heads"]
    tokens = (config.data.image_size // dims["patch_size"]) ** 2
    rows = config.batch_size * tokens
    mlp = int(hidden * config.model.mlp_ratio)
    head_dim = hidden // heads
    iterations, reps = (2, 2) if quick else (20, 15)
    prefix = f"B={config.batch_size} x {tokens} tokens, width {hidden}"
    return [
        shape_rate(
            f"MLP fc1+fc2 ({prefix})",
            (rows, hidden),
            (hidden, mlp),
            (mlp, hidden),
            iterations,
            reps,
        ),
        shape_rate(
            f"qkv-sized + back ({prefix})",
            (rows, hidden),
            (hidden, 3 * hidden),
            (3 * hidden, hidden),
            iterations,
            reps,
        ),
        shape_rate(
            f"attention q k^T, p v per head ({prefix}, {heads} heads)",
            (config.batch_size * heads, tokens, head_dim),
            (config.batch_size * heads, head_dim, tokens),
            (config.batch_size * heads, tokens, head_dim),
            iterations,
            reps,
        ),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measures (a) and (b) and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256^3 and tiny shapes (smoke)")
    parser.add_argument("--out", default=str(RESULTS / "matmul.json"))
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--matmul_reps", type=int, default=30)
    parser.add_argument("--dit_batch", type=int, default=8)
    parser.add_argument(
        "--rate_only", action="store_true", help="print the rate (a) and stop; writes nothing"
    )
    args = parser.parse_args(argv)
    n, reps = (min(args.matmul_n, 256), 3) if args.quick else (args.matmul_n, args.matmul_reps)
    if args.rate_only:
        rate = matmul_rate(n, reps)
        print(
            f"float32 {n}^3 matmul: median {rate['gflops_median']:.1f} GFLOP/s "
            f"(best {rate['gflops_best']:.1f}) on {jax.devices()[0].device_kind}"
        )
        return {"matmul": rate}

    from shortcut_jax import atomic_files

    results: dict[str, Any] = {"meta": timing.run_meta(args.quick)}
    results["matmul"] = matmul_rate(n, reps)
    print(f"matmul {n}^3 float32: median {results['matmul']['gflops_median']:.1f} GFLOP/s")
    configs = {
        "mnist": workloads.mnist_config(args.quick),
        "dit_b2_small_batch": workloads.imagenet_config(
            "DiT-B/2", args.dit_batch, dtype="float32", quick=args.quick
        ),
    }
    results["matmul_shapes"] = {
        name: matmul_shape_rates(config, args.quick) for name, config in configs.items()
    }
    for name, rates in results["matmul_shapes"].items():
        for rate in rates:
            print(f"  {name}: {rate['name']}: {rate['gflops_median']:.1f} GFLOP/s", flush=True)
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    atomic_files.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
