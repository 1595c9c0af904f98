"""Reproduction study: every method of the paper's comparison at the compute of the default run.

    python benchmarks/objectives_study.py --suite mnist --plan           # FLOPs -> steps (once)
    python benchmarks/objectives_study.py --suite mnist --seeds 0,1      # every run not yet done
    python benchmarks/objectives_study.py --suite mnist --only meanflow --seeds 1   # one run
    python benchmarks/objectives_study.py --suite mnist --report         # tables for BENCHMARKS.md

Equal compute, in FLOPs. `--plan` compiles every method's train step for the suite's config and
counts its FLOPs per step from the compiled program (`method_flops`: XLA's cost analysis, loops
counted per trip), so the count holds the student's forward and backward passes, teacher
evaluations, JVPs and guidance branches. The budget is the suite's default run: the shortcut
objective for the config's own total_steps (experiments/mnist.py: 7,000 steps). Every one-stage
method gets the steps that spend the same FLOPs. A two-stage method spends half the budget on its
flow-matching teacher (one teacher run per seed, shared by the three, each charged in full) and
the other half on its student; reflow first spends a third of that half drawing its
noise/sample pairs from the teacher (`PAIR_STEPS` Euler steps each, as many pairs as that third
pays for). The plan is written to benchmarks/results/objectives/<suite>/plan.json.

Settings. Each method's objective settings come from its own paper (`shortcut_jax.paper_settings`,
which also lists every way they differ); everything else is the suite config's (network, batch,
AdamW, learning rate, cosine schedule over each run's own steps, warm-up, EMA 0.999 on MNIST).

Scores, at 1, 2, 4, 8 and 128 sampling steps (network evaluations per guidance branch; each
method's own sampler; EMA parameters; unguided, as every student learns unguided teachers):
- toy2d: sliced Wasserstein-2 of 2,000 samples to 2,000 fresh points, with its floor and ceiling;
- mnist: FD-MNIST of 1,000 samples at every step count and FID of 1,000 at 1 and 128 steps
  (`python -m shortcut_jax.evaluate`), against the 5,000 digits.

Every (method, seed) run writes its own result file benchmarks/results/objectives/<suite>/
<method>_seed<k>.json holding the exact commands it ran (the work directory written as $WORK),
the plan's digest, its FLOPs, wall times, the machine's float32 matmul rate and its scores. A run
whose file exists is skipped, so the study adds up over several sittings. `--report` assembles
the tables from those files only and refuses any file whose commands or plan differ from what
this script would run now, or whose scores come from other feature-network weights than the
rest (FD-MNIST's classifier ships with the package for this reason).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import study_runs  # noqa: E402

from shortcut_jax import paper_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "objectives"
FIGURES = ROOT / "docs" / "benchmarks"
STEP_COUNTS = (1, 2, 4, 8, 128)
FID_STEPS = (1, 128)
PAIR_STEPS = 32  # Euler steps of the teacher behind each reflow pair
PAIR_SHARE = 1 / 3  # of the student's half of the budget that reflow spends drawing pairs
TEACHER = "flow_matching"
ORDER = (
    "shortcut",
    "flow_matching",
    "diffusion",
    "consistency_training",
    "improved_consistency_training",
    "live_reflow",
    "meanflow",
    "progressive_distillation",
    "consistency_distillation",
    "reflow",
)
SUITES = {
    "toy2d": {"config": "experiments/toy2d.py", "seeds": (0,), "num": 2000},
    "mnist": {"config": "experiments/mnist.py", "seeds": (0, 1), "num": 1000, "fid_num": 1000},
}


class StudyError(RuntimeError):
    """A result file or plan that cannot be used; the message names the file."""


# --------------------------------------------------------------------------------------- plan
def suite_config(suite: str, overrides: dict[str, Any] | None = None) -> Any:
    """The suite's config file with `overrides`, as the training CLI builds it."""
    return study_runs.load_config(overrides or {}, ROOT / SUITES[suite]["config"])


def method_config(suite: str, method: str) -> Any:
    """The suite config with the method's objective and its paper's settings."""
    return paper_settings.apply(suite_config(suite), method)


