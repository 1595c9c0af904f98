"""Reproduction study: every objective of the paper's comparison, plus MeanFlow, at one budget.

    python benchmarks/objectives_study.py --suite toy2d              # ~15 min on a 2-core CPU
    python benchmarks/objectives_study.py --suite mnist --budget 2000 --num 500
    python benchmarks/objectives_study.py --suite mnist --report     # Markdown for BENCHMARKS.md

Every method trains the suite's default network (experiments/toy2d.py: MLP 256 x 4; experiments/
mnist.py: DiT 128 x 4, patch 4) with the same batch, optimiser, schedule shape and EMA, through the
training CLI users run, for the same total number of gradient steps. The distillation methods
(progressive distillation, consistency distillation, reflow) spend half of it on their flow-matching
teacher and half on the student, so the teacher's training counts in their budget; reflow's pair
generation costs network evaluations but no gradient steps and is reported beside it.

Scores at 1, 2, 4, 8 and 128 steps (`--steps N` = N network evaluations per guidance branch, the
objective's own sampler):
- toy2d: the sliced Wasserstein-2 distance of 2,000 samples to 2,000 fresh data points (256 random
  directions), with its floor (two data samples) and ceiling (every point at the origin);
- mnist: FD-MNIST and FID of `--num` class-conditional samples per budget (python -m
  shortcut_jax.evaluate), unguided by default (`--cfg 1`: the distilled and consistency students
  learn unguided teachers), against the 5,000 digits.

Results go to benchmarks/results/objectives_{suite}.json (one entry per method, updated as each
finishes, so an interrupted study is resumed by rerunning it: finished methods are skipped) and
the plot to docs/benchmarks/objectives_{suite}.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "benchmarks"
STEP_COUNTS = (1, 2, 4, 8, 128)
FID_STEPS = (1, 128)
CONFIGS = {"toy2d": "experiments/toy2d.py", "mnist": "experiments/mnist.py"}
# The optimiser and bootstrap share the study was measured with (BENCHMARKS section 8): the MNIST
# default's before it moved to 7,000 steps at 2e-3 with bootstrap_every 4 (section 11).
SUITE_SETTINGS = {"toy2d": {}, "mnist": {"optim.learning_rate": 5e-4, "bootstrap_every": 8}}

# method -> (objective, needs the flow-matching teacher, extra config overrides)
METHODS = {
    "shortcut": ("shortcut", False, {}),
    "flow_matching": ("flow_matching", False, {}),
    "diffusion": ("diffusion", False, {}),
    "consistency_training": ("consistency_training", False, {}),
    "live_reflow": ("live_reflow", False, {}),
    "meanflow": ("meanflow", False, {}),
    "progressive_distillation": ("progressive_distillation", True, {}),
    "consistency_distillation": ("consistency_distillation", True, {}),
    "reflow": ("reflow", True, {}),
}
END_TO_END = [name for name, (_, teacher, _) in METHODS.items() if not teacher]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_command(args: list[str], log: Path) -> float:
    """Runs `python -m ...` from the repository root with output in `log`; returns wall seconds."""
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}); {log}:\n{tail}")
    return time.perf_counter() - started


def train(
    suite: str,
    workdir: Path,
    steps: int,
    overrides: dict,
    warmup_steps: int | None = None,
    extra: tuple[str, ...] = (),
) -> float:
    """Trains one run through the CLI (the config's warm-up unless `warmup_steps` is given)."""
    args = ["-m", "shortcut_jax.main", "--config", CONFIGS[suite], f"--workdir={workdir}"]
    settings = {
        "total_steps": steps,
        "sample_every_steps": 0,
        "eval_every_steps": 0,
        "checkpoint_every_steps": steps,
        "log_every_steps": max(steps // 20, 1),
        **SUITE_SETTINGS[suite],
        **overrides,
    }
    if warmup_steps is not None:
        settings["optim.warmup_steps"] = warmup_steps
    settings.update(item.split("=", 1) for item in extra)
    args += [f"--config.{key}={value}" for key, value in settings.items()]
    workdir.parent.mkdir(parents=True, exist_ok=True)
    timing = workdir.parent / f"{workdir.name}.train_seconds"
    if timing.exists():  # trained by an interrupted study: keep the time of that training
        return float(timing.read_text())
    seconds = run_command(args, workdir.parent / f"{workdir.name}.log")
    timing.write_text(f"{seconds:.1f}")
    return seconds


def score_toy2d(workdir: Path) -> dict:
    """Sliced Wasserstein-2 distance of 2,000 samples at each budget, with floor and ceiling."""
    import jax
    import numpy as np

    from shortcut_jax import checkpoint, models, objectives, sampling, steps
    from shortcut_jax.data import toy2d

    config, state = checkpoint.load_run(str(workdir))
    data = toy2d.sample_toy(config.data.toy_name, 2000, np.random.default_rng(123))
    apply_fn = steps.make_apply_fn(models.get_model(config))
    scores = {}
    for num_steps in STEP_COUNTS:
        samples, _ = sampling.sample_batch(
            apply_fn,
            state.ema_params,
            jax.random.PRNGKey(7),
            num=len(data),
            shape=(config.data.dim,),
            num_steps=num_steps,
            denoise_timesteps=config.denoise_timesteps,
            objective=objectives.ObjectiveConfig.from_config(config),
        )
        scores[str(num_steps)] = sliced_wasserstein(np.asarray(samples), data)
    other = toy2d.sample_toy(config.data.toy_name, 2000, np.random.default_rng(9))
    return {
        "sw2": scores,
        "sw2_floor": sliced_wasserstein(other, data),
        "sw2_ceiling": sliced_wasserstein(np.zeros_like(data), data),
    }


def sliced_wasserstein(a, b, num_projections: int = 256) -> float:
    """SW2 distance between two equally sized point clouds (N, D)."""
    import numpy as np

    directions = np.random.default_rng(0).normal(size=(num_projections, a.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    projected_a = np.sort(a @ directions.T, axis=0)
    projected_b = np.sort(b @ directions.T, axis=0)
    return float(np.sqrt(np.mean((projected_a - projected_b) ** 2)))


def evaluate(workdir: Path, metric: str, steps: tuple[int, ...], num: int, cache: Path, cfg):
    """One python -m shortcut_jax.evaluate call; returns (its results.json, wall seconds)."""
    out = workdir / f"eval_study_{metric}"
    guidance = [] if cfg is None else [f"--cfg={cfg}"]
    seconds = run_command(
        [
            "-m",
            "shortcut_jax.evaluate",
            f"--workdir={workdir}",
            f"--steps={','.join(str(n) for n in steps)}",
            f"--num={num}",
            f"--metrics={metric}",
            f"--out={out}",
            f"--cache_dir={cache}",
            *guidance,
        ],
        workdir.parent / f"{workdir.name}_eval_{metric}.log",
    )
    return json.loads((out / "results.json").read_text()), seconds


def score_mnist(
    workdir: Path, num: int, fid_num: int, cache: Path, cfg: float | None = None
) -> dict:
    """FD-MNIST of `num` samples at every budget and FID of `fid_num` at FID_STEPS.

    FID is the expensive one here: Inception features run at about 8 images/s on these machines
    (299 x 299 inputs), so it is scored on fewer samples and at the paper's end points only.
    """
    scores: dict = {"eval_seconds": 0.0, "metrics": {}, "eval_settings": {}}
    for metric, steps, count in (("fd_mnist", STEP_COUNTS, num), ("fid", FID_STEPS, fid_num)):
        result, seconds = evaluate(workdir, metric, steps, count, cache, cfg)
        scores["eval_seconds"] += seconds
        scores["metrics"].update(result["metrics"])
        scores["eval_settings"][metric] = result["settings"]
        scores[metric] = {str(row["steps"]): row[metric] for row in result["rows"]}
        scores[f"{metric}_nfe"] = {str(row["steps"]): row["nfe"] for row in result["rows"]}
    return scores


def run_study(args: argparse.Namespace) -> None:
    """Trains and scores every method not yet in the results file."""
    results_path = Path(args.results_dir) / f"objectives_{args.suite}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    work = Path(args.workdir) / args.suite
    budget = args.budget
    half = budget // 2
    names = args.only.split(",") if args.only else list(METHODS)
    for name in names:
        if name in results and not args.rerun:
            print(f"{name}: done already", flush=True)
            continue
        objective, needs_teacher, overrides = METHODS[name]
        entry: dict = {"objective": objective, "budget": budget, "overrides": args.set}
        overrides = {"objective": objective, **overrides}
        if needs_teacher:
            teacher = work / "teacher_flow_matching"
            if "_teacher" not in results:
                print(f"teacher: training {half} flow-matching steps", flush=True)
                seconds = train(
                    args.suite,
                    teacher,
                    half,
                    {"objective": "flow_matching"},
                    args.warmup_steps,
                    tuple(args.set),
                )
                results["_teacher"] = {"train_seconds": seconds, "steps": half}
                _write(results_path, results)
            entry["teacher_steps"] = half
            entry["student_steps"] = budget - half
            steps = budget - half
            if name == "reflow":
                pairs_dir = work / "reflow_pairs"
                started = time.perf_counter()
                run_command(
                    [
                        "-m",
                        "shortcut_jax.tools.reflow_pairs",
                        f"--workdir={teacher}",
                        f"--out={pairs_dir}",
                        f"--num={args.pairs}",
                        f"--steps={args.pair_steps}",
                    ],
                    work / "reflow_pairs.log",
                )
                entry["pairs"] = {
                    "num": args.pairs,
                    "steps": args.pair_steps,
                    "seconds": time.perf_counter() - started,
                }
                overrides["data.pairs_dir"] = str(pairs_dir)
            else:
                overrides["teacher.workdir"] = str(teacher)
        else:
            entry["student_steps"] = steps = budget
        print(f"{name}: training {steps} steps", flush=True)
        entry["train_seconds"] = train(
            args.suite, work / name, steps, overrides, args.warmup_steps, tuple(args.set)
        )
        print(f"{name}: scoring", flush=True)
        if args.suite == "toy2d":
            entry.update(score_toy2d(work / name))
        else:
            entry.update(
                score_mnist(work / name, args.num, args.fid_num, work / "feature_cache", args.cfg)
            )
        entry["date"] = time.strftime("%Y-%m-%d %H:%M")
        results[name] = entry
        _write(results_path, results)
        print(f"{name}: {json.dumps({k: entry.get(k) for k in ('sw2', 'fd_mnist', 'fid')})}")
    plot(args.suite, results, Path(args.figures_dir))


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def _metrics(suite: str) -> list[tuple[str, str]]:
    if suite == "toy2d":
        return [("sw2", "sliced Wasserstein-2 to the data")]
    return [("fd_mnist", "FD-MNIST"), ("fid", "FID (Inception)")]


def plot(suite: str, results: dict, figures: Path = FIGURES) -> Path:
    """Score versus network evaluations per guidance branch, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(suite)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        for name in METHODS:
            if name not in results or metric not in results[name]:
                continue
            values = results[name][metric]
            style = "-" if name in END_TO_END else "--"
            ax.plot(
                [n for n in STEP_COUNTS if str(n) in values],
                [values[str(n)] for n in STEP_COUNTS if str(n) in values],
                style,
                marker="o",
                label=name,
            )
        floor = next(
            (r.get(f"{metric}_floor") for r in results.values() if f"{metric}_floor" in r), None
        )
        if floor is None:
            floor = next(
                (r["metrics"][metric]["floor"] for r in results.values() if "metrics" in r), None
            )
        if floor is not None:
            ax.axhline(floor, color="gray", lw=0.8, ls=":", label="floor (real vs real)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(STEP_COUNTS, [str(n) for n in STEP_COUNTS])
        ax.set_xlabel("sampling steps (network evaluations per guidance branch)")
        ax.set_ylabel(title + " (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    budget = next((r["budget"] for r in results.values() if "budget" in r), "?")
    fig.suptitle(f"{suite}: every objective at {budget} gradient steps (dashed: distillation)")
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / f"objectives_{suite}.png"
    fig.savefig(path, dpi=110)
    return path


def report(suite: str, results_dir: Path = RESULTS) -> str:
    """Markdown tables of one suite's results, the best method per step count in bold."""
    results = json.loads((results_dir / f"objectives_{suite}.json").read_text())
    header = " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in STEP_COUNTS)
    digits = 3 if suite == "toy2d" else 1
    lines = []
    for metric, title in _metrics(suite):
        rows = [name for name in METHODS if metric in results.get(name, {})]
        measured = [n for n in STEP_COUNTS if all(str(n) in results[r][metric] for r in rows)]
        best = {n: min(results[name][metric][str(n)] for name in rows) for n in measured}
        lines += [
            f"{title} (lower is better; bold: the best method at that step count):",
            "",
            f"| method | gradient steps | train wall | {header} |",
            "|---" * (3 + len(STEP_COUNTS)) + "|",
        ]
        for name in rows:
            r = results[name]
            two_stage = "teacher_steps" in r
            steps = f"{r['teacher_steps']} teacher + {r['student_steps']}" if two_stage else ""
            wall = r["train_seconds"]
            if two_stage:
                wall += results["_teacher"]["train_seconds"] + r.get("pairs", {}).get("seconds", 0)
            cells = []
            for n in STEP_COUNTS:
                if n not in best:
                    cells.append("")
                    continue
                value = r[metric][str(n)]
                text = f"{value:.{digits}f}"
                cells.append(f"**{text}**" if value == best[n] else text)
            lines.append(
                f"| {name} | {steps or r['student_steps']} | {wall / 60:.1f} min | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--budget", type=int, default=None, help="gradient steps per method")
    parser.add_argument("--num", type=int, default=400, help="mnist: FD-MNIST samples per budget")
    parser.add_argument("--fid_num", type=int, default=200, help="mnist: FID samples per budget")
    parser.add_argument(
        "--cfg", type=float, default=1.0, help="mnist: guidance scale (1 = none, as every method)"
    )
    parser.add_argument("--pairs", type=int, default=None, help="reflow pairs (default per suite)")
    parser.add_argument("--pair_steps", type=int, default=None, help="teacher steps per pair")
    parser.add_argument(
        "--warmup_steps", type=int, default=None, help="default: the config's (200)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a config override for every run, e.g. --set ema_rate=0.99 (repeatable)",
    )
    parser.add_argument("--only", default="", help="comma list of methods (default: all)")
    parser.add_argument("--rerun", action="store_true", help="rerun methods already scored")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "objectives_study"))
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument("--figures_dir", default=str(FIGURES))
    parser.add_argument("--report", action="store_true", help="print the Markdown tables")
    args = parser.parse_args()
    if args.report:
        print(report(args.suite, Path(args.results_dir)))
        return
    defaults = {"toy2d": (3000, 20_000, 128), "mnist": (2000, 4096, 32)}[args.suite]
    args.budget = args.budget or defaults[0]
    args.pairs = args.pairs or defaults[1]
    args.pair_steps = args.pair_steps or defaults[2]
    run_study(args)


if __name__ == "__main__":
    main()
