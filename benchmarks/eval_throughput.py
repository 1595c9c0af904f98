"""Benchmark: the periodic evaluation's parts against this machine's float32 matmul rate.

    python benchmarks/eval_throughput.py            # -> benchmarks/results/eval_throughput.json
    python benchmarks/eval_throughput.py --quick    # tiny sizes (smoke test)

In one process: the float32 2048^3 matmul rate (`matmul_benchmark.matmul_rate`), then, each
jitted as the evaluation runs it (8-bit quantization, then the network), MNIST-shaped inputs:

- `inception`: the FID InceptionV3 (the real converted weights when `--inception` names them or
  they are at the default path, random He-scaled weights otherwise: the same FLOPs and time) on
  28x28x1 digits resized to 299x299 inside the network; its FLOPs per image (XLA cost analysis),
  images/s and the fraction of the matmul rate, against `INCEPTION_TARGET`;
- `fd_mnist`: the FD-MNIST classifier's features (random parameters: same cost);
- `sampling`: the MNIST default (experiments/mnist.py, random parameters) sampled with guidance at
  each step count of its periodic evaluation (`config.eval_steps`).

From these, `periodic_eval` gives the share of one periodic evaluation of the MNIST default
(`config.eval_num` samples at every `config.eval_steps` budget, FD-MNIST features of each) spent
on the features: FD-MNIST is not the bottleneck when that share is small.
"""

from __future__ import annotations

import argparse
import os
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import workloads  # noqa: E402
from matmul_benchmark import matmul_rate  # noqa: E402
from timing import cost, run_meta, summarize_times, time_calls  # noqa: E402

from shortcut_jax import sampling, steps  # noqa: E402
from shortcut_jax.evaluators import fd_mnist, features, inception  # noqa: E402

# Inception features aim at this fraction of the matmul rate (issue 12).
INCEPTION_TARGET = 0.35


def inception_params(path: str | None) -> tuple[Any, str]:
    """The converted FID weights when available, else random ones; and which it was."""
    path = path or inception.default_weights_path()
    if os.path.isfile(path):
        return inception.load_params(path), f"converted FID weights ({path})"
    return workloads.random_inception_params(), "random He-scaled weights (same FLOPs and time)"


def time_feature_net(
    apply: features.FeatureFn, params: Any, batch: int, reps: int, matmul_gflops: float
) -> dict[str, Any]:
    """Images/s, FLOPs per image and fraction of the matmul rate of quantize + `apply`."""
    images = jnp.asarray(
        np.random.default_rng(0).uniform(-1, 1, (batch, 28, 28, 1)).astype(np.float32)
    )
    jitted = jax.jit(lambda p, x: apply(p, features.quantize(x)))
    compiled = jitted.lower(params, images).compile()
    flops = cost(compiled)["flops"]
    seconds = summarize_times(time_calls(lambda: compiled(params, images), reps, warmup=1))
    median = seconds["median_seconds"]
    achieved = flops / median / 1e9
    return {
        "batch": batch,
        "flops_per_image": flops / batch,
        "seconds_per_call": seconds,
        "images_per_second": batch / median,
        "achieved_gflops": achieved,
        "fraction_of_matmul_rate": achieved / matmul_gflops,
    }


def time_sampling(config: Any, num: int, reps: int) -> dict[str, Any]:
    """Images/s of the MNIST default sampled with its guidance at each of `config.eval_steps`."""
    mesh = workloads.single_device_mesh(config)
    state, _, model, *_ = workloads.build_state_and_step(config, mesh)
    apply_fn = steps.make_apply_fn(model)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    noise = sampling.example_noise(jax.random.PRNGKey(0), num, shape)
    labels = jnp.asarray(sampling.default_labels(num, config.data.num_classes))
    result = {}
    for num_steps in config.eval_steps:
        sampler = sampling.make_sampler(
            apply_fn,
            num_steps=int(num_steps),
            denoise_timesteps=config.denoise_timesteps,
            cfg_scale=float(config.sample_cfg_scale),
            num_classes=config.data.num_classes,
        )
        times = time_calls(lambda s=sampler: s(state.ema_params, noise, labels), reps, warmup=1)
        median = summarize_times(times)["median_seconds"]
        result[str(int(num_steps))] = {"batch": num, "images_per_second": num / median}
    return result


def periodic_eval_shares(config: Any, fd: dict[str, Any], sample: dict[str, Any]) -> dict:
    """Seconds of one periodic evaluation of `config`: sampling, FD-MNIST features, their share."""
    num = int(config.eval_num)
    sampling_seconds = sum(num / part["images_per_second"] for part in sample.values())
    feature_seconds = len(sample) * num / fd["images_per_second"]
    return {
        "eval_num": num,
        "eval_steps": [int(s) for s in config.eval_steps],
        "sampling_seconds": sampling_seconds,
        "fd_mnist_feature_seconds": feature_seconds,
        "fd_mnist_share": feature_seconds / (sampling_seconds + feature_seconds),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measures the matmul rate and the evaluation's parts; writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "eval_throughput.json"))
    parser.add_argument("--inception", default=None, help="converted FID weights (.npz)")
    parser.add_argument("--inception_batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    quick = args.quick
    matmul_n, matmul_reps = (256, 3) if quick else (2048, 20)
    inception_batch = 2 if quick else args.inception_batch
    reps = 1 if quick else args.reps

    from shortcut_jax import atomic_files

    results: dict[str, Any] = {"meta": run_meta(quick)}
    results["matmul"] = matmul_rate(matmul_n, matmul_reps)
    matmul = results["matmul"]["gflops_median"]
    print(f"matmul {matmul_n}^3 float32: median {matmul:.1f} GFLOP/s", flush=True)

    params, which = inception_params(args.inception)
    part = time_feature_net(inception.inception_features, params, inception_batch, reps, matmul)
    part.update(weights=which, target_fraction=INCEPTION_TARGET)
    part["meets_target"] = part["fraction_of_matmul_rate"] >= INCEPTION_TARGET
    results["inception"] = part
    print(
        f"inception: {part['flops_per_image'] / 1e9:.2f} GFLOP/image, "
        f"{part['images_per_second']:.1f} images/s = {part['achieved_gflops']:.1f} GFLOP/s = "
        f"{100 * part['fraction_of_matmul_rate']:.1f}% of matmul "
        f"(target {100 * INCEPTION_TARGET:.0f}%)",
        flush=True,
    )

    classifier = fd_mnist.MnistClassifier()
    fd_params = classifier.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    fd_batch = 16 if quick else 256
    results["fd_mnist"] = time_feature_net(
        fd_mnist._apply_features, fd_params, fd_batch, reps, matmul
    )
    print(f"fd_mnist: {results['fd_mnist']['images_per_second']:.0f} images/s", flush=True)

    config = workloads.mnist_config(quick)
    if quick:
        config.eval_steps, config.eval_num = (1, 2), 8
    results["sampling"] = time_sampling(config, 16 if quick else 256, reps)
    results["periodic_eval"] = periodic_eval_shares(
        config, results["fd_mnist"], results["sampling"]
    )
    share = results["periodic_eval"]["fd_mnist_share"]
    print(f"periodic eval of the MNIST default: FD-MNIST features {100 * share:.1f}%", flush=True)
    results["matmul_after"] = matmul_rate(matmul_n, matmul_reps)
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    atomic_files.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