def make_plan(suite: str, methods: tuple[str, ...], reference_steps: int | None) -> dict:
    """FLOPs per train step of every method and the steps that spend the reference budget."""
    import jax
    import method_flops

    base = suite_config(suite)
    reference_steps = int(reference_steps or base.total_steps)
    flops = {}
    for name in dict.fromkeys(("shortcut", TEACHER, *methods)):
        started = time.perf_counter()
        flops[name] = method_flops.train_step_flops(method_config(suite, name))
        print(
            f"plan: {name} {flops[name] / 1e9:.3f} GFLOP per step "
            f"({time.perf_counter() - started:.0f} s to compile)",
            flush=True,
        )
    forward = method_flops.forward_flops(base, 1)
    budget = reference_steps * flops["shortcut"]
    runs: dict[str, dict[str, Any]] = {}
    teacher_steps = max(1, round(budget / 2 / flops[TEACHER]))
    for name in methods:
        if not paper_settings.get(name).two_stage:
            runs[name] = {"steps": max(1, round(budget / flops[name]))}
            continue
        half = budget - teacher_steps * flops[TEACHER]
        entry: dict[str, Any] = {"teacher_steps": teacher_steps}
        if name == "reflow":
            pairs = int(half * PAIR_SHARE / (PAIR_STEPS * forward))
            entry["pairs"] = {"num": pairs, "steps": PAIR_STEPS}
            half -= pairs * PAIR_STEPS * forward
        entry["steps"] = max(1, round(half / flops[name]))
        runs[name] = entry
    plan = {
        "suite": suite,
        "config": SUITES[suite]["config"],
        "reference": {"method": "shortcut", "steps": reference_steps},
        "budget_flops": budget,
        "flops_per_step": flops,
        "forward_flops_per_example": forward,
        "runs": runs,
        "jax_version": jax.__version__,
    }
    plan["digest"] = digest(plan)
    return plan


