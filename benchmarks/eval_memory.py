"""Benchmark: memory of a latent FID evaluation, scaled down to a CPU, against the sample count.

    python benchmarks/eval_memory.py [--quick] [--nums 1000,4000] [--out ...]

One fresh process per measurement (peak RSS is per process). Each runs the evaluation's fused
program (`on_device.sample_statistics`: sampler -> VAE decode -> 8-bit quantize -> features)
over a small DiT on 8x8x4 latents, a random-weight VAE of the Stable Diffusion block structure
(factor 8, narrow widths) decoding to 64x64x3, and a 2048-d feature net (a fixed random
projection of pooled pixels: Inception's feature width, a fraction of its FLOPs), with the
chunk size and `config.vae.decode_batch_size` the paper configs use per device. Recorded:

- `host`: peak RSS (VmHWM, reset after the first chunk compiled, via /proc/self/clear_refs)
  above the RSS before sampling, for each --nums, both for the streamed statistics (what
  `evaluate` does now) and for keeping every feature (`sample_features`, the old path);
  bytes per sample = the slope between the smallest and largest count.
- `device`: per-device bytes (XLA memory analysis: arguments, outputs, temporaries) of the chunk
  program decoding the whole chunk at once against decoding in passes of decode_batch_size.
- `matmul`: this machine's float32 2048^3 matmul rate (before and after), to place the timings.
"""

from __future__ import annotations

import argparse
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
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matmul_benchmark import matmul_rate  # noqa: E402
from timing import memory, run_fresh, run_meta  # noqa: E402

from shortcut_jax import configs, latent_space, models, steps  # noqa: E402
from shortcut_jax.evaluators import features, on_device  # noqa: E402
from shortcut_jax.models import vae as vae_lib  # noqa: E402

FEATURE_DIM = 2048
LATENT_SHAPE = (8, 8, 4)
VAE_ARCH = vae_lib.VaeArch(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
)


def _proc_status_kib(field: str) -> int:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def model_config() -> Any:
    """A small DiT on 8x8x4 latents (the model side of a latent run, one step sampling)."""
    config = configs.base_config()
    config.data.image_size, config.data.channels = LATENT_SHAPE[0], LATENT_SHAPE[2]
    config.data.num_classes = 0
    config.model.hidden_size, config.model.depth, config.model.num_heads = 64, 2, 2
    config.model.patch_size = 2
    config.denoise_timesteps = 8
    return config


def _projection_features(params: Any, images: jax.Array) -> jax.Array:
    """(B, 2048) features: pooled 16x16 pixels (and their squares) times a fixed projection."""
    pooled = jax.image.resize(images, (images.shape[0], 16, 16, images.shape[-1]), "linear")
    flat = pooled.reshape(images.shape[0], -1)
    return jnp.tanh(jnp.concatenate([flat, flat**2], axis=1) @ params)


def setup() -> dict[str, Any]:
    """Model, parameters, decoder and feature net of the measured evaluation."""
    config = model_config()
    model = models.get_model(config)
    params = model.init(jax.random.PRNGKey(0), *models.example_inputs(config, 1))["params"]
    projection = jax.random.normal(jax.random.PRNGKey(1), (2 * 16 * 16 * 3, FEATURE_DIM)) * 0.05
    net = features.FeatureNet("projection_2048", FEATURE_DIM, projection, _projection_features, 64)
    vae = vae_lib.random_vae(VAE_ARCH, seed=0)
    return {
        "config": config,
        "apply_fn": steps.make_apply_fn(model),
        "params": params,
        "net": net,
        "decoder": latent_space.PixelDecoder(vae),
    }


def _settings(run: dict[str, Any], batch: int, decode_batch_size: int) -> dict[str, Any]:
    return {
        "seed": 0,
        "shape": LATENT_SHAPE,
        "num_steps": 1,
        "denoise_timesteps": run["config"].denoise_timesteps,
        "decoder": run["decoder"],
        "batch_size": batch,
        "decode_batch_size": decode_batch_size,
    }


def worker_host(num: int, mode: str, batch: int, decode_batch_size: int) -> dict[str, Any]:
    """Peak RSS of one evaluation of `num` samples: streamed statistics or all features."""
    run = setup()
    settings = _settings(run, batch, decode_batch_size)
    args = (run["apply_fn"], run["params"], [run["net"]])
    on_device.sample_statistics(*args, num=batch, **settings)  # compile, then measure
    baseline = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    if mode == "streamed":
        result = on_device.sample_statistics(*args, num=num, keep_features=0, **settings)
        assert result.statistics[0].count == num
    else:
        feats, _ = on_device.sample_features(*args, num=num, **settings)
        assert feats[0].shape == (num, FEATURE_DIM)
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM")
    return {
        "num": num,
        "mode": mode,
        "peak_reset_after_compile": reset,
        "rss_before_mib": baseline / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_above_start_mib": (peak - baseline) / 1024,
        "seconds": seconds,
        "images_per_second": num / seconds,
    }


