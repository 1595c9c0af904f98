"""Benchmark: encoding a dataset into VAE latents, and reading latents back for training.

    python benchmarks/latents_benchmark.py            # -> benchmarks/results/latents.json
    python benchmarks/latents_benchmark.py --quick    # tiny VAE, few images (smoke)

In one process it measures
  (a) the machine's float32 2048^3 matmul rate (`flops_benchmark.matmul_rate`), at the start and
      at the end (the machine is shared and drifts);
  (b) the image side of `tools/encode_latents`: reading + ADM-center-cropping a generated folder
      of ImageNet-like JPEGs (500 x 375, smooth random content) to 256 x 256, images/s;
  (c) the encoder: the FULL Stable Diffusion VAE structure (block channels 128-256-512-512, 2
      resnets per block; random weights) on 256 x 256 images, each with its mirror: compile time,
      steady-state images/s of the jitted encoder (`encode_latents.make_moments_fn`) with its
      XLA cost-analysis FLOPs and achieved GFLOP/s, and the end-to-end `encode_dataset` wall
      time (compile, decode, encode, write) on the generated folder;
  (d) `data.latents.LatentSource` at batch 256 on 32 x 32 x 4 latents (4,096 float32 records
      written through `latents.ShardWriter`, see `make_latent_dir`): examples/s through `iterate`
      (background prefetch) with posterior sampling and flips, with posterior means, and through
      synchronous `batch(step)`;
  (e) what a DiT-B/2 and DiT-XL/2 train step consumes per host at the README's pod estimates
      (batch 256, 40 % of peak bf16, FLOPs per step from benchmarks/results/flops.json), against
      (d).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
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

import flops_benchmark  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from shortcut_jax import atomic_files, configs  # noqa: E402
from shortcut_jax.data import latents, preprocess  # noqa: E402
from shortcut_jax.models import vae as vae_lib  # noqa: E402
from shortcut_jax.tools import encode_latents  # noqa: E402

# The README's pod estimate: chips, hosts and peak dense bf16 FLOP/s per chip, at 40 % MFU.
HARDWARE = {
    "v4-32": {"chips": 16, "hosts": 4, "peak_bf16_flops": 275e12},
    "8x H100 SXM": {"chips": 8, "hosts": 1, "peak_bf16_flops": 989e12},
}
MODEL_FLOP_UTILISATION = 0.40
FALLBACK_FLOPS_PER_STEP = {"DiT-B/2": 41.67e12, "DiT-XL/2": 214.13e12}  # README, batch 256


def generate_folder(root: Path, count: int, seed: int = 0) -> None:
    """`count` 500 x 375 JPEGs (quality 90) of smooth random colour fields in one class folder."""
    rng = np.random.default_rng(seed)
    (root / "class0").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 13, (375, 500, 3))
        pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "class0" / f"{index:05d}.jpg", quality=90)


def folder_config(image_dir: Path, vae_path: Path, arch: vae_lib.VaeArch, size: int) -> Any:
    config = configs.base_config()
    config.data.name = "image_folder"
    config.data.image_dir = str(image_dir)
    config.data.image_size = size
    config.data.channels = 3
    config.data.num_classes = 0
    config.vae.path = str(vae_path)
    config.vae.downsample_factor = arch.downsample_factor
    config.vae.latent_channels = arch.latent_channels
    return config


def image_pipeline(config: Any, count: int) -> dict[str, Any]:
    """(b): decode + ADM crop of the whole folder through `indexed_images`, images/s."""
    images = preprocess.indexed_images(config)
    start = time.perf_counter()
    for _ in images.read(0, count):
        pass
    seconds = time.perf_counter() - start
    return {
        "images": count,
        "source_size": [500, 375],
        "image_size": config.data.image_size,
        "threads": preprocess.default_workers(),
        "seconds": seconds,
        "images_per_second": count / seconds,
    }


def encoder_steady_state(vae: vae_lib.Vae, batch: int, size: int, reps: int) -> dict[str, Any]:
    """(c): compile and time the jitted encoder of `batch` images (+ mirrors) of size^2."""
    moments_fn = encode_latents.make_moments_fn(vae, jax.local_devices())
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    jax.block_until_ready(moments_fn(pixels))
    first_call = time.perf_counter() - start
    times = flops_benchmark.time_calls(lambda: moments_fn(pixels), reps, warmup=1)
    median = statistics.median(times)
    # The same program, lowered separately for its cost analysis (one device).
    arch, dtype = vae.arch, vae.dtype

    def both_views(params: Any, images: Any) -> Any:
        x = images.astype(np.float32) / 127.5 - 1.0
        x = jax.numpy.concatenate([x, x[:, :, ::-1]])
        return vae_lib.encode_moments(arch, params, x, dtype)

    lowered = jax.jit(both_views).lower(vae.params, pixels)
    flops = flops_benchmark.cost(lowered)["flops"]  # lowered: no second compile
    return {
        "batch_images": batch,
        "vae_images_per_call": 2 * batch,
        "image_size": size,
        "devices": jax.local_device_count(),
        "first_call_seconds_incl_compile": first_call,
        **flops_benchmark.summarize_times(times),
        "images_per_second": batch / median,
        "flops_per_image_with_mirror": flops / batch,
        "achieved_gflops": flops / median / 1e9,
    }


def encode_end_to_end(config: Any, out: Path, batch: int, shard_size: int) -> dict[str, Any]:
    """(c): encode_dataset wall time on the folder (compile, decode, encode, write)."""
    start = time.perf_counter()
    metadata = encode_latents.encode_dataset(
        config, str(out), batch_size=batch, shard_size=shard_size, progress=False
    )
    seconds = time.perf_counter() - start
    size = sum((out / shard["file"]).stat().st_size for shard in metadata["shards"])
    return {
        "images": metadata["count"],
        "batch_size": batch,
        "shard_size": shard_size,
        "seconds_incl_compile": seconds,
        "images_per_second_incl_compile": metadata["count"] / seconds,
        "bytes_per_example": size / metadata["count"],
        "latent_shape": metadata["latent_shape"],
        "moment_stats": metadata["moment_stats"],
    }


def make_latent_dir(
    out: Path, image_dir: Path, vae_path: Path, arch: vae_lib.VaeArch, count: int
) -> dict[str, Any]:
    """A latent directory of `count` 32 x 32 x 4 examples for (d).

    A real `encode_dataset` run (the generated folder at 64 x 64 through a small VAE) provides the
    metadata; its shards are then replaced by `count` records of synthetic moments written
    through `latents.ShardWriter` (encoding thousands of images on this CPU would take minutes
    and does not change what the reader does).
    """
    config = folder_config(image_dir, vae_path, arch, 64)
    metadata = encode_latents.encode_dataset(
        config, str(out), batch_size=8, shard_size=1024, progress=False
    )
    for shard in metadata["shards"]:
        (out / shard["file"]).unlink()
    shard_size = 1024
    num_shards = -(-count // shard_size)
    rng = np.random.default_rng(0)
    shape = tuple(metadata["latent_shape"])
    shards = []
    for shard in range(num_shards):
        name = latents.shard_name(shard, num_shards)
        writer = latents.ShardWriter(str(out / name))
        start, stop = shard * shard_size, min(count, (shard + 1) * shard_size)
        for index in range(start, stop):
            mean = rng.normal(0, 5, (2, *shape)).astype(np.float32)
            std = rng.uniform(0.01, 0.2, (2, *shape)).astype(np.float32)
            writer.write(latents.encode_record(index, 0, mean[0], std[0], mean[1], std[1]))
        writer.commit()
        shards.append({"file": name, "start": start, "count": stop - start})
    metadata.update(count=count, shard_size=shard_size, shards=shards)
    atomic_files.write_json(out / latents.METADATA_FILE, metadata, indent=1)
    size = sum((out / shard["file"]).stat().st_size for shard in shards)
    return {"count": count, "latent_shape": list(shape), "bytes_per_example": size / count}


def latent_source_rates(latent_dir: Path, batch: int, steps: int) -> dict[str, Any]:
    """(d): examples/s of LatentSource at `batch` in three modes."""
    results = {}
    for name, sample, flip, prefetch in (
        ("iterate_sample_posterior_flip", True, True, True),
        ("iterate_posterior_mean_flip", False, True, True),
        ("batch_sync_sample_posterior_flip", True, True, False),
    ):
        config = configs.base_config()
        config.batch_size = batch
        config.data.latent_dir = str(latent_dir)
        config.data.image_size = 64
        config.data.num_classes = 0
        config.data.random_flip = flip
        config.vae.sample_posterior = sample
        source = latents.LatentSource(config)
        if prefetch:
            iterator = source.iterate(0)
            for _ in range(2):
                next(iterator)
            start = time.perf_counter()
            for _ in range(steps):
                next(iterator)
            seconds = time.perf_counter() - start
            iterator.close()
        else:
            source.batch(0)
            start = time.perf_counter()
            for step in range(steps):
                source.batch(step + 1)
            seconds = time.perf_counter() - start
        results[name] = {
            "batch_size": batch,
            "steps": steps,
            "seconds": seconds,
            "examples_per_second": batch * steps / seconds,
            "worker_threads": source.workers,
        }
    return results


def pod_consumption() -> dict[str, Any]:
    """(e): images/s per host a DiT train step consumes at the README's pod estimates."""
    flops_file = RESULTS / "flops.json"
    flops_per_step = dict(FALLBACK_FLOPS_PER_STEP)
    source = "README fallback"
    if flops_file.exists():
        stored = json.loads(flops_file.read_text()).get("imagenet_batch256", {})
        for preset in flops_per_step:
            if preset in stored:
                flops_per_step[preset] = float(stored[preset]["flops_per_step"])
                source = str(flops_file.relative_to(ROOT))
    rows = {}
    for preset, flops in flops_per_step.items():
        for hardware, spec in HARDWARE.items():
            rate = spec["chips"] * spec["peak_bf16_flops"] * MODEL_FLOP_UTILISATION
            step_seconds = flops / rate
            rows[f"{preset} on {hardware}"] = {
                "flops_per_step": flops,
                "est_step_seconds": step_seconds,
                "global_images_per_second": 256 / step_seconds,
                "hosts": spec["hosts"],
                "images_per_second_per_host": 256 / step_seconds / spec["hosts"],
            }
    return {"flops_source": source, "mfu": MODEL_FLOP_UTILISATION, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small VAE, few images (smoke)")
    parser.add_argument("--out", default=str(RESULTS / "latents.json"))
    parser.add_argument("--images", type=int, default=32, help="images encoded end to end")
    parser.add_argument("--encode_batch", type=int, default=8)
    parser.add_argument("--encode_reps", type=int, default=3)
    parser.add_argument("--source_steps", type=int, default=20)
    parser.add_argument("--records", type=int, default=4096, help="examples in the latent dir")
    args = parser.parse_args(argv)
    quick = args.quick
    if not quick:  # compile times are results: never read them from a persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    size = 64 if quick else 256
    full_arch = vae_lib.SD_ARCH
    if quick:
        full_arch = vae_lib.VaeArch(block_out_channels=(8, 16, 16, 16), norm_num_groups=4)
        args.images, args.encode_batch, args.encode_reps, args.source_steps = 8, 4, 1, 2
        args.records = 512
    small_arch = vae_lib.VaeArch(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    results: dict[str, Any] = {
        "meta": {
            **flops_benchmark.run_meta(quick),
            "notes": (
                "CPU only, on a machine shared with other jobs: numbers are this run's, compare "
                "them as ratios to the matmul rate measured in the same process. Encoder images/s "
                "count source images; each is encoded twice (image and mirror)."
            ),
        }
    }
    matmul_n, matmul_reps = (256, 3) if quick else (2048, 20)
    results["matmul_start"] = flops_benchmark.matmul_rate(matmul_n, matmul_reps)
    say(f"(a) matmul {matmul_n}^3: {results['matmul_start']['gflops_median']:.1f} GFLOP/s")

    work = Path(tempfile.mkdtemp(prefix="latents_benchmark_"))
    try:
        generate_folder(work / "images", args.images)
        full_vae = vae_lib.random_vae(full_arch, seed=0)
        vae_lib.save_vae(work / "sd_vae.npz", full_vae)
        config = folder_config(work / "images", work / "sd_vae.npz", full_arch, size)
        results["image_pipeline"] = image_pipeline(config, args.images)
        say(f"(b) decode + crop: {results['image_pipeline']['images_per_second']:.1f} images/s")

        results["encoder"] = {
            "arch": {**dataclasses.asdict(full_arch), "params": full_vae.num_params},
            **encoder_steady_state(full_vae, args.encode_batch, size, args.encode_reps),
        }
        encoder = results["encoder"]
        encoder["fraction_of_matmul_rate"] = (
            encoder["achieved_gflops"] / results["matmul_start"]["gflops_median"]
        )
        say(
            f"(c) encoder: {encoder['images_per_second']:.2f} images/s steady "
            f"({encoder['achieved_gflops']:.0f} GFLOP/s, "
            f"{100 * encoder['fraction_of_matmul_rate']:.0f}% of matmul); first call "
            f"{encoder['first_call_seconds_incl_compile']:.1f} s"
        )
        results["encode_end_to_end"] = encode_end_to_end(
            config, work / "encoded", args.encode_batch, max(1, args.images // 2)
        )
        end_to_end = results["encode_end_to_end"]
        say(
            f"(c) encode_dataset: {end_to_end['images_per_second_incl_compile']:.2f} images/s "
            f"incl. compile ({end_to_end['seconds_incl_compile']:.1f} s for {args.images})"
        )
        del full_vae

        vae_lib.save_vae(work / "small_vae.npz", vae_lib.random_vae(small_arch, seed=0))
        results["latent_dir"] = make_latent_dir(
            work / "latents", work / "images", work / "small_vae.npz", small_arch, args.records
        )
        say(f"(d) latent dir of {results['latent_dir']['count']} examples")
        results["latent_source"] = latent_source_rates(work / "latents", 256, args.source_steps)
        for name, rate in results["latent_source"].items():
            say(f"(d) {name}: {rate['examples_per_second']:.0f} examples/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["pod_consumption"] = pod_consumption()
    have = results["latent_source"]["iterate_sample_posterior_flip"]["examples_per_second"]
    for name, row in results["pod_consumption"]["rows"].items():
        row["latent_source_examples_per_second_here"] = have
        row["ratio_here_to_needed"] = have / row["images_per_second_per_host"]
        say(f"(e) {name}: needs {row['images_per_second_per_host']:.0f} images/s per host")
    results["matmul_end"] = flops_benchmark.matmul_rate(matmul_n, matmul_reps)
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    results["meta"]["seconds"] = time.perf_counter() - started
    say(f"(a) matmul at the end: {results['matmul_end']['gflops_median']:.1f} GFLOP/s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(out)
    say(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
