"""Benchmark: the MNIST default in the latent space of an autoencoder trained on this machine.

    python benchmarks/mnist_latent_benchmark.py                    # every stage, in order
    python benchmarks/mnist_latent_benchmark.py --stages eval,report
    python benchmarks/mnist_latent_benchmark.py --report           # print the Markdown

Stages (each appends to benchmarks/results/mnist_latent/results.json, written atomically, and
records the machine's float32 2048^3 matmul rate measured around it, since the 2-core machines
are shared and drift):

  autoencoder  `python -m shortcut_jax.tools.train_autoencoder --out CACHE/mnist_autoencoder.npz`
               with its defaults (wall time, and its metrics JSON).
  autoencoder_scores
               held-out MSE and FD-MNIST of the 1,000 held-out digits' reconstructions (decoded
               posterior means; decoded posterior samples; decoded means plus N(0, sigma^2) in
               the unit-std latent, how a generator's small errors would decode) against the
               evaluation's 5,000-digit reference, beside the real held-out digits' own reading
               and the floor and ceiling that `evaluate` reports; `reconstructions.png` (rows:
               digits, decoded means, decoded samples).
  encode       `python -m shortcut_jax.tools.encode_latents --config experiments/mnist_latent.py
               --out CACHE/mnist_latents` on the 5,000 digits (wall time; a fresh directory).
  throughput   train images/s of experiments/mnist.py and experiments/mnist_latent.py over
               --throughput_steps steps each, back to back and interleaved (pixel, latent, pixel,
               latent), each in a fresh process; the median over 50-step intervals after the
               first step. The ratio latent / pixel is what the next stage uses.
  train        `python -m shortcut_jax.main --config experiments/mnist_latent.py` for
               round(14,000 * ips_latent / ips_pixel) steps: the wall time the pixel default
               needs for its 14,000 steps at the measured ratio. Sample grids and periodic
               evaluation are off during training, as in benchmarks/mnist_benchmark.py.
  eval         `python -m shortcut_jax.evaluate --steps 1,2,4,8,128 --num 1000 --metrics
               fd_mnist` on that run (EMA parameters, CFG 1.5, samples decoded to pixels).
  throughput_check
               the throughput stage again afterwards (kept apart: the first measurement set the
               step count), plus the images/s of the latent data source alone.
  report       results.md: the autoencoder, the speeds, and FD-MNIST at 1/2/4/8/128 steps of the
               latent run beside the pixel default's (benchmarks/results/eval_mnist_shortcut:
               the same 14,000 x 32 budget, scored the same way by an earlier session; not
               retrained here).

CACHE is $SHORTCUT_JAX_CACHE or ~/.cache/shortcut_jax (--cache_dir sets it for every stage), where
experiments/mnist_latent.py looks. If the trained scaling factor differs from the config's
literal, the stages pass `--config.vae.scaling_factor=` and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shortcut_jax import atomic_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mnist_latent"
PIXEL_EVAL = ROOT / "benchmarks" / "results" / "eval_mnist_shortcut" / "results.json"
PIXEL_BENCHMARK = ROOT / "benchmarks" / "results" / "mnist_shortcut.json"
PIXEL_CONFIG = "experiments/mnist.py"
LATENT_CONFIG = "experiments/mnist_latent.py"
PIXEL_STEPS = 14_000
STEP_COUNTS = (1, 2, 4, 8, 128)
STAGES = (
    "autoencoder",
    "autoencoder_scores",
    "encode",
    "throughput",
    "train",
    "eval",
    "throughput_check",
    "report",
)
THROUGHPUT_LOG_EVERY = 50
LATENT_NOISE = (0.2, 0.4)  # std of the noise added to unit-std latents before decoding


# ------------------------------------------------------------------------------------ helpers


def load_results() -> dict[str, Any]:
    path = RESULTS / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(results: dict[str, Any]) -> None:
    atomic_files.write_json(RESULTS / "results.json", results)


def matmul_gflops() -> float:
    """Median GFLOP/s of a jitted float32 2048 x 2048 @ 2048 x 2048 (flops_benchmark's helper)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flops_benchmark

    return float(flops_benchmark.matmul_rate(2048, 15)["gflops_median"])


def load_experiment(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem + "_cfg", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(command: list[str], log: Path) -> float:
    """Runs `command` from the repo root with output to `log`; returns the wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(command), f"> {log}", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        completed = subprocess.run(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    seconds = time.perf_counter() - started
    if completed.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{tail}")
    atomic_files.write_json(log.with_suffix(".wall.json"), {"command": command, "seconds": seconds})
    return seconds


def recorded_wall(log: Path) -> tuple[float, str]:
    """Wall seconds of an earlier `run` with output to `log`, and how they were obtained.

    From the `.wall.json` that `run` writes; for logs older than that, from the log file's
    creation and last-modification times (GNU stat; within a second of the real wall time).
    """
    sidecar = log.with_suffix(".wall.json")
    if sidecar.exists():
        return float(json.loads(sidecar.read_text())["seconds"]), "measured"
    birth = subprocess.run(["stat", "-c", "%W", str(log)], capture_output=True, text=True)
    created = float(birth.stdout.strip() or 0)
    if created <= 0:
        raise RuntimeError(f"{log}: no {sidecar.name} and no file creation time")
    return log.stat().st_mtime - created, "log file creation -> last write"


def latent_overrides(results: dict[str, Any]) -> list[str]:
    """`--config.vae.scaling_factor=` when the trained factor differs from the config's."""
    trained = results.get("autoencoder", {}).get("scaling_factor")
    config = load_experiment(LATENT_CONFIG)
    if trained is None or float(trained) == float(config.vae.scaling_factor):
        return []
    return [f"--config.vae.scaling_factor={trained}"]


# ------------------------------------------------------------------------------------ stages


def stage_autoencoder(args: argparse.Namespace, results: dict[str, Any]) -> None:
    config = load_experiment(LATENT_CONFIG)
    out = Path(config.vae.path)
    metrics_path = RESULTS / "autoencoder_metrics.json"
    command = [sys.executable, "-m", "shortcut_jax.tools.train_autoencoder", "--out", str(out)]
    command += ["--metrics_out", str(metrics_path), *args.autoencoder_flags]
    before = matmul_gflops()
    wall = run(command, Path(args.workdir) / "logs" / "train_autoencoder.log")
    after = matmul_gflops()
    metrics = json.loads(metrics_path.read_text())
    results["autoencoder"] = {
        "command": " ".join(command[1:]),
        "path": str(out),
        "wall_seconds": wall,
        "matmul_gflops_before": before,
        "matmul_gflops_after": after,
        "config_scaling_factor": float(config.vae.scaling_factor),
        "config_scaling_factor_matches": float(config.vae.scaling_factor)
        == float(metrics["scaling_factor"]),
        **{k: v for k, v in metrics.items() if k != "history"},
        "final_batch": metrics["history"][-1],
    }


def stage_autoencoder_scores(args: argparse.Namespace, results: dict[str, Any]) -> None:
    ae = results["autoencoder"]
    results["autoencoder"] = {**ae, **reconstruction_scores(ae["path"], ae["scaling_factor"])}


def reconstruction_scores(path: str, scaling_factor: float) -> dict[str, Any]:
    """FD-MNIST of the held-out digits' reconstructions, with the sweep's floor and ceiling."""
    import numpy as np

    from shortcut_jax import images as images_lib
    from shortcut_jax.evaluators import features, fid, sweep
    from shortcut_jax.models import vae as vae_lib
    from shortcut_jax.tools import train_autoencoder as ta

    vae = vae_lib.load_vae(path, scaling_factor=scaling_factor)
    digits, _, held_out_index = ta.split()
    held_out = np.asarray(digits[held_out_index])
    means = np.clip(ta.reconstruct(vae, held_out), -1.0, 1.0)
    samples = np.clip(ta.reconstruct(vae, held_out, sample_seed=0), -1.0, 1.0)
    # Robustness of the decoder to latent errors: N(0, sigma^2) added to the scaled posterior
    # means (unit-std latents), as a generator's small mistakes would be.
    mean, _ = ta.posterior_moments(vae.arch, vae.params, held_out)
    rng = np.random.default_rng(1)
    noisy = {}
    for sigma in LATENT_NOISE:
        latents = mean * vae.scaling_factor
        latents = latents + sigma * rng.standard_normal(mean.shape).astype(np.float32)
        noisy[sigma] = np.clip(ta.decode_scaled(vae, latents), -1.0, 1.0)

    # The evaluation's reference: the same real digits, order and floor as `evaluate` reports.
    config = load_experiment(PIXEL_CONFIG)
    net = sweep.load_feature_net(config, "fd_mnist")
    reference, _ = sweep.reference_features(config, net, int(config.eval_ref_num))
    mu, sigma = fid.feature_statistics(reference)

    def fd(images: np.ndarray) -> float:
        return fid.frechet_distance(
            *fid.feature_statistics(features.compute_features(net, images)), mu, sigma
        )

    noise = sweep.noise_images(len(held_out), (28, 28, 1))  # the sweep's ceiling images
    order = np.random.default_rng(0).permutation(len(held_out))[:20]
    images_lib.save_grid(
        RESULTS / "reconstructions.png",
        np.concatenate([held_out[order], means[order], samples[order]]),
        ncols=20,
    )
    return {
        "held_out_mse_check": float(np.mean(np.square(means - held_out))),
        "fd_mnist_reconstruction": fd(means),
        "fd_mnist_reconstruction_posterior_sample": fd(samples),
        "fd_mnist_held_out_real": fd(held_out),
        "fd_mnist_latent_noise": {str(sigma): fd(images) for sigma, images in noisy.items()},
        "fd_mnist_floor": sweep.floor_from_features(reference),
        "fd_mnist_ceiling": fd(noise),
        "reconstructions_png": str((RESULTS / "reconstructions.png").relative_to(ROOT)),
    }


def stage_encode(args: argparse.Namespace, results: dict[str, Any]) -> None:
    config = load_experiment(LATENT_CONFIG)
    out = Path(config.data.latent_dir)
    if out.exists():
        shutil.rmtree(out)  # a fresh directory: the full encoding time, for the current VAE
    command = [sys.executable, "-m", "shortcut_jax.tools.encode_latents"]
    command += ["--config", LATENT_CONFIG, "--out", str(out), *latent_overrides(results)]
    before = matmul_gflops()
    wall = run(command, Path(args.workdir) / "logs" / "encode_latents.log")
    after = matmul_gflops()
    metadata = json.loads((out / "metadata.json").read_text())
    results["encode"] = {
        "command": " ".join(command[1:]),
        "latent_dir": str(out),
        "wall_seconds": wall,
        "matmul_gflops_before": before,
        "matmul_gflops_after": after,
        "count": metadata.get("count"),
        "latent_shape": metadata.get("latent_shape"),
        "scaling_factor": metadata.get("scaling_factor"),
        "moment_stats": metadata.get("moment_stats"),
    }


def throughput_worker(config_path: str, steps: int, workdir: str, overrides: list[str]) -> None:
    """In a fresh process: trains `steps` steps and prints the per-interval images/s as JSON."""
    from shortcut_jax import config_lib, train

    config = load_experiment(config_path)
    for override in overrides:  # only --config.vae.scaling_factor=X
        key, value = override.removeprefix("--config.").split("=")
        section, field = key.split(".")
        config[section][field] = float(value)
    config.total_steps = steps
    config.log_every_steps = THROUGHPUT_LOG_EVERY
    config.checkpoint_every_steps = 10 * steps
    config.sample_every_steps = 0
    config.eval_every_steps = 0
    config.sample_steps = (1,)
    config.sample_num = 10
    config_lib.validate(config)
    if Path(workdir).exists():
        shutil.rmtree(workdir)
    history = train.train_and_evaluate(config, workdir)
    rates = [h["perf/images_per_second"] for h in history.values() if "perf/images_per_second" in h]
    first = next(iter(history.values())).get("perf/first_step_seconds")
    print("THROUGHPUT " + json.dumps({"images_per_second": rates, "first_step_seconds": first}))


def measure_throughput(
    args: argparse.Namespace, config_path: str, name: str, tag: str, overrides: list[str]
) -> dict[str, Any]:
    workdir = Path(args.workdir) / "throughput" / f"{name}_{tag}"
    log = Path(args.workdir) / "logs" / f"{tag}_{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--throughput_worker", config_path]
    command += ["--throughput_steps", str(args.throughput_steps), "--workdir", str(workdir)]
    command += [f"--worker_override={o}" for o in overrides]
    wall = run(command, log)
    line = next(x for x in log.read_text().splitlines() if x.startswith("THROUGHPUT "))
    measured = json.loads(line.removeprefix("THROUGHPUT "))
    rates = measured["images_per_second"]
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "config": config_path,
        "wall_seconds": wall,
        "first_step_seconds": measured["first_step_seconds"],
        "interval_images_per_second": rates,
        "images_per_second_median": statistics.median(rates),
    }