def digest(plan: dict) -> str:
    """A short hash of the plan's content (everything but the digest itself)."""
    content = {key: value for key, value in plan.items() if key != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_plan(results: Path) -> dict:
    """The suite's plan.json, checked against its digest."""
    path = results / "plan.json"
    if not path.exists():
        raise StudyError(f"{path} is missing: run this script with --plan first")
    plan = json.loads(path.read_text())
    if plan.get("digest") != digest(plan):
        raise StudyError(f"{path} was edited after it was written (its digest does not match)")
    return plan


# ------------------------------------------------------------------------------------ commands
# Where the report rebuilds the commands it checks recorded ones against (any unused path).
CHECK_WORK = Path("/objectives-study-work")


def _shown(command: list[str], work: Path) -> list[str]:
    """A command as recorded: 'python', the work directory as $WORK, repository paths relative."""
    shown = ["python"]
    for part in command[1:]:
        shown.append(part.replace(str(work), "$WORK").replace(str(ROOT) + "/", ""))
    return shown


@functools.cache
def suite_setting(suite: str, field: str) -> Any:
    """One field of the suite config, dotted (e.g. 'optim.warmup_steps'; read once per suite)."""
    node = suite_config(suite)
    for part in field.split("."):
        node = node[part]
    return node


def train_overrides(suite: str, method: str, steps: int, seed: int) -> dict[str, Any]:
    """The --config overrides of one training run: its paper's settings, steps and seed."""
    spec = paper_settings.get(method)
    warmup = int(suite_setting(suite, "optim.warmup_steps"))
    return {
        "objective": spec.objective,
        **spec.overrides,
        "total_steps": steps,
        "optim.warmup_steps": min(warmup, steps // 5),  # the config's, unless the run is tiny
        "seed": seed,
        "sample_every_steps": 0,
        "eval_every_steps": 0,
        "checkpoint_every_steps": steps,
        "log_every_steps": max(steps // 20, 1),
    }


def student_ema_rate(suite: str, reference_steps: int, steps: int) -> float:
    """The sampling EMA rate of a student that starts as its teacher, run for `steps` steps.

    Its horizon 1 / (1 - rate) is the same fraction of its run as the suite's rate gives the
    reference run (MNIST: 1,000 of 7,000 steps). At the suite's rate a student run a third as
    long keeps a blend of the teacher's copy it started from (0.999^2045 = 13 % for consistency
    distillation) and lags a third of its run behind; these students' own papers average over a
    small fraction of far longer runs.
    """
    rate = float(suite_setting(suite, "ema_rate"))
    return max(0.0, round(1.0 - (1.0 - rate) * reference_steps / max(steps, 1), 4))


def run_commands(plan: dict, suite: str, method: str, seed: int, work: Path) -> list[dict]:
    """The commands of one (method, seed) run, in order: [{'role', 'command', 'workdir'}]."""
    config = ROOT / SUITES[suite]["config"]
    entry = plan["runs"][method]
    steps: list[dict] = []
    run_dir = work / f"{method}_seed{seed}"
    overrides = train_overrides(suite, method, entry["steps"], seed)
    if "teacher_steps" in entry:
        if "ema_rate" not in paper_settings.get(method).overrides:
            reference = plan["reference"]["steps"]
            overrides["ema_rate"] = student_ema_rate(suite, reference, entry["steps"])
        teacher = work / f"teacher_seed{seed}"
        steps.append(
            {
                "role": "teacher",
                "workdir": teacher,
                "command": study_runs.train_command(
                    teacher, train_overrides(suite, TEACHER, entry["teacher_steps"], seed), config
                ),
            }
        )
        if "pairs" in entry:
            pairs_dir = work / f"reflow_pairs_seed{seed}"
            command = [sys.executable, "-m", "shortcut_jax.tools.reflow_pairs"]
            command += [f"--workdir={teacher}", f"--out={pairs_dir}", f"--seed={seed}"]
            command += [f"--num={entry['pairs']['num']}", f"--steps={entry['pairs']['steps']}"]
            steps.append({"role": "pairs", "workdir": pairs_dir, "command": command})
            overrides["data.pairs_dir"] = str(pairs_dir)
            overrides["init_from"] = str(teacher)  # 2-rectified flow fine-tunes the teacher
        else:
            overrides["teacher.workdir"] = str(teacher)
    steps.append(
        {
            "role": "train",
            "workdir": run_dir,
            "command": study_runs.train_command(run_dir, overrides, config),
        }
    )
    if suite == "mnist":
        for metric, counts, num in (
            ("fd_mnist", STEP_COUNTS, SUITES[suite]["num"]),
            ("fid", FID_STEPS, SUITES[suite]["fid_num"]),
        ):
            out = run_dir / f"eval_{metric}"
            command = study_runs.evaluate_command(
                run_dir, out, counts, num, work / "feature_cache", metrics=metric, cfg=1.0
            )
            steps.append({"role": f"eval_{metric}", "workdir": out, "command": command})
    return steps


def recorded_commands(plan: dict, suite: str, method: str, seed: int, work: Path) -> list:
    """The commands of a run as its result file records them."""
    return [_shown(step["command"], work) for step in run_commands(plan, suite, method, seed, work)]


# ----------------------------------------------------------------------------------------- run
def run_one(plan: dict, suite: str, method: str, seed: int, work: Path, results: Path) -> dict:
    """Runs (or reuses the finished stages of) one (method, seed) and writes its result file."""
    work.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    untimed = 0
    for step in run_commands(plan, suite, method, seed, work):
        workdir, role = Path(step["workdir"]), step["role"]
        done = workdir.with_name(workdir.name + ".done.json")
        if done.exists():  # a shared teacher or pairs, or a stage of an interrupted run
            timing = json.loads(done.read_text())
        else:
            print(f"{method} seed {seed}: {role}", flush=True)
            log = workdir.with_name(workdir.name + ".log")
            # Training and pairs resume where a cut-off sitting stopped: their time adds up.
            timing = study_runs.run_timed(
                step["command"], log, resumable=not role.startswith("eval")
            )
            _write_json(done, timing)
        walls[role] = timing["wall_seconds"]
        untimed += _untimed_sittings(workdir, timing)
    entry = plan["runs"][method]
    flops = plan["flops_per_step"]
    spent = {"student": entry["steps"] * flops[method]}
    if "teacher_steps" in entry:
        spent["teacher"] = entry["teacher_steps"] * flops[TEACHER]
    if "pairs" in entry:
        pairs = entry["pairs"]
        spent["pairs"] = pairs["num"] * pairs["steps"] * plan["forward_flops_per_example"]
    result = {
        "suite": suite,
        "method": method,
        "seed": seed,
        "plan_digest": plan["digest"],
        "commands": recorded_commands(plan, suite, method, seed, work),
        "steps": entry["steps"],
        "teacher_steps": entry.get("teacher_steps"),
        "pairs": entry.get("pairs"),
        "flops": {**spent, "total": sum(spent.values())},
        "wall_seconds": walls,
        "train_wall_seconds": sum(v for k, v in walls.items() if not k.startswith("eval")),
        "untimed_sittings": untimed,
        "scores": score(suite, work / f"{method}_seed{seed}"),
        "matmul_gflops": _run_matmul_gflops(work / f"{method}_seed{seed}.matmul.json"),
        "commit": study_runs.config_commit(ROOT / SUITES[suite]["config"]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    _write_json(results / f"{method}_seed{seed}.json", result)
    return result


def score(suite: str, run_dir: Path) -> dict[str, Any]:
    """The run's scores: SW2 on toy2d; FD-MNIST and FID (from evaluate's results) on MNIST."""
    if suite == "toy2d":
        return score_toy2d(run_dir)
    scores: dict[str, Any] = {}
    for metric in ("fd_mnist", "fid"):
        rows = study_runs.evaluation_rows(run_dir / f"eval_{metric}")
        scores[metric] = {str(n): row[metric] for n, row in sorted(rows.items())}
        described = study_runs.evaluation_metrics(run_dir / f"eval_{metric}")[metric]
        scores[f"{metric}_floor"] = described.get("floor")
        scores[f"{metric}_ceiling"] = described.get("ceiling")
        scores[f"{metric}_weights"] = described.get("weights_digest")
    return scores


def score_toy2d(run_dir: Path) -> dict[str, Any]:
    """Sliced Wasserstein-2 distance of 2,000 samples at each step count, floor and ceiling."""
    import jax
    import numpy as np

    from shortcut_jax import checkpoint, models, objectives, sampling, steps
    from shortcut_jax.data import toy2d

    config, state = checkpoint.load_run(str(run_dir))
    data = toy2d.sample_toy(config.data.toy_name, 2000, np.random.default_rng(123))
    apply_fn = steps.make_apply_fn(models.get_model(config))
    sw2 = {}
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
        sw2[str(num_steps)] = sliced_wasserstein(np.asarray(samples), data)
    other = toy2d.sample_toy(config.data.toy_name, 2000, np.random.default_rng(9))
    return {
        "sw2": sw2,
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


def _untimed_sittings(workdir: Path, timing: Mapping[str, Any]) -> int:
    """Sittings of a training run that started (its starts.json) but were not timed.

    Runs timed before the studies kept a ledger across sittings recorded only their last one.
    """
    starts = workdir / "starts.json"
    if not starts.exists():
        return 0
    return max(0, len(json.loads(starts.read_text())) - int(timing.get("sittings", 1)))


def _run_matmul_gflops(path: Path) -> float:
    """The matmul rate measured when the run finished, kept so a rewritten result reuses it."""
    if path.exists():
        return float(json.loads(path.read_text())["matmul_gflops"])
    rate = _matmul_gflops()
    _write_json(path, {"matmul_gflops": rate, "date": time.strftime("%Y-%m-%d %H:%M")})
    return rate


def _matmul_gflops() -> float:
    import matmul_benchmark

    return round(matmul_benchmark.matmul_rate(2048, 5)["gflops_median"], 1)


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str))
    tmp.replace(path)


# -------------------------------------------------------------------------------------- report
def check_same_networks(results: list[tuple[Path, dict]]) -> None:
    """Refuses results scored by other feature-network weights than the first file's.

    Raises:
      StudyError: naming both files, the floors and the weights digests.
    """
    scored = [
        (
            str(path),
            {
                metric: {
                    "floor": result["scores"].get(f"{metric}_floor"),
                    "weights_digest": result["scores"].get(f"{metric}_weights"),
                }
                for metric in ("fd_mnist", "fid")
            },
        )
        for path, result in results
    ]
    problems = study_runs.network_mismatches(scored)
    if problems:
        raise StudyError(problems[0] + " (delete the file and its eval_* directories)")


def load_results(results: Path, plan: dict, work: Path = CHECK_WORK) -> dict[str, list[dict]]:
    """{method: [result per seed]} of every result file, each checked against this script.

    Raises:
      StudyError: a file ran with another plan or other commands than this script would run, or
        was scored by another feature network than the others (`check_same_networks`).
    """
    suite = plan["suite"]
    found: dict[str, list[dict]] = {}
    loaded = [(path, json.loads(path.read_text())) for path in sorted(results.glob("*_seed*.json"))]
    check_same_networks(loaded)
    for path, result in loaded:
        method, seed = result["method"], result["seed"]
        if result.get("plan_digest") != plan["digest"]:
            raise StudyError(
                f"{path}: ran with plan {result.get('plan_digest')}, not the current plan "
                f"{plan['digest']} ({results / 'plan.json'}): rerun it or restore that plan"
            )
        if method not in plan["runs"]:
            raise StudyError(f"{path}: method {method!r} is not in the plan")
        expected = recorded_commands(plan, suite, method, seed, work)
        if result.get("commands") != expected:
            recorded = result.get("commands") or []
            diff = next(
                (
                    (i, a, b)
                    for i, (a, b) in enumerate(zip(recorded, expected, strict=False))
                    if a != b
                ),
                (len(expected), recorded[len(expected) :], expected[len(recorded) :]),
            )
            raise StudyError(
                f"{path}: its commands differ from what this script runs now (command "
                f"{diff[0]}: recorded {diff[1]} vs now {diff[2]}): rerun it"
            )
        found.setdefault(method, []).append(result)
    return found


def _cell(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def _flops_text(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.1f} GFLOP"


def report(suite: str, results: Path) -> str:
    """Markdown: the commands, then a table per metric (mean ± half the seeds' range)."""
    plan = load_plan(results)
    found = load_results(results, plan)
    metrics = (
        [("sw2", "sliced Wasserstein-2 to the data", 3)]
        if suite == "toy2d"
        else [("fd_mnist", "FD-MNIST", 1), ("fid", "FID (Inception)", 1)]
    )
    seeds = sorted({r["seed"] for rows in found.values() for r in rows})
    lines = [
        f"Plan {plan['digest']}: budget {_flops_text(plan['budget_flops'])} = "
        f"{plan['reference']['steps']} shortcut steps; seeds {seeds}.",
        "",
        "```bash",
        f"python benchmarks/objectives_study.py --suite {suite} --plan",
        f"python benchmarks/objectives_study.py --suite {suite} --seeds "
        + ",".join(map(str, seeds)),
        f"python benchmarks/objectives_study.py --suite {suite} --report",
        "```",
        "",
    ]
    header = " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in STEP_COUNTS)
    for metric, title, digits in metrics:
        rows = [m for m in ORDER if m in found and metric in found[m][0]["scores"]]
        if not rows:
            continue
        means = {
            m: {
                n: statistics.fmean(r["scores"][metric][str(n)] for r in found[m])
                for n in STEP_COUNTS
                if all(str(n) in r["scores"][metric] for r in found[m])
            }
            for m in rows
        }
        best = {
            n: min(means[m][n] for m in rows if n in means[m])
            for n in STEP_COUNTS
            if any(n in means[m] for m in rows)
        }
        lines += [
            f"{title} (lower is better; mean ± half the range over seeds; bold: the best mean):",
            "",
            "| method | gradient steps | training FLOPs | train wall (matmul GFLOP/s) | "
            f"{header} |",
            "|---" * (4 + len(STEP_COUNTS)) + "|",
        ]
        for m in rows:
            first = found[m][0]
            steps = str(first["steps"])
            if first.get("teacher_steps"):
                steps = f"{first['teacher_steps']} teacher + {first['steps']}"
            walls = ", ".join(
                f"{'≥ ' if r.get('untimed_sittings') else ''}"
                f"{r['train_wall_seconds'] / 60:.1f} min ({r['matmul_gflops']:.0f})"
                for r in found[m]
            )
            cells = []
            for n in STEP_COUNTS:
                if n not in means[m]:
                    cells.append("")
                    continue
                text = _cell([r["scores"][metric][str(n)] for r in found[m]], digits)
                cells.append(f"**{text}**" if means[m][n] == best[n] else text)
            lines.append(
                f"| {m} | {steps} | {_flops_text(first['flops']['total'])} | {walls} | "
                + " | ".join(cells)
                + " |"
            )
        floor = first["scores"].get(f"{metric}_floor")
        ceiling = first["scores"].get(f"{metric}_ceiling")
        if floor is not None:
            lines += ["", f"floor {floor:.{digits}f}, ceiling {ceiling:.{digits}f}"]
        lines.append("")
    rates = sorted({r["matmul_gflops"] for rows in found.values() for r in rows})
    lines.append(
        f"Train wall: each seed's teacher, pairs and training time, with the float32 matmul rate "
        f"of its machine measured after the run ({rates[0]}-{rates[-1]} GFLOP/s); runs on other "
        "machines or sittings compare only through those rates."
    )
    if any(r.get("untimed_sittings") for rows in found.values() for r in rows):
        lines[-1] += (
            " ≥: a run cut off and resumed before the study timed every sitting; the wall is its "
            "timed sittings only."
        )
    lines += ["", "Settings that differ from each method's paper:", ""]
    lines.append(f"- every method: {paper_settings.SHARED_DEVIATION}")
    for m in ORDER:
        if m in found:
            for deviation in paper_settings.get(m).deviations:
                lines.append(f"- {m}: {deviation}")
    if "reflow" in found:
        pairs = plan["runs"]["reflow"]["pairs"]
        lines.append(
            f"- reflow: {pairs['num']} pairs of {pairs['steps']} Euler teacher steps (a third of "
            "its student half of the budget), not an adaptive high-accuracy ODE solver"
        )
    return "\n".join(lines)


def plot(suite: str, results: Path, figures: Path) -> Path:
    """Score against sampling steps, one line per method (dashed: two-stage), seed means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = load_plan(results)
    found = load_results(results, plan)
    metrics = ["sw2"] if suite == "toy2d" else ["fd_mnist", "fid"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for m in ORDER:
            if m not in found or metric not in found[m][0]["scores"]:
                continue
            counts = [n for n in STEP_COUNTS if str(n) in found[m][0]["scores"][metric]]
            means = [
                statistics.fmean(r["scores"][metric][str(n)] for r in found[m]) for n in counts
            ]
            style = "--" if paper_settings.get(m).two_stage else "-"
            ax.plot(counts, means, style, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(STEP_COUNTS, [str(n) for n in STEP_COUNTS])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{suite}: every method at {_flops_text(plan['budget_flops'])} of training")
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / f"objectives_{suite}.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--plan", action="store_true", help="measure FLOPs and write plan.json")
    parser.add_argument(
        "--reference_steps",
        type=int,
        default=None,
        help="--plan: the shortcut steps that set the budget (default: the config's total_steps)",
    )
    parser.add_argument("--only", default="", help="comma list of methods (default: all)")
    parser.add_argument("--seeds", default="", help="comma list (default: the suite's)")
    parser.add_argument("--report", action="store_true", help="print the Markdown tables")
    parser.add_argument("--plot", action="store_true", help="write the figure")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "objectives_study"))
    parser.add_argument("--results_dir", default=None, help=f"default: {RESULTS}/<suite>")
    parser.add_argument("--figures_dir", default=str(FIGURES))
    args = parser.parse_args(argv)
    results = Path(args.results_dir) if args.results_dir else RESULTS / args.suite
    methods = tuple(args.only.split(",")) if args.only else ORDER
    for method in methods:
        paper_settings.get(method)
    try:
        if args.plan:
            plan = make_plan(args.suite, methods, args.reference_steps)
            _write_json(results / "plan.json", plan)
            print(json.dumps(plan["runs"], indent=1))
            return
        if args.report:
            print(report(args.suite, results))
            return
        if args.plot:
            print(plot(args.suite, results, Path(args.figures_dir)))
            return
        plan = load_plan(results)
        seeds = (
            [int(s) for s in args.seeds.split(",")] if args.seeds else SUITES[args.suite]["seeds"]
        )
        work = Path(args.workdir) / args.suite
        for seed in seeds:
            for method in methods:
                if method not in plan["runs"]:
                    raise StudyError(f"method {method!r} is not in {results / 'plan.json'}")
                if (results / f"{method}_seed{seed}.json").exists():
                    print(f"{method} seed {seed}: done already", flush=True)
                    continue
                result = run_one(plan, args.suite, method, seed, work, results)
                print(f"{method} seed {seed}: {json.dumps(result['scores'])}", flush=True)
    except StudyError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
