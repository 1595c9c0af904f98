"""Benchmark: time to the first batch after resuming at step 0, 10^4 and 10^6, for every source.

    python benchmarks/resume_benchmark.py          # -> benchmarks/results/resume.json
    python benchmarks/resume_benchmark.py --quick  # small data, one repeat, no TFDS/latents

A restart builds the data source again and asks for `iterate(start_step)`; every source computes
the example indices of any step directly (seeded per-epoch permutations or per-step seeds), so
this must cost the same at step 10^6 as at step 0. Per source and start step, `--repeats` times
(start steps interleaved, so drift hits all alike): seconds to build the source, and seconds from
`iterate(k)` to its first batch. Sources (all generated here, offline):
  * mnist_embedded (batch 64) and toy2d (batch 256): in memory;
  * image_folder: `--images` 48 x 40 PNGs in 4 class folders, batch 32, 32 x 32, random flips;
  * tfds: the same PNGs as a tiny ArrayRecord TFDS build (random access), batch 32;
  * latents: the tiny latent asset folder (`tools.tiny_latent`) encoded by
    `tools.encode_latents.encode_dataset` through its tiny random VAE, batch 16 (skipped,
    with the reason recorded, if that fails).
For contrast (not --quick), the removed TFDS path: tf.data `skip(k * 32)` over the same images
built as TFRecord, at k = 10^3 and 10^4 (it grows linearly in k).
The machine's float32 2048^3 matmul rate is measured at the start and the end (shared machine).
"""

from __future__ import annotations

import argparse
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

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from matmul_benchmark import matmul_rate  # noqa: E402
from PIL import Image  # noqa: E402
from timing import run_meta  # noqa: E402

from shortcut_jax import configs, data  # noqa: E402

START_STEPS = (0, 10**4, 10**6)
IMAGE_CLASSES = 4
IMAGE_SIZE = 32


def write_images(root: Path, count: int) -> list[tuple[np.ndarray, int]]:
    """`count` random 48 x 40 RGB PNGs in IMAGE_CLASSES class folders; returns (pixels, label)."""
    rng = np.random.default_rng(0)
    examples = []
    for index in range(count):
        label = index % IMAGE_CLASSES
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
        examples.append((pixels, label))
    return examples


_BUILDERS: dict[str, Any] = {}


def tfds_builder_class(examples: list[tuple[np.ndarray, int]]) -> Any:
    """The TFDS builder class 'shortcut_jax_resume_bench' of `examples` (registered once)."""
    import tensorflow_datasets as tfds

    _BUILDERS["examples"] = examples
    if "class" in _BUILDERS:
        return _BUILDERS["class"]

    class ShortcutJaxResumeBench(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=IMAGE_CLASSES),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index, (pixels, label) in enumerate(_BUILDERS["examples"]):
                yield index, {"image": pixels, "label": label}

    _BUILDERS["class"] = ShortcutJaxResumeBench
    return ShortcutJaxResumeBench


def build_tfds(
    data_dir: Path, examples: list[tuple[np.ndarray, int]], file_format: str = "array_record"
) -> str:
    """The examples as a tiny TFDS dataset 'shortcut_jax_resume_bench'; returns its name."""
    import tensorflow_datasets as tfds

    tfds_builder_class(examples)
    name = "shortcut_jax_resume_bench"
    builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare()
    return name


def base(batch_size: int, **data_fields: Any) -> ml_collections.ConfigDict:
    config = configs.base_config()
    config.batch_size = batch_size
    config.data.update(data_fields)
    return config


def latent_config(workspace: Path) -> ml_collections.ConfigDict:
    """A latent directory of the tiny latent assets, written by `encode_dataset`."""
    from shortcut_jax.tools import encode_latents, tiny_latent

    config = configs.apply_variant(configs.paper_latent_config(), "tiny")
    assets = tiny_latent.ensure_assets(str(workspace / "tiny_latent"))
    config.data.image_dir = assets["image_dir"]
    config.vae.path = assets["vae_path"]
    latent_dir = workspace / "latents"
    encode_latents.encode_dataset(config, str(latent_dir), batch_size=16, progress=False)
    config.data.latent_dir = str(latent_dir)
    config.batch_size = 16
    config.data.random_flip = True
    return config


def source_configs(
    workspace: Path, images: int, quick: bool, say: Callable[[str], None]
) -> tuple[dict[str, ml_collections.ConfigDict], dict[str, str]]:
    """{source name: config} of every source measured, and {name: why skipped}."""
    image_dir = workspace / "images"
    examples = write_images(image_dir, images)
    folder = {"image_size": IMAGE_SIZE, "channels": 3, "num_classes": IMAGE_CLASSES}
    found = {
        "mnist_embedded": base(64),
        "toy2d": base(256, name="toy2d", num_classes=0),
        "image_folder": base(
            32, name="image_folder", image_dir=str(image_dir), random_flip=True, **folder
        ),
    }
    skipped = {}
    if quick:
        return found, {"tfds": "--quick", "latents": "--quick"}
    try:
        name = build_tfds(workspace / "tfds", examples)
        found["tfds"] = base(
            32, name="tfds", tfds_name=name, data_dir=str(workspace / "tfds"), **folder
        )
    except ImportError as error:
        skipped["tfds"] = f"tensorflow_datasets unavailable: {error}"
    try:
        found["latents"] = latent_config(workspace)
    except Exception as error:  # the latent path is being changed elsewhere: record, go on
        skipped["latents"] = f"{type(error).__name__}: {error}"
    for name, reason in skipped.items():
        say(f"skipping {name}: {reason}")
    return found, skipped