def stage_throughput(
    args: argparse.Namespace, results: dict[str, Any], key: str = "throughput"
) -> None:
    overrides = latent_overrides(results)
    runs, matmul = [], [matmul_gflops()]
    for round_index in range(args.throughput_rounds):
        for name, path in (("pixel", PIXEL_CONFIG), ("latent", LATENT_CONFIG)):
            extra = overrides if name == "latent" else []
            measured = measure_throughput(args, path, name, f"{key}_{round_index}", extra)
            runs.append({"name": name, "round": round_index, **measured})
            print(runs[-1]["name"], runs[-1]["images_per_second_median"], flush=True)
        matmul.append(matmul_gflops())
    pixel = [r["images_per_second_median"] for r in runs if r["name"] == "pixel"]
    latent = [r["images_per_second_median"] for r in runs if r["name"] == "latent"]
    ratios = [lat / pix for lat, pix in zip(latent, pixel, strict=True)]
    ratio = statistics.median(ratios)
    results[key] = {
        "steps_per_run": args.throughput_steps,
        "runs": runs,
        "matmul_gflops": matmul,
        "pixel_images_per_second": statistics.median(pixel),
        "latent_images_per_second": statistics.median(latent),
        "ratio_per_round": ratios,
        "ratio_latent_over_pixel": ratio,
        "latent_steps_at_equal_wall_time": int(round(PIXEL_STEPS * ratio)),
    }


