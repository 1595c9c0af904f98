"""Benchmark: shortcut_jax's glibc malloc tuning against glibc's defaults, in fresh processes.

    python benchmarks/allocator_benchmark.py            # -> benchmarks/results/allocator.json
    python benchmarks/allocator_benchmark.py --quick    # tiny sizes (smoke test)

    python benchmarks/allocator_benchmark.py --settings all --workloads train_step,dit_train_step

`import shortcut_jax` applies `shortcut_jax/allocator.py` (one arena, no mmap, no trimming);
SHORTCUT_JAX_MALLOC_TUNING=0 keeps glibc's defaults. XLA:CPU allocates each step's temporaries
afresh, and with glibc's defaults the kernel maps and zeroes them again at every step. For each
workload the settings run in fresh processes, interleaved (A B A B ...), and each run reports
the median seconds per call and the minor page faults and system CPU seconds per call
(getrusage). The workloads are what users run: the MNIST default's train step
(experiments/mnist.py, batch 32, random data; built by `compiled_step.build` as the train loop
builds it), sampling it at 8 steps (batch 100, guidance on), FID Inception features (random
weights, 32 MNIST-sized images resized to 299 inside the network) and, on request, a DiT-B/2
train step at batch 8 (float32, 32x32x4 random latents). `--settings all` adds transparent huge
pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) alone and with the tuning. The matmul rate is
measured before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import timing  # noqa: E402

TUNING_ENV = "SHORTCUT_JAX_MALLOC_TUNING"
WORKLOADS = ("train_step", "sample", "inception", "dit_train_step")
DEFAULT_WORKLOADS = ("train_step", "sample", "inception")
REPS = {"train_step": 40, "sample": 5, "inception": 5, "dit_train_step": 3}  # timed calls
HUGE_PAGES = "glibc.malloc.hugetlb=1"
# setting -> the environment its worker starts with (other GLIBC_TUNABLES are removed).
SETTINGS: dict[str, dict[str, str]] = {
    "glibc defaults": {TUNING_ENV: "0"},
    "shortcut_jax tuning": {TUNING_ENV: "1"},
    "huge pages": {TUNING_ENV: "0", "GLIBC_TUNABLES": HUGE_PAGES},
    "shortcut_jax tuning + huge pages": {TUNING_ENV: "1", "GLIBC_TUNABLES": HUGE_PAGES},
}
DEFAULT_SETTINGS = ("glibc defaults", "shortcut_jax tuning")


def worker(workload: str, quick: bool) -> dict[str, Any]:
    """Runs one workload in this process and returns its per-call measurements."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import workloads

    from shortcut_jax import allocator, sampling, sharding, steps
    from shortcut_jax.evaluators import features, inception

    reps = 3 if quick else REPS[workload]
    if workload == "dit_train_step":
        config = workloads.imagenet_config("DiT-B/2", 2 if quick else 8, "float32", quick)
    else:
        config = workloads.mnist_config(quick)
    if workload in ("train_step", "sample", "dit_train_step"):
        mesh = workloads.single_device_mesh(config)
        state, step, model, *_ = workloads.build_state_and_step(config, mesh)
    if workload in ("train_step", "dit_train_step"):
        batch = sharding.global_batch(mesh, workloads.random_batch(config, config.batch_size))
        compiled = step.with_program(step.lower(state, batch).compile())
        holder = {"state": state, "sums": compiled.zero_sums(state, batch)}

        def call() -> Any:
            holder["state"], holder["sums"], loss = compiled(holder["state"], holder["sums"], batch)
            return loss

        warmup = 5 if workload == "train_step" else 1
        result = timing.timed_with_usage(call, reps, warmup)
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
        result = timing.timed_with_usage(lambda: sampler(state.ema_params, noise, labels), reps, 2)
    else:
        rng = np.random.default_rng(0)
        params = workloads.random_inception_params()
        net = features.FeatureNet("inception_random", 2048, params, inception.inception_features)
        images = rng.uniform(-1, 1, (8 if quick else 32, 28, 28, 1)).astype(np.float32)
        result = timing.timed_with_usage(
            lambda: features.compute_features(net, images, batch_size=len(images)), reps, 1
        )
        result["images_per_call"] = len(images)
    result["malloc_tuned"] = allocator.is_tuned()
    return result