def tfrecord_skip_seconds(
    data_dir: Path, examples: list[tuple[np.ndarray, int]], steps: tuple[int, ...], batch: int
) -> dict[str, float]:
    """What the removed TFRecord path paid: tf.data `skip(k * batch)` of encoded records, seconds.

    The same examples built as TFRecord, read as the old pipeline did (encoded images, repeat,
    skip), timed to the first record after the skip, for each k in `steps`.
    """
    import tensorflow_datasets as tfds

    name = build_tfds(data_dir, examples, "tfrecord")
    builder = tfds.builder(name, data_dir=str(data_dir))
    seconds = {}
    for step in steps:
        start = time.perf_counter()
        dataset = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
        next(iter(dataset.repeat().skip(step * batch)))
        seconds[str(step)] = time.perf_counter() - start
    return seconds


def time_resume(config: ml_collections.ConfigDict, start_step: int) -> tuple[float, float, Any]:
    """(seconds to build the source, seconds from iterate(start_step) to its first batch, batch)."""
    start = time.perf_counter()
    source = data.get_source(config)
    built = time.perf_counter()
    iterator = source.iterate(start_step)
    batch = next(iterator)
    first = time.perf_counter()
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return built - start, first - built, batch


def summarize(values: list[float]) -> dict[str, Any]:
    return {"seconds": values, "median": statistics.median(values), "min": min(values)}


def measure(
    config: ml_collections.ConfigDict, repeats: int, say: Callable[[str], None], name: str
) -> dict[str, Any]:
    """Build and first-batch seconds per start step (interleaved over repeats)."""
    time_resume(config, 0)  # warm-up: imports, file caches, thread pools
    build: dict[int, list[float]] = {step: [] for step in START_STEPS}
    first: dict[int, list[float]] = {step: [] for step in START_STEPS}
    for repeat in range(repeats):
        order = START_STEPS if repeat % 2 == 0 else START_STEPS[::-1]
        for step in order:
            build_seconds, first_seconds, batch = time_resume(config, step)
            build[step].append(build_seconds)
            first[step].append(first_seconds)
    result: dict[str, Any] = {
        "batch_size": int(config.batch_size),
        "batch_image_shape": list(batch["image"].shape),
        "build_source": {str(step): summarize(build[step]) for step in START_STEPS},
        "first_batch": {str(step): summarize(first[step]) for step in START_STEPS},
    }
    for statistic in ("median", "min"):
        base_first = result["first_batch"]["0"][statistic]
        result[f"first_batch_{statistic}_ratio_to_step_0"] = {
            str(step): result["first_batch"][str(step)][statistic] / base_first
            for step in START_STEPS
        }
    say(
        f"{name}: first batch after resume (median ms) "
        + ", ".join(
            f"step {step}: {1e3 * statistics.median(first[step]):.2f}" for step in START_STEPS
        )
        + "; build source "
        + ", ".join(f"{1e3 * statistics.median(build[step]):.1f}" for step in START_STEPS)
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; writes and returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, 1 repeat, no TFDS")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--out", default=str(RESULTS / "resume.json"))
    args = parser.parse_args(argv)
    repeats, images = (1, 64) if args.quick else (args.repeats, args.images)

    def say(text: str) -> None:
        print(text, flush=True)

    results: dict[str, Any] = {"meta": run_meta(args.quick), "start_steps": list(START_STEPS)}
    matmul_n, matmul_reps = (256, 3) if args.quick else (2048, 10)
    results["matmul_start"] = matmul_rate(matmul_n, matmul_reps)
    say(f"matmul {matmul_n}^3 fp32: {results['matmul_start']['gflops_median']:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as workspace:
        found, skipped = source_configs(Path(workspace), images, args.quick, say)
        results["skipped"] = skipped
        results["sources"] = {
            name: measure(config, repeats, say, name) for name, config in found.items()
        }
        if not args.quick and "tfds" in found:
            examples = _BUILDERS["examples"]
            skip = tfrecord_skip_seconds(Path(workspace) / "tfrecord", examples, (10**3, 10**4), 32)
            results["removed_tfrecord_skip_path_seconds"] = skip
            say(f"removed TFRecord skip path, seconds to the first record after k steps: {skip}")
    results["matmul_end"] = matmul_rate(matmul_n, matmul_reps)
    say(f"matmul at the end: {results['matmul_end']['gflops_median']:.1f} GFLOP/s")
    results["repeats"] = repeats
    results["images"] = images
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    say(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