def worker_device(batch: int, decode_batch_size: int) -> dict[str, Any]:
    """Per-device bytes of the chunk program, decoding all at once vs in passes."""
    run = setup()
    decoder_fn, decoder_params = run["decoder"].device_fn()
    result = {}
    for label, size in (("whole_chunk", 0), (f"passes_of_{decode_batch_size}", decode_batch_size)):
        program = on_device.chunk_program(
            run["apply_fn"],
            run["params"],
            (run["net"],),
            sampler_settings={
                "num_steps": 1,
                "denoise_timesteps": run["config"].denoise_timesteps,
                "cfg_scale": 1.0,
                "num_classes": 0,
                "objective": None,
            },
            shape=LATENT_SHAPE,
            chunk=batch,
            pixels=decoder_fn,
            mesh=None,
            decode_batch_size=size,
        )
        compiled = program.lower(
            run["params"],
            decoder_params,
            (run["net"].params,),
            jax.random.PRNGKey(0),
            jnp.int32(0),
            jnp.int32(batch),
        ).compile()
        result[label] = memory(compiled)
    return {"chunk": batch, "decode_batch_size": decode_batch_size, "programs": result}


def _slope(rows: list[dict[str, Any]]) -> float:
    """Bytes of peak RSS per extra sample between the smallest and the largest count."""
    low, high = rows[0], rows[-1]
    return (high["peak_rss_mib"] - low["peak_rss_mib"]) * 2**20 / (high["num"] - low["num"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs every measurement in a fresh process and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--nums", default="1000,4000", help="sample counts to compare")
    parser.add_argument("--batch", type=int, default=256, help="examples per chunk")
    parser.add_argument("--decode_batch_size", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "eval_memory.json"))
    parser.add_argument("--worker", choices=("host", "device"), help=argparse.SUPPRESS)
    parser.add_argument("--num", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("streamed", "all_features"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "host":
        print(json_line(worker_host(args.num, args.mode, args.batch, args.decode_batch_size)))
        return {}
    if args.worker == "device":
        print(json_line(worker_device(args.batch, args.decode_batch_size)))
        return {}

    from shortcut_jax import atomic_files

    nums = [64, 256] if args.quick else sorted(int(n) for n in args.nums.split(","))
    batch = 32 if args.quick else args.batch
    matmul_n, matmul_reps = (256, 3) if args.quick else (2048, 20)
    results: dict[str, Any] = {"meta": run_meta(args.quick)}
    results["matmul"] = matmul_rate(matmul_n, matmul_reps)
    print(f"matmul {matmul_n}^3 float32: {results['matmul']['gflops_median']:.1f} GFLOP/s")
    common = ["--batch", str(batch), "--decode_batch_size", str(args.decode_batch_size)]
    script = str(Path(__file__).resolve())
    results["setup"] = {
        "latents": list(LATENT_SHAPE),
        "pixels": [64, 64, 3],
        "vae_block_out_channels": list(VAE_ARCH.block_out_channels),
        "feature_dim": FEATURE_DIM,
        "chunk": batch,
        "decode_batch_size": args.decode_batch_size,
        "sampling_steps": 1,
    }
    results["device"] = run_fresh(script, ["--worker", "device", *common], what="device")
    host: dict[str, list[dict[str, Any]]] = {}
    for mode in ("streamed", "all_features"):
        host[mode] = []
        for num in nums:
            row = run_fresh(
                script,
                ["--worker", "host", "--num", str(num), "--mode", mode, *common],
                what=f"{mode} {num}",
            )
            print(
                f"{mode:12s} num={num:6d}: peak RSS {row['peak_rss_mib']:.0f} MiB "
                f"({row['peak_above_start_mib']:+.1f} MiB), {row['images_per_second']:.0f} img/s"
            )
            host[mode].append(row)
    results["host"] = host
    results["peak_rss_bytes_per_sample"] = {mode: _slope(rows) for mode, rows in host.items()}
    results["matmul_after"] = matmul_rate(matmul_n, matmul_reps)
    atomic_files.write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


def json_line(value: Any) -> str:
    """`value` as one line of JSON (numpy scalars as numbers)."""
    return json.dumps(value, default=lambda v: np.asarray(v).tolist())


if __name__ == "__main__":
    main()
