"""Benchmark: shortcut_jax's glibc malloc tuning against glibc's defaults, in fresh processes.

    python benchmarks/allocator_benchmark.py            # -> benchmarks/results/allocator.json
    python benchmarks/allocator_benchmark.py --quick    # tiny sizes (smoke test)

`import shortcut_jax` applies `shortcut_jax/allocator.py` (one arena, no mmap, no trimming);
SHORTCUT_JAX_MALLOC_TUNING=0 keeps glibc's defaults. For each workload the two settings run in
fresh processes, interleaved (A B A B ...), and each run reports the median seconds per call and
the minor page faults and system CPU seconds per call (getrusage). The workloads are what users
run: the MNIST default's train step (experiments/mnist.py, batch 32, random data), sampling it at
8 steps (batch 100, guidance on), and FID Inception features (random weights, 32 MNIST-sized
images resized to 299 inside the network). The matmul rate is measured before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TUNING_ENV = "SHORTCUT_JAX_MALLOC_TUNING"
WORKLOADS = ("train_step", "sample", "inception")
SETTINGS = {"glibc defaults": "0", "shortcut_jax tuning": "1"}


def _timed_calls(call: Any, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds, minor page faults and CPU seconds per call of `call()` (blocking)."""
    import resource

    for _ in range(warmup):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "median_seconds": statistics.median(times),
        "minor_page_faults": (after.ru_minflt - before.ru_minflt) / reps,
        "system_cpu_seconds": (after.ru_stime - before.ru_stime) / reps,
        "user_cpu_seconds": (after.ru_utime - before.ru_utime) / reps,
    }


def worker(workload: str, quick: bool) -> dict[str, Any]:
    """Runs one workload in this process and returns its per-call measurements."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flops_benchmark as fb
    import jax
    import jax.numpy as jnp
    import numpy as np

    from shortcut_jax import allocator, sampling, sharding, steps
    from shortcut_jax.evaluators import features, inception

    reps = 3 if quick else {"train_step": 40, "sample": 5, "inception": 5}[workload]
    config = fb.mnist_config(quick)
    if workload in ("train_step", "sample"):
        mesh = fb.single_device_mesh(config)
        state, step, model, *_ = fb.build_state_and_step(config, mesh)
    if workload == "train_step":
        batch = sharding.global_batch(mesh, fb.random_batch(config, config.batch_size))
        compiled = step.lower(state, batch).compile()
        holder = {"state": state}

        def call() -> None:
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)

        result = _timed_calls(call, reps, warmup=5)
    elif workload == "sample":
        num = 16 if quick else 100
        sampler = sampling.make_sampler(
            steps.make_apply_fn(model),
            num_steps=8,
            denoise_timesteps=config.denoise_timesteps,
            cfg_scale=1.5,
            num_classes=config.data.num_classes,
        )
        shape = (config.data.image_size, config.data.image_size, config.data.channels)
        noise = sampling.example_noise(jax.random.PRNGKey(0), num, shape)
        labels = jnp.asarray(sampling.default_labels(num, config.data.num_classes))
        result = _timed_calls(
            lambda: jax.block_until_ready(sampler(state.ema_params, noise, labels)), reps, 2
        )
    else:
        rng = np.random.default_rng(0)
        params = jax.tree.map(
            jnp.asarray,
            _unflatten(
                {
                    name: _random_inception_param(rng, name, shape)
                    for name, shape in inception.param_shapes().items()
                }
            ),
        )
        net = features.FeatureNet("inception_random", 2048, params, inception.inception_features)
        images = rng.uniform(-1, 1, (8 if quick else 32, 28, 28, 1)).astype(np.float32)
        result = _timed_calls(
            lambda: features.compute_features(net, images, batch_size=len(images)), reps, 1
        )
        result["images_per_call"] = len(images)
    result["malloc_tuned"] = allocator.is_tuned()
    return result


def _random_inception_param(rng: Any, name: str, shape: tuple[int, ...]) -> Any:
    """He-scaled kernels, unit batch-norm variances, zero means and offsets: finite features."""
    import numpy as np

    if name.endswith("/kernel"):
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return np.full(shape, 1.0 if name.endswith("/var") else 0.0, np.float32)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat, sep="/")


def run_worker(workload: str, setting: str, quick: bool) -> dict[str, Any]:
    """`worker` in a fresh process with SHORTCUT_JAX_MALLOC_TUNING set for `setting`."""
    env = dict(os.environ, **{TUNING_ENV: SETTINGS[setting]})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    command = [sys.executable, __file__, "--worker", workload] + (["--quick"] if quick else [])
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if process.returncode:
        raise RuntimeError(f"{workload} / {setting} failed:\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    if result["malloc_tuned"] != (SETTINGS[setting] == "1"):
        raise RuntimeError(f"{workload} / {setting}: the worker ran with the other setting")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the interleaved A/B and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--out", default=str(RESULTS / "allocator.json"))
    parser.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
        return {}

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flops_benchmark as fb

    from shortcut_jax import atomic_files

    matmul_n, matmul_reps = (256, 5) if args.quick else (2048, 20)
    results: dict[str, Any] = {
        "meta": fb.run_meta(args.quick),
        "matmul_gflops_before": fb.matmul_rate(matmul_n, matmul_reps)["gflops_median"],
        "workloads": {},
    }
    for workload in args.workloads.split(","):
        runs: dict[str, list[dict[str, Any]]] = {setting: [] for setting in SETTINGS}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                runs[setting].append(run_worker(workload, setting, args.quick))
        base = statistics.median(run["median_seconds"] for run in runs["glibc defaults"])
        tuned = statistics.median(run["median_seconds"] for run in runs["shortcut_jax tuning"])
        ratios = [
            a["median_seconds"] / b["median_seconds"]
            for a, b in zip(runs["glibc defaults"], runs["shortcut_jax tuning"], strict=True)
        ]
        results["workloads"][workload] = {
            "speedup_median_of_medians": base / tuned,
            "speedup_per_round": ratios,
            **{
                setting: {
                    "median_seconds": statistics.median(r["median_seconds"] for r in rs),
                    "minor_page_faults_per_call": statistics.median(
                        r["minor_page_faults"] for r in rs
                    ),
                    "system_cpu_seconds_per_call": statistics.median(
                        r["system_cpu_seconds"] for r in rs
                    ),
                    "runs": rs,
                }
                for setting, rs in runs.items()
            },
        }
        print(workload, json.dumps(results["workloads"][workload]["speedup_per_round"]), flush=True)
    results["matmul_gflops_after"] = fb.matmul_rate(matmul_n, matmul_reps)["gflops_median"]
    atomic_files.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
