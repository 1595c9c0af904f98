"""Benchmark: the MNIST default trained for a fixed budget, per objective / teacher variant.

    python benchmarks/mnist_benchmark.py --variant shortcut          # experiments/mnist.py as is
    python benchmarks/mnist_benchmark.py --variant flow_matching     # same budget, flow matching
    python benchmarks/mnist_benchmark.py --variant shortcut_ema_teacher  # paper's EMA teacher
    python benchmarks/mnist_benchmark.py --report                    # results -> BENCHMARKS.md

    python benchmarks/mnist_benchmark.py --variant shortcut --rescore  # scores of a finished run

Each run records wall time, compile time (first step), train throughput (images/s after
compilation, median over log intervals), final losses, sample grids at 1, 4 and 128 steps, and two
rough quality scores of 1,000 conditional samples per step count (FD-MNIST and Inception FID at
every budget come from `python -m shortcut_jax.evaluate`, BENCHMARKS.md section 3):

- class accuracy: how often a logistic-regression classifier fit on the 5,000 real digits reads a
  sample as the digit it was asked for (blind to blur and to a lack of diversity);
- FD-PCA: the Frechet distance between Gaussians fit to samples and to the real digits in the space
  of the real digits' first 50 principal components (penalises blur and collapsed diversity), with
  its floor (half the real digits against the other half) and ceiling (Gaussian noise) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "benchmarks"
VARIANTS = {
    "shortcut": {},
    "flow_matching": {"objective": "flow_matching"},
    "shortcut_ema_teacher": {"bootstrap_teacher": "ema", "teacher_ema_rate": 0.999},
}
STEP_COUNTS = (1, 2, 4, 8, 128)


def load_config(total_steps: int | None, overrides: dict):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mnist_config", ROOT / "experiments/mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    if total_steps:
        config.total_steps = total_steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, total_steps)
    config.sample_every_steps = 0
    config.eval_every_steps = 0  # scored by python -m shortcut_jax.evaluate instead
    return config


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fit to the rows of a and b."""
    import numpy as np
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sigma_a @ sigma_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * covmean))


def quality_scores(config, state, num: int = 1000) -> dict:
    """Class accuracy and FD-PCA of conditional samples per number of steps (see the docstring)."""
    import jax
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from shortcut_jax import models, objectives, sampling, steps
    from shortcut_jax.data.mnist import load_mnist

    images, labels = load_mnist(28)
    real = np.asarray(images).reshape(len(images), -1)
    classifier = LogisticRegression(max_iter=300, C=0.05)
    classifier.fit(real, np.asarray(labels))
    pca = PCA(50, random_state=0).fit(real)
    real_features = pca.transform(real)
    noise = np.clip(np.random.default_rng(0).normal(size=(num, real.shape[1])), -1, 1)
    apply_fn = steps.make_apply_fn(models.get_model(config))
    accuracy, fd_pca = {}, {}
    for num_steps in STEP_COUNTS:
        samples, sample_labels = sampling.sample_batch(
            apply_fn,
            state.ema_params,
            jax.random.PRNGKey(1234),
            num=num,
            shape=(28, 28, 1),
            num_steps=num_steps,
            denoise_timesteps=config.denoise_timesteps,
            cfg_scale=float(config.sample_cfg_scale),
            num_classes=config.data.num_classes,
            batch_size=250,
            objective=objectives.ObjectiveConfig.from_config(config),
        )
        flat = np.clip(np.asarray(samples), -1, 1).reshape(num, -1)
        accuracy[num_steps] = float(np.mean(classifier.predict(flat) == sample_labels))
        fd_pca[num_steps] = frechet_distance(pca.transform(flat), real_features)
    return {
        "class_consistency": accuracy,
        "fd_pca": fd_pca,
        "fd_pca_floor": frechet_distance(real_features[::2], real_features[1::2]),
        "fd_pca_ceiling": frechet_distance(pca.transform(noise), real_features),
    }


def run(variant: str, total_steps: int | None, workdir: Path) -> dict:
    import jax

    from shortcut_jax import checkpoint, train

    config = load_config(total_steps, VARIANTS[variant])
    if workdir.exists():
        shutil.rmtree(workdir)
    started = time.perf_counter()
    history = train.train_and_evaluate(config, str(workdir))
    wall_seconds = time.perf_counter() - started
    last_step = max(history)
    throughput = [
        h["perf/images_per_second"] for h in history.values() if "perf/images_per_second" in h
    ]
    _, state = checkpoint.load_run(str(workdir))
    FIGURES.mkdir(parents=True, exist_ok=True)
    grid = FIGURES / f"mnist_{variant}.png"
    shutil.copy(workdir / "samples" / f"step_{last_step:07d}.png", grid)
    final = history[last_step]
    return {
        "variant": variant,
        "objective": config.objective,
        "bootstrap_teacher": config.bootstrap_teacher,
        "total_steps": config.total_steps,
        "batch_size": config.batch_size,
        "wall_seconds": wall_seconds,
        "first_step_seconds": final["perf/first_step_seconds"],
        "images_per_second_median": statistics.median(throughput),
        "final_losses": {k: v for k, v in final.items() if k.startswith("loss")},
        **quality_scores(config, state),
        "grid": str(grid.relative_to(ROOT)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def report() -> str:
    """Markdown for BENCHMARKS.md from every results/mnist_*.json."""
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("mnist_*.json"))]
    lines = [
        "| variant | steps x batch | wall | first step (compile) | train images/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['total_steps']} x {r['batch_size']} | "
            f"{r['wall_seconds'] / 60:.1f} min | {r['first_step_seconds']:.1f} s | "
            f"{r['images_per_second_median']:.0f} |"
        )
    steps_header = " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in STEP_COUNTS)
    for key, title in (
        ("fd_pca", "FD-PCA50 (lower is better)"),
        ("class_consistency", "class accuracy of conditional samples (higher is better)"),
    ):
        lines += [
            "",
            f"{title}:",
            "",
            f"| variant | {steps_header} |",
            "|---" * (1 + len(STEP_COUNTS)) + "|",
        ]
        for r in rows:
            if key in r:
                values = " | ".join(f"{r[key][str(n)]:.2f}" for n in STEP_COUNTS)
                lines.append(f"| {r['variant']} | {values} |")
    if rows and "fd_pca_floor" in rows[0]:
        lines += [
            "",
            f"FD-PCA50 floor (real vs real) {rows[0]['fd_pca_floor']:.2f}, "
            f"ceiling (Gaussian noise) {rows[0]['fd_pca_ceiling']:.2f}.",
        ]
    lines.append("")
    for r in rows:
        lines.append(
            f"**{r['variant']}** ({r['machine']}, {r['date']}): final losses "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["final_losses"].items()))
        )
        lines.append("")
        lines.append(f"![{r['variant']} samples at 1, 4 and 128 steps]({r['grid']})")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--total_steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "benchmark"))
    parser.add_argument("--report", action="store_true", help="print the Markdown table")
    parser.add_argument(
        "--rescore", action="store_true", help="recompute the scores of a finished run"
    )
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    if not args.variant:
        parser.error("give --variant or --report")
    if args.rescore:
        from shortcut_jax import checkpoint

        result = json.loads((RESULTS / f"mnist_{args.variant}.json").read_text())
        result.update(quality_scores(*checkpoint.load_run(str(Path(args.workdir) / args.variant))))
    else:
        result = run(args.variant, args.total_steps, Path(args.workdir) / args.variant)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"mnist_{args.variant}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