def stage_throughput_check(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """More interleaved rounds after the fact, and the latent data source's own speed.

    Stored apart from 'throughput' (which set the latent run's step count) to say how
    well that ratio was measured.
    """
    stage_throughput(args, results, key="throughput_check")
    results["throughput_check"]["latent_source_images_per_second"] = latent_source_speed()


def latent_source_speed(num_batches: int = 200) -> float:
    """Images/s that the latent source alone delivers (prefetching iterator, no training)."""
    from shortcut_jax import data

    source = data.get_source(load_experiment(LATENT_CONFIG))
    batches = source.iterate(0)
    next(batches)
    started = time.perf_counter()
    for _ in range(num_batches):
        batch = next(batches)
    seconds = time.perf_counter() - started
    batches.close()
    return num_batches * len(batch["image"]) / seconds


def stage_train(args: argparse.Namespace, results: dict[str, Any]) -> None:
    steps = args.latent_steps or results["throughput"]["latent_steps_at_equal_wall_time"]
    workdir = Path(args.workdir) / "mnist_latent"
    log = Path(args.workdir) / "logs" / "train_mnist_latent.log"
    command = [sys.executable, "-m", "shortcut_jax.main", "--config", LATENT_CONFIG]
    command += ["--workdir", str(workdir), f"--config.total_steps={steps}"]
    command += ["--config.eval_every_steps=0", "--config.sample_every_steps=0"]
    command += latent_overrides(results)
    finished = (workdir / "checkpoints" / str(steps)).is_dir()
    if args.reuse_run and finished:  # summarize a finished run again (no training)
        previous = results.get("train", {})
        # Not measured again: the last rate before the run (the throughput stage's, when the
        # first summary of the run was lost) and, unless recorded, none after it.
        before = previous.get("matmul_gflops_before", results["throughput"]["matmul_gflops"][-1])
        after = previous.get("matmul_gflops_after")
        wall, wall_source = recorded_wall(log)
    else:
        if workdir.exists():
            shutil.rmtree(workdir)
        before = matmul_gflops()
        wall, wall_source = run(command, log), "measured"
        after = matmul_gflops()
    scalars = read_scalars(workdir)
    rates = scalars.get("perf/images_per_second", [])
    samples = sorted((workdir / "samples").glob("step_*.png"))
    if samples:
        shutil.copy(samples[-1], RESULTS / "samples_latent.png")
    losses = {
        name: statistics.mean(values[-1:])
        for name, values in scalars.items()
        if name.startswith("loss")
    }
    results["train"] = {
        "command": " ".join(command[1:]),
        "workdir": str(workdir),
        "total_steps": steps,
        "wall_seconds": wall,
        "wall_seconds_source": wall_source,
        "matmul_gflops_before": before,
        "matmul_gflops_after": after,
        "images_per_second_median": statistics.median(rates) if rates else None,
        "first_step_seconds": (scalars.get("perf/first_step_seconds") or [None])[-1],
        "final_losses": losses,
        "grid": "benchmarks/results/mnist_latent/samples_latent.png" if samples else None,
    }


def read_scalars(workdir: Path) -> dict[str, list[float]]:
    """Every scalar in the run's TensorBoard event files, in step order."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        str(workdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    values: dict[str, list[tuple[int, float]]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        values[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    import numpy as np

    for tag in accumulator.Tags().get("tensors", []):
        pairs = [
            (e.step, np.asarray(_tensor_value(e.tensor_proto))) for e in accumulator.Tensors(tag)
        ]
        if pairs and all(value.size == 1 and value.dtype.kind == "f" for _, value in pairs):
            values[tag] = [(step, float(value.reshape(()))) for step, value in pairs]
    return {tag: [v for _, v in sorted(pairs)] for tag, pairs in values.items()}


def _tensor_value(proto: Any) -> Any:
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


def stage_eval(args: argparse.Namespace, results: dict[str, Any]) -> None:
    workdir = Path(args.workdir) / "mnist_latent"
    out = RESULTS / "eval"
    steps = ",".join(str(s) for s in STEP_COUNTS)
    command = [sys.executable, "-m", "shortcut_jax.evaluate", "--workdir", str(workdir)]
    command += ["--steps", steps, "--num", "1000", "--metrics", "fd_mnist", "--out", str(out)]
    before = matmul_gflops()
    wall = run(command, Path(args.workdir) / "logs" / "evaluate.log")
    after = matmul_gflops()
    evaluation = json.loads((out / "results.json").read_text())
    results["eval"] = {
        "command": " ".join(command[1:]),
        "wall_seconds": wall,
        "matmul_gflops_before": before,
        "matmul_gflops_after": after,
        "metrics": evaluation["metrics"],
        "rows": evaluation["rows"],
    }


# ------------------------------------------------------------------------------------ report


def report(results: dict[str, Any]) -> str:
    """Markdown for BENCHMARKS.md from results.json and the pixel default's evaluation."""
    lines = []
    ae = results.get("autoencoder")
    if ae:
        recipe = ae["recipe"]
        arch = recipe["arch"]
        lines += [
            "Autoencoder (`python -m shortcut_jax.tools.train_autoencoder`): AutoencoderKL blocks "
            f"{tuple(arch['block_out_channels'])}, {arch['layers_per_block']} resnet per encoder "
            f"block, GroupNorm {arch['norm_num_groups']}, latents {tuple(ae['latent_shape'])} "
            f"({ae['num_params']:,} parameters); {recipe['reconstruction'].upper()} + "
            f"{recipe['kl_weight']:g} x KL (sums per image), Adam {recipe['learning_rate']:g} "
            f"cosine, batch {recipe['batch_size']} x {ae['steps']} steps on the 4,000 training "
            f"digits: {ae['wall_seconds'] / 60:.1f} min wall (matmul "
            f"{ae['matmul_gflops_before']:.0f} / {ae['matmul_gflops_after']:.0f} GFLOP/s before "
            f"/ after). Scaling factor {ae['scaling_factor']} "
            + (
                "(the literal of experiments/mnist_latent.py"
                if ae.get("config_scaling_factor_matches", True)
                else f"(NOT the config's {ae['config_scaling_factor']}: the stages passed "
                "--config.vae.scaling_factor"
            )
            + f"; posterior std / latent std {ae['posterior_std_over_latent_std']:.3f}).",
            "",
            "| held-out 1,000 digits | MSE (per pixel, [-1, 1]) | FD-MNIST |",
            "|---|---|---|",
            f"| decoded posterior means | {ae['held_out_mse']:.4f} | "
            f"{ae['fd_mnist_reconstruction']:.2f} |",
            "| decoded posterior samples | | "
            f"{ae['fd_mnist_reconstruction_posterior_sample']:.2f} |",
            *(
                f"| decoded posterior means + N(0, {sigma}^2) (unit-std latents) | | {value:.2f} |"
                for sigma, value in ae.get("fd_mnist_latent_noise", {}).items()
            ),
            f"| the real digits themselves | 0 | {ae['fd_mnist_held_out_real']:.2f} |",
            f"| floor (2,500 vs 2,500 real) / ceiling (1,000 noise) | | "
            f"{ae['fd_mnist_floor']:.2f} / {ae['fd_mnist_ceiling']:.2f} |",
            "",
        ]
    speed = results.get("throughput")
    if speed:
        lines += _speed_lines(speed, "Train throughput, back to back")
        lines += [
            f"Median ratio {speed['ratio_latent_over_pixel']:.3f}: equal wall time = "
            f"{speed['latent_steps_at_equal_wall_time']:,} latent steps for the pixel "
            f"default's {PIXEL_STEPS:,}.",
            "",
        ]
    check = results.get("throughput_check")
    if check:
        lines += _speed_lines(check, "Measured again after the study")
        lines += [f"Median ratio {check['ratio_latent_over_pixel']:.3f}."]
        if "latent_source_images_per_second" in check:
            lines += [
                "The latent data source alone (reading records, posterior sampling, prefetch "
                f"thread) delivers {check['latent_source_images_per_second']:,.0f} images/s.",
            ]
        lines += [""]
    train_info = results.get("train")
    if train_info:
        lines += [
            f"Latent run: {train_info['total_steps']:,} steps x 32 in "
            f"{train_info['wall_seconds'] / 60:.1f} min wall (median "
            f"{train_info['images_per_second_median'] or float('nan'):.0f} images/s; matmul "
            f"{_rate(train_info['matmul_gflops_before'])} / "
            f"{_rate(train_info['matmul_gflops_after'])} GFLOP/s before / after).",
            "",
        ]
        if speed:
            pixel_minutes = PIXEL_STEPS * 32 / speed["pixel_images_per_second"] / 60
            latent_minutes = train_info["total_steps"] * 32 / speed["latent_images_per_second"] / 60
            lines += [
                f"At the rates measured back to back, the pixel default's {PIXEL_STEPS:,} steps "
                f"are {pixel_minutes:.1f} min of training and the latent run's "
                f"{train_info['total_steps']:,} steps {latent_minutes:.1f} min.",
                "",
            ]
        if PIXEL_BENCHMARK.exists():
            earlier = json.loads(PIXEL_BENCHMARK.read_text())
            lines += [
                f"The pixel default of the earlier session ({PIXEL_BENCHMARK.name}): "
                f"{earlier['total_steps']:,} steps in {earlier['wall_seconds'] / 60:.1f} min "
                f"wall at {earlier['images_per_second_median']:.0f} images/s (a quieter machine).",
                "",
            ]
    evaluation = results.get("eval")
    if evaluation:
        pixel = json.loads(PIXEL_EVAL.read_text()) if PIXEL_EVAL.exists() else None
        pixel_rows = {r["steps"]: r for r in pixel["rows"]} if pixel else {}
        metric = evaluation["metrics"]["fd_mnist"]
        lines += [
            "| steps | NFE | pixel default FD-MNIST (P / R) | latent FD-MNIST (P / R) | floor | "
            "ceiling |",
            "|---|---|---|---|---|---|",
        ]
        for row in evaluation["rows"]:
            lines.append(
                f"| {row['steps']} | {row['nfe']} | {_score(pixel_rows.get(row['steps'], {}))} | "
                f"{_score(row)} | {metric['floor']:.2f} | {metric['ceiling']:.2f} |"
            )
        lines += [""]
        if pixel:
            old = pixel["metrics"]["fd_mnist"]
            lines += [
                "Pixel default: benchmarks/results/eval_mnist_shortcut (14,000 x 32 steps, scored "
                "by an earlier session with the same command; not retrained here). Its FD-MNIST "
                f"floor / ceiling read {old['floor']:.2f} / {old['ceiling']:.2f} there and "
                f"{metric['floor']:.2f} / {metric['ceiling']:.2f} here: the classifier is "
                "retrained deterministically per machine, and this machine's differs slightly.",
                "",
            ]
    return "\n".join(lines) + "\n"


def _speed_lines(speed: dict[str, Any], title: str) -> list[str]:
    lines = [
        f"{title}, {speed['steps_per_run']} steps each in fresh processes (matmul "
        f"{', '.join(f'{g:.0f}' for g in speed['matmul_gflops'])} GFLOP/s around the rounds):",
        "",
        "| round | pixel default images/s | latent images/s | latent / pixel |",
        "|---|---|---|---|",
    ]
    pixel = [r for r in speed["runs"] if r["name"] == "pixel"]
    latent = [r for r in speed["runs"] if r["name"] == "latent"]
    for index, (p, q) in enumerate(zip(pixel, latent, strict=True)):
        lines.append(
            f"| {index + 1} | {p['images_per_second_median']:.0f} | "
            f"{q['images_per_second_median']:.0f} | {speed['ratio_per_round'][index]:.3f} |"
        )
    return [*lines, ""]


def _rate(gflops: float | None) -> str:
    return "not measured" if gflops is None else f"{gflops:.0f}"


def _score(row: dict[str, Any]) -> str:
    if "fd_mnist" not in row:
        return "-"
    text = f"{row['fd_mnist']:.2f}"
    if "fd_mnist/precision" in row:
        text += f" ({row['fd_mnist/precision']:.2f} / {row['fd_mnist/recall']:.2f})"
    return text


def stage_report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    text = report(results)
    path = RESULTS / "results.md"
    atomic_files.write_text(path, text)
    print(text)


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "mnist_latent_benchmark"))
    parser.add_argument("--cache_dir", default=None, help="sets $SHORTCUT_JAX_CACHE")
    parser.add_argument("--throughput_steps", type=int, default=300)
    parser.add_argument("--throughput_rounds", type=int, default=2)
    parser.add_argument("--latent_steps", type=int, default=0, help="override the train steps")
    parser.add_argument(
        "--reuse_run",
        action="store_true",
        help="train stage: summarize a finished latent run in --workdir instead of retraining",
    )
    parser.add_argument(
        "--autoencoder_flag",
        dest="autoencoder_flags",
        action="append",
        default=[],
        help="extra flag for train_autoencoder, e.g. --autoencoder_flag=--kl_weight=1e-3",
    )
    parser.add_argument("--report", action="store_true", help="print the Markdown and exit")
    parser.add_argument("--throughput_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache_dir:
        os.environ["SHORTCUT_JAX_CACHE"] = os.path.abspath(args.cache_dir)
    if args.throughput_worker:
        throughput_worker(
            args.throughput_worker, args.throughput_steps, args.workdir, args.worker_override
        )
        return
    results = load_results()
    if args.report:
        print(report(results))
        return
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; allowed: {STAGES}")
    functions = {
        "autoencoder": stage_autoencoder,
        "autoencoder_scores": stage_autoencoder_scores,
        "encode": stage_encode,
        "throughput": stage_throughput,
        "throughput_check": stage_throughput_check,
        "train": stage_train,
        "eval": stage_eval,
        "report": stage_report,
    }
    import jax

    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
    for stage in stages:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"=== {stage} ({started})", flush=True)
        functions[stage](args, results)
        results.setdefault("stage_dates", {})[stage] = started
        save_results(results)


if __name__ == "__main__":
    main()
