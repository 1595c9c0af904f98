"""Benchmark: SD-VAE encode and decode throughput on this machine, beside its matmul rate.

    python benchmarks/vae_benchmark.py           # -> benchmarks/results/vae.json
    python benchmarks/vae_benchmark.py --quick   # tiny VAE, 32x32, small matmul (smoke)

In one process, for the full SD VAE structure (sd-vae-ft-mse / SDXL VAE: 83.7 M parameters) with
random weights (`vae.random_vae`; the speed does not depend on the values), float32, at
256x256 images (32x32x4 latents), batch 4:
  (a) the float32 2048^3 `jnp.dot` rate of this machine (flops_benchmark.matmul_rate), measured
      before and after the VAE timings, since the machine is shared and drifts;
  (b) for encode (posterior mean, scaled) and decode (scaled latents -> images): compile time,
      XLA cost-analysis FLOPs of the compiled program (per call and per image), an analytic count
      of the convolution and attention FLOPs as a cross-check, the program's temp memory, and
      the median / best seconds of a few calls after one warm-up call -> images/s and achieved
      GFLOP/s as a fraction of the matmul rate.
The persistent compilation cache is off (compile times are results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import flops_benchmark as fb  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from shortcut_jax.models import vae as vae_lib  # noqa: E402

QUICK_ARCH = vae_lib.VaeArch(block_out_channels=(32, 64), layers_per_block=1)


def analytic_flops(arch: vae_lib.VaeArch, size: int) -> dict[str, int]:
    """Convolution, projection and attention FLOPs (2 per multiply-add) of one image.

    Each conv costs 2 * kh * kw * C_in * C_out per output position; the output sizes follow from
    where the conv sits (encoder block i at size / 2^i, its downsample at size / 2^(i+1), the mid
    blocks at size / f, decoder block i at (size / f) * 2^i, its upsample conv at twice that).
    Attention adds 4 N^2 C for q k^T and weights v (N = positions at the mid block). GroupNorm,
    SiLU, softmax and additions are not counted. XLA's cost analysis skips the taps that fall on
    zero padding, so it is lower by about (1 - 2 / (3 side))^2 per 3x3 conv: 4 % at 32x32, under
    1 % at 256x256.

    Returns:
      {'encode': int, 'decode': int}.
    """
    factor = arch.downsample_factor
    latent = size // factor
    totals = {"encode": 0, "decode": 0}
    for path, shape in vae_lib.param_shapes(arch).items():
        if not path.endswith("/kernel"):
            continue
        parts = path.split("/")
        part = "encode" if parts[0] in ("encoder", "quant_conv") else "decode"
        if parts[0] in ("quant_conv", "post_quant_conv") or "mid_block" in parts:
            side = latent
        elif parts[0] == "encoder" and parts[1].startswith("down_blocks_"):
            block = int(parts[1].rsplit("_", 1)[1])
            side = size // 2 ** (block + (parts[2] == "downsample"))
        elif parts[0] == "decoder" and parts[1].startswith("up_blocks_"):
            block = int(parts[1].rsplit("_", 1)[1])
            side = latent * 2 ** (block + (parts[2] == "upsample"))
        elif parts[0] == "encoder":  # conv_in at full size; conv_out at the latent size
            side = size if parts[1] == "conv_in" else latent
        else:  # decoder conv_in at the latent size; conv_out at full size
            side = latent if parts[1] == "conv_in" else size
        totals[part] += 2 * int(np.prod(shape)) * side * side
    positions = latent * latent
    attention = 4 * positions * positions * arch.block_out_channels[-1]
    totals["encode"] += attention
    totals["decode"] += attention
    return totals


def benchmark_part(
    fn: Any, params: Any, inputs: np.ndarray, reps: int, analytic: int
) -> dict[str, Any]:
    """Compiles fn(params, inputs), reads its cost analysis and times `reps` calls."""
    jitted = jax.jit(fn)
    inputs = jax.device_put(inputs)
    _, compiled, lower_seconds, compile_seconds = fb.lower_and_compile(jitted, params, inputs)
    batch = inputs.shape[0]
    flops = fb.cost(compiled)["flops"]
    times = fb.time_calls(lambda: compiled(params, inputs), reps, warmup=1)
    summary = fb.summarize_times(times)
    return {
        "batch": batch,
        "input_shape": list(inputs.shape),
        "lower_seconds": lower_seconds,
        "compile_seconds": compile_seconds,
        "cost_analysis_flops_per_call": flops,
        "flops_per_image": flops / batch,
        "analytic_flops_per_image": analytic,
        "cost_analysis_over_analytic": flops / batch / analytic if analytic else None,
        "memory": fb.memory(compiled),
        **summary,
        "images_per_second_median": batch / summary["median_seconds"],
        "images_per_second_best": batch / summary["best_seconds"],
        "achieved_gflops_median": flops / summary["median_seconds"] / 1e9,
        "times_seconds": times,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny VAE at 32x32 (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "vae.json"))
    parser.add_argument("--size", type=int, default=256, help="image side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="timed calls after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--matmul_reps", type=int, default=20)
    args = parser.parse_args(argv)
    arch = vae_lib.SD_ARCH
    if args.quick:
        arch, args.size, args.batch, args.reps = QUICK_ARCH, 32, 2, 2
        args.matmul_n, args.matmul_reps = 256, 3
    else:  # compile times are results: never read them from a persistent cache
        jax.config.update("jax_enable_compilation_cache", False)

    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    results: dict[str, Any] = {
        "meta": {
            **fb.run_meta(args.quick),
            "notes": (
                "Random weights, full SD VAE structure unless quick. FLOPs are XLA cost-analysis "
                "FLOPs of the compiled program (a multiply-add is 2); the analytic count covers "
                "convolutions, projections and the attention matmuls only. Times are per call "
                "after one warm-up call; encode returns posterior means (scaled), decode takes "
                "scaled latents. The machine is shared with other processes: compare the VAE "
                "rate with the matmul rate measured in the same run (before and after)."
            ),
        },
        "arch": {
            **dataclasses.asdict(arch),
            "num_params": sum(int(np.prod(s)) for s in vae_lib.param_shapes(arch).values()),
        },
        "settings": {
            "image_size": args.size,
            "batch": args.batch,
            "dtype": args.dtype,
            "timed_calls": args.reps,
        },
    }
    results["matmul_before"] = fb.matmul_rate(args.matmul_n, args.matmul_reps)
    say(f"matmul {args.matmul_n}^3 f32: {results['matmul_before']['gflops_median']:.1f} GFLOP/s")

    vae = dataclasses.replace(vae_lib.random_vae(arch, seed=0), dtype=args.dtype)
    params = jax.device_put(vae.params)
    scale = vae.scaling_factor
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (args.batch, args.size, args.size, arch.in_channels))
    images = images.astype(np.float32)
    latent_side = args.size // arch.downsample_factor
    latents = rng.normal(size=(args.batch, latent_side, latent_side, arch.latent_channels))
    latents = latents.astype(np.float32)
    analytic = analytic_flops(arch, args.size)

    def encode(p, x):
        return vae_lib.encode(arch, p, x, scaling_factor=scale, dtype=args.dtype)

    def decode(p, z):
        return vae_lib.decode(arch, p, z, scaling_factor=scale, dtype=args.dtype)

    for name, fn, inputs in (("encode", encode, images), ("decode", decode, latents)):
        part = benchmark_part(fn, params, inputs, args.reps, analytic[name])
        results[name] = part
        say(
            f"{name}: {part['flops_per_image'] / 1e9:.1f} GFLOP/image (analytic "
            f"{part['analytic_flops_per_image'] / 1e9:.1f}), compile "
            f"{part['compile_seconds']:.1f} s, median {part['median_seconds']:.2f} s per batch "
            f"of {part['batch']} -> {part['images_per_second_median']:.2f} images/s, "
            f"{part['achieved_gflops_median']:.1f} GFLOP/s"
        )

    results["matmul_after"] = fb.matmul_rate(args.matmul_n, args.matmul_reps)
    say(f"matmul again: {results['matmul_after']['gflops_median']:.1f} GFLOP/s")
    matmul = 0.5 * (
        results["matmul_before"]["gflops_median"] + results["matmul_after"]["gflops_median"]
    )
    for name in ("encode", "decode"):
        results[name]["fraction_of_matmul_rate"] = results[name]["achieved_gflops_median"] / matmul
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    results["meta"]["total_seconds"] = time.perf_counter() - started
    results["summary"] = [
        f"{name}: {results[name]['images_per_second_median']:.2f} images/s "
        f"({args.size}x{args.size}, batch {args.batch}, {args.dtype}), "
        f"{results[name]['flops_per_image'] / 1e9:.1f} GFLOP/image, "
        f"{results[name]['achieved_gflops_median']:.0f} GFLOP/s = "
        f"{100 * results[name]['fraction_of_matmul_rate']:.0f}% of the {matmul:.0f} GFLOP/s "
        "matmul rate"
        for name in ("encode", "decode")
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    print("\n".join(results["summary"]))
    say(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