def run_worker(workload: str, setting: str, quick: bool) -> dict[str, Any]:
    """`worker` in a fresh process started with the environment of `setting`."""
    env = {
        key: value for key, value in os.environ.items() if key not in (TUNING_ENV, "GLIBC_TUNABLES")
    }
    env.update(SETTINGS[setting])
    args = ["--worker", workload] + (["--quick"] if quick else [])
    result = timing.run_fresh(__file__, args, env, what=f"{workload} / {setting}")
    if result["malloc_tuned"] != (SETTINGS[setting][TUNING_ENV] == "1"):
        raise RuntimeError(f"{workload} / {setting}: the worker ran with the other setting")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the interleaved A/B and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help=str(WORKLOADS))
    parser.add_argument(
        "--settings",
        default=",".join(DEFAULT_SETTINGS),
        help=f"comma-separated subset of {list(SETTINGS)}, or 'all'",
    )
    parser.add_argument("--out", default=str(RESULTS / "allocator.json"))
    parser.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
        return {}
    settings = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or "glibc defaults" not in settings:
        parser.error(
            f"--settings={args.settings}: give 'all' or names of {list(SETTINGS)} "
            "including 'glibc defaults' (the baseline)"
        )
    settings.sort(key=list(SETTINGS).index)
    workloads = args.workloads.split(",")
    if set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads={args.workloads}: choose from {list(WORKLOADS)}")

    from matmul_benchmark import matmul_rate

    from shortcut_jax import atomic_files

    matmul_n, matmul_reps = (256, 5) if args.quick else (2048, 20)
    results: dict[str, Any] = {
        "meta": timing.run_meta(args.quick),
        "matmul_gflops_before": matmul_rate(matmul_n, matmul_reps)["gflops_median"],
        "workloads": {},
    }
    for workload in workloads:
        runs: dict[str, list[dict[str, Any]]] = {setting: [] for setting in settings}
        for _ in range(args.rounds):
            for setting in settings:
                runs[setting].append(run_worker(workload, setting, args.quick))
        results["workloads"][workload] = summarize(runs)
        print(workload, json.dumps(results["workloads"][workload]["speedup_per_round"]), flush=True)
    results["matmul_gflops_after"] = matmul_rate(matmul_n, matmul_reps)["gflops_median"]
    atomic_files.write_json(args.out, results)
    return results


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per setting: medians over rounds and the speedup over glibc's defaults (per round too).

    The top-level speedup_* keys compare 'shortcut_jax tuning' with the defaults when it ran.
    """
    base_runs = runs["glibc defaults"]
    base = statistics.median(run["median_seconds"] for run in base_runs)
    summary: dict[str, Any] = {}
    for setting, setting_runs in runs.items():
        median = statistics.median(run["median_seconds"] for run in setting_runs)
        summary[setting] = {
            "median_seconds": median,
            "speedup_vs_glibc_defaults": base / median,
            "speedup_vs_glibc_defaults_per_round": [
                a["median_seconds"] / b["median_seconds"]
                for a, b in zip(base_runs, setting_runs, strict=True)
            ],
            "minor_page_faults_per_call": statistics.median(
                run["minor_page_faults"] for run in setting_runs
            ),
            "system_cpu_seconds_per_call": statistics.median(
                run["system_cpu_seconds"] for run in setting_runs
            ),
            "runs": setting_runs,
        }
    tuned = summary.get("shortcut_jax tuning")
    if tuned is not None:
        summary["speedup_median_of_medians"] = tuned["speedup_vs_glibc_defaults"]
        summary["speedup_per_round"] = tuned["speedup_vs_glibc_defaults_per_round"]
    return summary


if __name__ == "__main__":
    main()
