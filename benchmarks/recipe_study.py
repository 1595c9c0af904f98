"""Recipe study (issue 24): few-step quality of MNIST recipes trained for the default's wall time.

    python benchmarks/recipe_study.py --phase screen --workdir /tmp/recipe   # every variant, 1 seed
    python benchmarks/recipe_study.py --phase screen --workdir /tmp/recipe --only default batch_16
    python benchmarks/recipe_study.py --phase full --workdir /tmp/recipe --only default NAME \
        --combine NAME+OTHER                                     # 2 seeds each, full budget
    python benchmarks/recipe_study.py --phase screen --report    # the table, from the result files
    python benchmarks/recipe_study.py --plot docs/benchmarks     # FD against steps and minutes
    python benchmarks/recipe_study.py --list                     # the variants and their overrides
    python benchmarks/recipe_study.py --quick --workdir /tmp/q   # smoke run (~1 min)

Every variant is a named set of overrides of `experiments/mnist.py` (`VARIANTS`); it is trained by
`python -m shortcut_jax.main` and scored by `python -m shortcut_jax.evaluate`, as a user would.

Equal wall time, not equal steps. The machines drift (+-20 % over minutes) and are shared, so a
wall-clock deadline would measure the machine's load, not the recipe. Instead each variant's step
cost is measured against the default's back to back: both train steps are built as the train loop
builds them, compiled, then timed in alternating bursts (A B, B A, ...; `study_runs.time_configs`,
one process; the compiled step on a random batch of the config's shape: the data pipeline's host
work, small next to the step on MNIST, is not timed), and the variant trains

    steps = default_steps x t_default / t_variant

so "the default's wall time" means the default's steps converted through measured per-step cost
(a variant that is slower per step gets fewer). default_steps is experiments/mnist.py's
total_steps times the phase's budget fraction (a quarter to screen, all of it in the full phase);
the fields counted in steps (warm-up, EMA rates: `BUDGET_SCALED`) are scaled with the fraction, so
a screening run has the full run's schedule shape (`scaled_to_budget`). A variant that changes
only elementwise work of the step (learning rate, schedule, EMA rate, level draws and weights,
flow times, loss kind: `STEP_COST_NEUTRAL`) runs the default's program and gets its steps untimed.
Both step times, their ratio, every burst and the machine's float32 matmul rate
(`matmul_benchmark.matmul_rate`, before and after the timing) go into the result file. Only the
timing needs the machine to itself, not the training: `--calibrate_only` measures the step times
of every selected run in one quiet spell and keeps them in each run's directory and in
benchmarks/results/recipe_study/<phase>/calibration/<variant>.json (commit these: a later sitting on
a new machine, whose --workdir starts empty, reuses them), and the runs read them later, even
while another job shares the machine. A two-phase
variant (flow matching first, then shortcut from it via config.init_from) splits the same budget:
phase 1 gets fraction f of it converted through the flow-matching step's cost, phase 2 the rest
converted through its own. Sampling and scoring cost is not part of the budget; sampling-only
variants (guidance policy, raw parameters) score the default's run of the same phase and seed.

Screen every variant at a quarter of the budget with one seed (`--phase screen`), then run the
best few, alone and combined (`--combine a+b`), at the full budget with 2 seeds (`--phase full`;
the report gives mean ± half the range). Give --workdir outside the repository.

Scoring. FD-MNIST of 1,000 samples (`--num`) at 1, 2, 4, 8 and 128 steps (sampling seed 0) and
FID of the 1-step samples (the FID Inception weights are needed). The guidance scale of each step
count is tuned first on a separate sample set (sampling seed 1, `--tune_num` = 250 samples, the
scales `--cfg_grid` = 1, 1.5, 2, 3, 4.5, 6, 8, FD-MNIST: the same noise at every scale, so the
comparison is paired) and the scores use the tuned scale; both are reported (a scale at the top of
the grid is marked: the best may lie beyond it). The tuning is a local search on the grid
(`next_tuning`): the middle three scales at every count, then outward only where a count's best
is at the edge of what was tried; the measured scores are unimodal in the scale, so it picks what
the full grid would at about half its cost. Sampling at 128 steps dominates the
cost (about 200 s per 1,000 guided samples on a slow machine), more than a screening run's training.

Results: one JSON per run, benchmarks/results/recipe_study/<phase>/<variant>_seed<k>.json,
written atomically when the run is scored; a finished file is skipped when the study is rerun, so
sittings add up. Intermediate outputs (checkpoints, calibration, every evaluation) stay in
--workdir and are reused by a rerun. `--report` assembles the tables from the result files only,
and refuses a file whose recorded variant, protocol or resolved training config differs from what
the script would run now, or whose scores come from other feature-network weights than the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_runs  # noqa: E402
from study_runs import ROOT  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "recipe_study"
STEP_COUNTS = (1, 2, 4, 8, 128)
CFG_GRID = (1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0)
SCORE_SEED, TUNE_SEED = 0, 1
PHASES = {"screen": (0.25, (0,)), "full": (1.0, (0, 1))}  # budget fraction, default seeds
# Every run of the study: no periodic evaluation (scores come from the evaluate CLI), sample grids
# only at the end, a checkpoint every 500 steps (a run cut off by the end of a sitting resumes).
STUDY_OVERRIDES = {"eval_every_steps": 0, "sample_every_steps": 0, "checkpoint_every_steps": 500}
QUICK_OVERRIDES = {
    "optim.warmup_steps": 5,
    "model.hidden_size": 32,
    "model.depth": 1,
    "model.num_heads": 2,
    "log_every_steps": 10,
    "checkpoint_every_steps": 1000,
    "sample_num": 8,
    "sample_steps": (1, 2),
    "eval_ref_num": 500,  # the evaluations' reference and ceiling: small, for speed
    "eval_ceiling_num": 32,
}
QUICK_STEPS = 40
EXCLUDED_FIELDS = ("total_steps", "seed", "init_from")  # set by the study per run
# Fields that change only elementwise work or numbers of the train step, not its matmuls or its
# batch: a variant that changes nothing else runs the default's step and gets the default's steps
# without timing (its measured ratio would be noise of a few per cent).
STEP_COST_NEUTRAL = (
    "optim.learning_rate",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.end_lr_fraction",
    "optim.grad_clip_norm",
    "ema_rate",
    "bootstrap_levels",
    "bootstrap_curriculum_fraction",
    "bootstrap_level_weights",
    "flow_time",
    "flow_time_mean",
    "flow_time_std",
    "loss.kind",
    "loss.huber_c",
    "loss.adaptive_p",
    "loss.adaptive_c",
)
# Fields counted in steps, scaled with the phase's budget fraction (`scaled_to_budget`).
BUDGET_SCALED = ("optim.warmup_steps", "ema_rate", "teacher_ema_rate")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One recipe: overrides of experiments/mnist.py, and how it is trained and sampled.

    Attributes:
      name: its name in results and tables.
      group: the lever it belongs to (a table section).
      overrides: {'field.path': value} for the training run (phase 2 of a two-phase variant).
      first_phase: (fraction of the budget, overrides) of a flow-matching-first variant.
      raw_params: score the raw parameters instead of the EMA.
      fixed_cfg: score at this guidance scale at every step count, without tuning.
      sampling_only: no training of its own: scores the default's run of the same phase and seed.
    """

    name: str
    group: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    first_phase: tuple[float, Mapping[str, Any]] | None = None
    raw_params: bool = False
    fixed_cfg: float | None = None
    sampling_only: bool = False

    def definition(self) -> dict[str, Any]:
        """What the result file records and `--report` compares (JSON types)."""
        return json.loads(
            json.dumps(
                {
                    "group": self.group,
                    "overrides": dict(sorted(self.overrides.items())),
                    "first_phase": (
                        None
                        if self.first_phase is None
                        else {
                            "fraction": self.first_phase[0],
                            "overrides": dict(sorted(self.first_phase[1].items())),
                        }
                    ),
                    "raw_params": self.raw_params,
                    "fixed_cfg": self.fixed_cfg,
                    "sampling_only": self.sampling_only,
                }
            )
        )


def _variants() -> list[Variant]:
    sc, fm, opt, model, two, sampling = (
        "self-consistency",
        "flow-matching part",
        "optimisation",
        "model",
        "two phases",
        "sampling",
    )
    flow_first = {"objective": "flow_matching"}
    return [
        Variant("default", "default"),
        # Self-consistency: the bootstrap share (default 1/4), level draws, level weights (student
        # levels 0 = one step .. 6), the teacher, guidance inside the targets.
        Variant("boot_1_8", sc, {"bootstrap_every": 8}),
        Variant("boot_1_2", sc, {"bootstrap_every": 2}),
        Variant("levels_coarse", sc, {"bootstrap_levels": "coarse"}),
        Variant("levels_curriculum", sc, {"bootstrap_levels": "curriculum"}),
        Variant(
            "weights_coarse", sc, {"bootstrap_level_weights": (2.0, 1.75, 1.5, 1.25, 1.0, 1.0, 1.0)}
        ),
        Variant(
            "weights_fine", sc, {"bootstrap_level_weights": (1.0, 1.0, 1.0, 1.25, 1.5, 1.75, 2.0)}
        ),
        Variant("teacher_ema_0.99", sc, {"bootstrap_teacher": "ema", "teacher_ema_rate": 0.99}),
        Variant("teacher_ema_0.999", sc, {"bootstrap_teacher": "ema", "teacher_ema_rate": 0.999}),
        Variant("cfg_in_targets", sc, {"bootstrap_cfg": True}),
        # Flow-matching part: time distribution, loss.
        Variant("flow_logit_normal", fm, {"flow_time": "logit_normal"}),
        Variant("loss_pseudo_huber", fm, {"loss.kind": "pseudo_huber"}),
        Variant("loss_adaptive", fm, {"loss.adaptive_p": 1.0}),
        # Optimisation around the default (lr 2e-3, 200 warm-up steps, batch 32, EMA 0.999, clip 1).
        Variant("lr_1e-3", opt, {"optim.learning_rate": 1e-3}),
        Variant("lr_4e-3", opt, {"optim.learning_rate": 4e-3}),
        Variant("warmup_50", opt, {"optim.warmup_steps": 50}),
        Variant("warmup_500", opt, {"optim.warmup_steps": 500}),
        Variant("batch_16", opt, {"batch_size": 16}),
        Variant("batch_64", opt, {"batch_size": 64}),
        Variant("ema_0.99", opt, {"ema_rate": 0.99}),
        Variant("ema_0.9995", opt, {"ema_rate": 0.9995}),
        Variant("clip_off", opt, {"optim.grad_clip_norm": 0.0}),
        Variant("clip_0.25", opt, {"optim.grad_clip_norm": 0.25}),
        # Model (default: width 128, depth 4, 4 heads, MLP ratio 4, patch 4), at equal wall time.
        Variant("w96_d6", model, {"model.hidden_size": 96, "model.depth": 6}),
        Variant("w192_d2", model, {"model.hidden_size": 192, "model.depth": 2}),
        Variant("mlp_ratio_2", model, {"model.mlp_ratio": 2.0}),
        Variant("mlp_ratio_6", model, {"model.mlp_ratio": 6.0}),
        Variant("patch2_w64", model, {"model.patch_size": 2, "model.hidden_size": 64}),
        # Two phases at equal total time: flow matching for a fraction, then shortcut from it.
        Variant("fm_first_25", two, first_phase=(0.25, flow_first)),
        Variant("fm_first_50", two, first_phase=(0.5, flow_first)),
        Variant("fm_first_75", two, first_phase=(0.75, flow_first)),
        # Sampling the default's run: the untuned policy (1.5 everywhere) and the raw parameters.
        Variant("sample_cfg_1.5_fixed", sampling, fixed_cfg=1.5, sampling_only=True),
        Variant("sample_raw_params", sampling, raw_params=True, sampling_only=True),
    ]


VARIANTS: dict[str, Variant] = {variant.name: variant for variant in _variants()}


def combine(names: Sequence[str]) -> Variant:
    """The variant 'a+b+...' with the overrides of all of them (training variants only).

    Raises:
      ValueError for an unknown name, a sampling-only or two-phase part, or two parts that set
      the same field to different values.
    """
    overrides: dict[str, Any] = {}
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"--combine: unknown variant {name!r}")
        part = VARIANTS[name]
        if part.sampling_only or part.first_phase is not None:
            raise ValueError(f"--combine: {name!r} is not a single-phase training variant")
        for field, value in part.overrides.items():
            if field in overrides and overrides[field] != value:
                raise ValueError(f"--combine: {'+'.join(names)} sets {field} twice")
            overrides[field] = value
    return Variant("+".join(names), "combined", overrides)


def resolve(name: str) -> Variant:
    """A built-in variant, or a combination 'a+b' of built-in ones."""
    if name in VARIANTS:
        return VARIANTS[name]
    if "+" in name:
        return combine(name.split("+"))
    raise ValueError(f"unknown variant {name!r}; see --list")


# ----------------------------------------------------------------------------- pure planning


def converted_steps(
    default_steps: int, default_seconds: float, variant_seconds: float, fraction: float = 1.0
) -> int:
    """The steps a variant trains in `fraction` of the default's wall time: at least 1.

    default_steps x fraction x t_default / t_variant, rounded; t_* are seconds per train step
    measured back to back.
    """
    if default_seconds <= 0 or variant_seconds <= 0:
        raise ValueError(f"step times must be > 0, got {default_seconds}, {variant_seconds}")
    return max(1, round(default_steps * fraction * default_seconds / variant_seconds))


def plan_steps(
    variant: Variant, default_steps: int, seconds: Mapping[str, float]
) -> dict[str, int]:
    """Steps of each training phase: {'train': n} or {'phase1': n1, 'train': n2}.

    Args:
      seconds: seconds per step measured back to back: 'default', 'train' and, for a two-phase
        variant, 'phase1'.
    """
    if variant.first_phase is None:
        return {"train": converted_steps(default_steps, seconds["default"], seconds["train"])}
    fraction = variant.first_phase[0]
    return {
        "phase1": converted_steps(default_steps, seconds["default"], seconds["phase1"], fraction),
        "train": converted_steps(default_steps, seconds["default"], seconds["train"], 1 - fraction),
    }


def tuned_scales(tuning: Mapping[float, Mapping[int, float]]) -> dict[int, float]:
    """{step count: the scale with the lowest score} from {scale: {step count: score}}.

    A scale need not have been tried at every step count (see `next_tuning`).
    """
    counts = sorted({count for scores in tuning.values() for count in scores})
    return {
        count: min(
            (scale for scale in tuning if count in tuning[scale]),
            key=lambda scale: (tuning[scale][count], scale),
        )
        for count in counts
    }


def next_tuning(
    grid: Sequence[float], counts: Sequence[int], tuning: Mapping[float, Mapping[int, float]]
) -> dict[float, tuple[int, ...]]:
    """The guidance scales to try next, each with the step counts it is needed for.

    A local search over the sorted grid: first the middle scale and its two neighbours at every
    step count; then, for each count whose best scale so far is at the edge of what was tried,
    the next scale outward, until every count's best has a tried neighbour on both sides (or is
    at the end of the grid). When a count's scores are unimodal in the scale (as measured: they
    fall to one minimum and rise again) this finds the grid search's choice while skipping the
    far scales, whose 128-step evaluations cost most.
    """
    grid = sorted(grid)
    if not tuning:
        middle = len(grid) // 2
        first = grid[max(0, middle - 1) : middle + 2]
        return {scale: tuple(counts) for scale in first}
    wanted: dict[float, list[int]] = {}
    best_scales = tuned_scales(tuning)
    for count in counts:
        tried = [index for index, scale in enumerate(grid) if count in tuning.get(scale, {})]
        best = grid.index(best_scales[count])
        for edge, step in ((min(tried), -1), (max(tried), 1)):
            outward = best + step
            if best == edge and 0 <= outward < len(grid):
                wanted.setdefault(grid[outward], []).append(count)
    return {scale: tuple(sorted(wanted[scale])) for scale in sorted(wanted)}


def score_groups(
    scales: Mapping[int, float], fid: bool
) -> list[tuple[float, tuple[int, ...], str]]:
    """The evaluations that score every step count at its scale: (scale, step counts, metrics).

    One evaluation per distinct scale; with `fid`, 1 step gets its own with FD-MNIST and FID.
    """
    groups: dict[float, list[int]] = {}
    for count, scale in sorted(scales.items()):
        if not (fid and count == 1):
            groups.setdefault(scale, []).append(count)
    result = [(scale, tuple(counts), "fd_mnist") for scale, counts in sorted(groups.items())]
    if fid and 1 in scales:
        result.append((scales[1], (1,), "fd_mnist,fid"))
    return result


def budget_steps(phase: str, quick: bool) -> tuple[int, int]:
    """(the full budget's steps, the default's steps in `phase`)."""
    full_steps = QUICK_STEPS if quick else int(study_runs.load_config({}).total_steps)
    return full_steps, max(1, round(full_steps * PHASES[phase][0]))


def protocol(phase: str, args: argparse.Namespace, default_steps: int) -> dict[str, Any]:
    """What every run of a phase shares; a result recorded under another protocol is refused."""
    return {
        "phase": phase,
        "default_steps": default_steps,
        "step_counts": list(args.step_counts),
        "num": args.num,
        "tune_num": args.tune_num,
        "cfg_grid": list(args.cfg_grid),
        "cfg_search": "local (next_tuning)",
        "score_seed": SCORE_SEED,
        "tune_seed": TUNE_SEED,
        "fid_at_1_step": args.fid,
        "quick": args.quick,
        "budget_fraction": PHASES[phase][0],
        "budget_scaled_fields": list(BUDGET_SCALED),
    }


def base_overrides(quick: bool) -> dict[str, Any]:
    """The overrides every run of the study gets before its variant's."""
    return {**STUDY_OVERRIDES, **(QUICK_OVERRIDES if quick else {})}


def scale_rate(rate: float, fraction: float) -> float:
    """An EMA rate whose horizon 1 / (1 - rate) is `fraction` of the given one's (>= 0)."""
    return round(max(0.0, 1.0 - (1.0 - float(rate)) / fraction), 10)


def scaled_to_budget(overrides: Mapping[str, Any], fraction: float) -> dict[str, Any]:
    """The fields counted in steps (`BUDGET_SCALED`) of a run at `fraction` of the full budget.

    The values a variant states are those of a full-budget run; a shorter run gets the same
    schedule shape: warm-up steps times the fraction, EMA horizons times the fraction. (Unscaled,
    the EMA at 0.999 still holds 0.999**1750 = 17 % of the random initialisation after a quarter
    budget's 1,750 steps, and its samples are noise.)
    """
    if fraction == 1.0:
        return {}
    config = study_runs.load_config(overrides)
    return {
        "optim.warmup_steps": round(config.optim.warmup_steps * fraction),
        "ema_rate": scale_rate(config.ema_rate, fraction),
        "teacher_ema_rate": scale_rate(config.teacher_ema_rate, fraction),
    }


def training_overrides(
    variant: Variant, quick: bool, fraction: float, phase1: bool = False
) -> dict[str, Any]:
    """The overrides of one training phase (without total_steps, seed and init_from), with the
    step-counted fields scaled to the phase's budget fraction."""
    own = variant.first_phase[1] if phase1 else variant.overrides
    overrides = {**base_overrides(quick), **own}
    return {**overrides, **scaled_to_budget(overrides, fraction)}


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields that change training between two flattened configs (`resume_policy` decides which
    only change logging, sampling or layout); the study's own per-run fields are left out."""
    from shortcut_jax import configs, resume_policy

    defaults = resume_policy.flatten(configs.base_config())
    changes = resume_policy.compare(recorded, current, step=0, defaults=defaults)
    return [c.describe() for c in changes if not c.safe and c.field not in EXCLUDED_FIELDS]


def refusals(result: Mapping[str, Any], expected_protocol: Mapping[str, Any]) -> list[str]:
    """Why a result file does not belong to the study as the script defines it now ([] = fine)."""
    from shortcut_jax import resume_policy

    problems = []
    try:
        variant = resolve(result["variant"])
    except ValueError as error:
        return [str(error)]
    if result.get("definition") != variant.definition():
        problems.append(f"variant definition {result.get('definition')} != {variant.definition()}")
    if result.get("protocol") != dict(expected_protocol):
        problems.append(f"protocol {result.get('protocol')} != {dict(expected_protocol)}")
    quick = bool(expected_protocol.get("quick"))
    fraction = PHASES[expected_protocol["phase"]][0]
    for key, recorded in (result.get("training_configs") or {}).items():
        overrides = training_overrides(variant, quick, fraction, phase1=key == "phase1")
        current = resume_policy.flatten(study_runs.load_config(overrides))
        for difference in config_differences(recorded, current):
            problems.append(f"{key} config: {difference}")
    return problems


# ----------------------------------------------------------------------------- running


def result_path(results_dir: Path, phase: str, name: str, seed: int) -> Path:
    """benchmarks/results/recipe_study/<phase>/<variant>_seed<k>.json."""
    return results_dir / phase / f"{name}_seed{seed}.json"


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def calibration_configs(variant: Variant, quick: bool, fraction: float) -> dict[str, dict]:
    """The training configs (overrides) whose step times a variant's budget needs.

    'default' always; 'train' unless it differs from the default's config only in
    `STEP_COST_NEUTRAL` fields (then its step is the default's: the default itself, the
    optimisation and loss variants, a two-phase variant's shortcut phase); 'phase1' for two-phase
    variants.
    """
    configs = {"default": training_overrides(VARIANTS["default"], quick, fraction)}
    train = training_overrides(variant, quick, fraction)
    changed = {
        field
        for field in set(train) | set(configs["default"])
        if train.get(field) != configs["default"].get(field)
    }
    if not changed <= set(STEP_COST_NEUTRAL):
        configs["train"] = train
    if variant.first_phase is not None:
        configs["phase1"] = training_overrides(variant, quick, fraction, phase1=True)
    return configs


def calibration_path(results_dir: Path, phase: str, name: str) -> Path:
    """benchmarks/results/recipe_study/<phase>/calibration/<variant>.json: a variant's measured
    step times, kept beside the results so that a later sitting on a new machine (whose --workdir
    starts empty) reuses them instead of needing another quiet spell."""
    return results_dir / phase / "calibration" / f"{name}.json"


def calibrate(
    variant: Variant, run_dir: Path, args: argparse.Namespace, default_steps: int
) -> dict[str, Any]:
    """Back-to-back step times of the default and the variant's training configs.

    Cached in the run's directory and in `calibration_path` (the first that matches the request
    is used); a measurement is written to both, atomically.
    """
    from shortcut_jax import atomic_files

    caches = [run_dir / "calibration.json"]
    if getattr(args, "results_dir", None):
        caches.append(calibration_path(Path(args.results_dir), args.phase, variant.name))
    configs = calibration_configs(variant, args.quick, PHASES[args.phase][0])
    request = {"configs": configs, "default_steps": default_steps, "quick": args.quick}
    for cached in caches:
        previous = _json(cached)
        if previous is not None and previous["request"] == json.loads(json.dumps(request)):
            if cached != caches[0]:
                atomic_files.write_json(caches[0], previous)
            return previous
    cached = caches[0]
    if getattr(args, "require_calibrated", False) and len(configs) > 1:
        raise RuntimeError(
            f"{cached} is missing or stale and --require_calibrated is set: measure the step "
            "times with --calibrate_only while nothing else runs"
        )
    rounds, burst = (2, 3) if args.quick else (args.calibration_rounds, args.calibration_steps)
    worker = [sys.executable, __file__, "--calibrate_worker", json.dumps(request)]
    worker += [f"--calibration_rounds={rounds}", f"--calibration_steps={burst}"]
    log = run_dir / "calibration.log"
    study_runs.run_timed(worker, log)
    measured = json.loads(log.read_text().strip().splitlines()[-1])
    calibration = {"request": request, **measured}
    for path in caches:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_files.write_json(path, calibration)
    return calibration


def kind(variant: Variant) -> str:
    """'sampling' (scores the default's run), 'neutral' (trains at the default's step time, so its
    budget needs no timing) or 'timed' (its step times must be measured back to back)."""
    if variant.sampling_only:
        return "sampling"
    timed = len(calibration_configs(variant, quick=False, fraction=PHASES["screen"][0])) > 1
    return "timed" if timed else "neutral"


def _run_dir(args: argparse.Namespace, phase: str, name: str, seed: int) -> Path:
    """The run's working directory under --workdir (created)."""
    run_dir = Path(args.workdir) / phase / f"{name}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def calibrate_run(name: str, phase: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Measures (or reads the cached) step times of one run; returns {config: time / default's}.

    The study's step times must be measured with the machine to itself, its training need not:
    `--calibrate_only` measures every timed run's in one quiet spell, and the runs, which may then
    share the machine, read them from the cache.
    """
    run_dir = _run_dir(args, phase, name, seed)
    calibration = calibrate(resolve(name), run_dir, args, budget_steps(phase, args.quick)[1])
    seconds = calibration.get("seconds_per_step") or {}
    return {key: value / seconds["default"] for key, value in seconds.items() if key != "default"}


def calibrate_worker(request: Mapping[str, Any], rounds: int, burst: int) -> dict[str, Any]:
    """In a fresh process: the matmul rate, then the step times of the requested configs."""
    from shortcut_jax import allocator

    allocator.tune_glibc_malloc()  # before jax allocates, as in the train CLI
    import matmul_benchmark

    n, reps = (256, 3) if request["quick"] else (2048, 10)
    before = matmul_benchmark.matmul_rate(n, reps)["gflops_median"]
    configs = {
        name: study_runs.load_config({**overrides, "total_steps": request["default_steps"]})
        for name, overrides in request["configs"].items()
    }
    from shortcut_jax import config_lib

    for config in configs.values():
        config_lib.validate(config, device_count=1)
    timed = {}
    if len(configs) > 1:
        timed = study_runs.time_configs(configs, rounds, burst)
    after = matmul_benchmark.matmul_rate(n, reps)["gflops_median"]
    return {
        "matmul_gflops": {"n": n, "before": before, "after": after},
        "load_average": list(os.getloadavg()),
        **timed,
    }


def train_phase(
    name: str, workdir: Path, overrides: Mapping[str, Any], stage_file: Path
) -> dict[str, Any]:
    """Trains one phase to completion through the CLI (a rerun resumes it); timings cached."""
    done = _json(stage_file)
    if done is not None and _same_training(done["overrides"], overrides):
        return done
    workdir.mkdir(parents=True, exist_ok=True)
    command = study_runs.train_command(workdir, overrides)
    print(f"[{name}] training: {' '.join(command[2:])}", flush=True)
    load_before = list(os.getloadavg())
    timing = study_runs.run_timed(command, workdir / "train.log", resumable=True)
    record = {
        "overrides": json.loads(json.dumps(dict(overrides))),
        **timing,
        "images_per_second_median": study_runs.images_per_second(workdir / "train.log"),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "config": json.loads((workdir / "config.json").read_text()),
    }
    from shortcut_jax import atomic_files

    atomic_files.write_json(stage_file, record)
    return record


def _same_training(recorded: Mapping[str, Any], overrides: Mapping[str, Any]) -> bool:
    """Whether two phases' overrides train the same parameters: they differ at most in fields
    that only change logging, checkpointing or sampling (`resume_policy.SAFE_FIELDS`)."""
    import fnmatch

    from shortcut_jax import resume_policy

    now = json.loads(json.dumps(dict(overrides)))
    changed = {key for key in set(recorded) | set(now) if recorded.get(key) != now.get(key)}
    return all(
        any(fnmatch.fnmatchcase(key, pattern) for pattern in resume_policy.SAFE_FIELDS)
        for key in changed
    )


def evaluate(
    name: str,
    train_dir: Path,
    out: Path,
    steps: Sequence[int],
    num: int,
    args: argparse.Namespace,
    cfg: float,
    seed: int,
    metrics: str,
    raw_params: bool,
) -> Path:
    """One evaluate CLI run into `out`, skipped when its results.json exists."""
    if (out / "results.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(args.workdir) / "reference_cache"
    inception = args.inception if "fid" in metrics.split(",") else None
    command = study_runs.evaluate_command(
        train_dir, out, steps, num, cache, metrics, cfg, seed, raw_params, inception
    )
    print(f"[{name}] evaluate: {' '.join(command[2:])}", flush=True)
    study_runs.run_timed(command, out.parent / f"{out.name}.log")
    return out


def run(name: str, phase: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Trains (unless sampling-only), tunes and scores one variant; writes its result file.

    Returns the result, or None when the file exists already and matches (skipped).
    """
    from shortcut_jax import atomic_files

    variant = resolve(name)
    fraction, _ = PHASES[phase]
    _, default_steps = budget_steps(phase, args.quick)
    expected = protocol(phase, args, default_steps)
    path = result_path(Path(args.results_dir), phase, name, seed)
    existing = _json(path)
    if existing is not None:
        problems = refusals(existing, expected)
        if problems:
            raise RuntimeError(f"{path} exists but differs ({'; '.join(problems)}): delete it")
        print(f"[{name} seed {seed}] done already: {path}", flush=True)
        return None
    run_dir = _run_dir(args, phase, name, seed)

    if variant.sampling_only:
        default_path = result_path(Path(args.results_dir), phase, "default", seed)
        if not default_path.exists():
            run("default", phase, seed, args)
        default_result = _json(default_path)
        default_dir = Path(args.workdir) / phase / f"default_seed{seed}"
        train_dir = default_dir / "train"
        if not (train_dir / "checkpoints").is_dir():  # a new --workdir: retrain it (deterministic)
            recorded = default_result["training"]["train"]["overrides"]
            train_phase("default", train_dir, recorded, default_dir / "train_done.json")
        training = {"reused": f"default_seed{seed}", **default_result["training"]}
        calibration = {"reused": True, "matmul_gflops": default_result["matmul_gflops"]}
        steps = default_result["steps"]
        training_configs = default_result["training_configs"]
    else:
        calibration = calibrate(variant, run_dir, args, default_steps)
        seconds = dict(calibration.get("seconds_per_step") or {})
        seconds.setdefault("default", 1.0)
        seconds.setdefault("train", seconds["default"])
        steps = plan_steps(variant, default_steps, seconds)
        training, training_configs = {}, {}
        common = {"seed": seed}
        if variant.first_phase is not None:
            phase1_overrides = {
                **training_overrides(variant, args.quick, fraction, phase1=True),
                **common,
                "total_steps": steps["phase1"],
            }
            training["phase1"] = train_phase(
                name, run_dir / "phase1", phase1_overrides, run_dir / "phase1_done.json"
            )
            common["init_from"] = str(run_dir / "phase1")
        train_dir = run_dir / "train"
        train_overrides = {
            **training_overrides(variant, args.quick, fraction),
            **common,
            "total_steps": steps["train"],
        }
        training["train"] = train_phase(
            name, train_dir, train_overrides, run_dir / "train_done.json"
        )
        training_configs = {key: _flat(record.pop("config")) for key, record in training.items()}

    # Guidance: tuned per step count on the tuning set, unless the variant fixes it.
    tuning: dict[float, dict[int, float]] = {}
    if variant.fixed_cfg is None:
        while requests := next_tuning(args.cfg_grid, args.step_counts, tuning):
            for scale, counts in requests.items():
                tag = f"cfg_{scale}"
                if list(counts) != list(args.step_counts):
                    tag += "_steps_" + "-".join(map(str, counts))
                out = evaluate(
                    name,
                    train_dir,
                    run_dir / "tune" / tag,
                    counts,
                    args.tune_num,
                    args,
                    scale,
                    TUNE_SEED,
                    "fd_mnist",
                    variant.raw_params,
                )
                rows = study_runs.evaluation_rows(out)
                tuning.setdefault(scale, {}).update(
                    {count: rows[count]["fd_mnist"] for count in counts}
                )
        scales = tuned_scales(tuning)
    else:
        scales = {count: variant.fixed_cfg for count in args.step_counts}

    scores: dict[str, dict[str, Any]] = {}
    metrics_info: dict[str, Any] = {}
    for scale, counts, metrics in score_groups(scales, args.fid):
        tag = f"cfg_{scale}" + ("_fid" if "fid" in metrics.split(",") else "")
        out = evaluate(
            name,
            train_dir,
            run_dir / "score" / tag,
            counts,
            args.num,
            args,
            scale,
            SCORE_SEED,
            metrics,
            variant.raw_params,
        )
        metrics_info.update(study_runs.evaluation_metrics(out))
        for count, row in study_runs.evaluation_rows(out).items():
            scores.setdefault(str(count), {"cfg": scale}).update(row)

    result = {
        "variant": name,
        "phase": phase,
        "seed": seed,
        "definition": variant.definition(),
        "protocol": expected,
        "base_config": f"experiments/mnist.py of commit {study_runs.config_commit()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "matmul_gflops": calibration.get("matmul_gflops"),
        "calibration": {k: v for k, v in calibration.items() if k != "request"},
        "steps": steps,
        "training": training,
        "training_configs": training_configs,
        "tuning_fd_mnist": {str(s): {str(c): v for c, v in t.items()} for s, t in tuning.items()},
        "cfg_by_steps": {str(count): scale for count, scale in scales.items()},
        "scores": scores,
        "metrics": metrics_info,
    }
    atomic_files.write_json(path, result)
    print(f"[{name} seed {seed}] wrote {path}", flush=True)
    return result


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    from shortcut_jax import resume_policy

    return resume_policy.flatten(config)


# ----------------------------------------------------------------------------- report


def load_results(results_dir: Path, phase: str, expected: Mapping[str, Any]) -> list[dict]:
    """Every result file of a phase; raises SystemExit listing the files it refuses (other
    settings than the script's, or scores from other feature-network weights than the first's)."""
    results, refused = [], []
    loaded = [
        (path, json.loads(path.read_text()))
        for path in sorted((results_dir / phase).glob("*.json"))
    ]
    for path, result in loaded:
        problems = refusals(result, expected)
        if problems:
            refused.append(f"{path}: " + "; ".join(problems))
        else:
            results.append(result)
    refused += study_runs.network_mismatches(
        [(str(path), result.get("metrics") or {}) for path, result in loaded]
    )
    if refused:
        raise SystemExit(
            "refused result files (recorded settings differ from the script's):\n  "
            + "\n  ".join(refused)
        )
    return results


def _order(name: str) -> tuple[int, str]:
    names = list(VARIANTS)
    return (names.index(name), name) if name in names else (len(names), name)


def _mean_spread(values: Sequence[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


def _scale_text(scale: float, top: float | None) -> str:
    """A tuned guidance scale, '^' marking the top of the tuning grid (None: not tuned)."""
    return f"{scale:g}" + ("^" if scale == top else "")


def report_table(results: Sequence[Mapping[str, Any]], step_counts: Sequence[int]) -> str:
    """Markdown: one row per variant (mean ± half the range over its seeds), default first."""
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        by_variant.setdefault(result["variant"], []).append(result)

    def fd(result: Mapping[str, Any], count: int) -> float:
        return float(result["scores"][str(count)]["fd_mnist"])

    default = by_variant.get("default", [])
    header = ["variant", "group", "seeds", "steps", "step time / default"]
    header += [f"FD {count}" for count in step_counts] + ["FID 1"]
    header += [f"Δ FD {step_counts[0]} / {step_counts[-1]} vs default (same seeds)"]
    header += ["tuned CFG " + "/".join(map(str, step_counts)), "train min (loaded machine)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(by_variant, key=_order):
        runs = sorted(by_variant[name], key=lambda r: r["seed"])
        first = runs[0]
        steps = first["steps"]
        steps_text = (
            f"{steps['phase1']:,} FM + {steps['train']:,}"
            if "phase1" in steps
            else f"{steps['train']:,}"
        )
        seconds = first["calibration"].get("seconds_per_step") or {}
        ratio = (
            f"{seconds['train'] / seconds['default']:.2f}"
            if "train" in seconds
            else ("(default's run)" if first["definition"]["sampling_only"] else "1")
        )
        cells = [name, first["definition"]["group"], str(len(runs)), steps_text, ratio]
        cells += [_mean_spread([fd(r, count) for r in runs]) for count in step_counts]
        fids = [r["scores"]["1"]["fid"] for r in runs if "fid" in r["scores"].get("1", {})]
        cells.append(_mean_spread(fids))
        if default and name != "default":
            # Paired: against the default's runs of the same seeds where there are any.
            seeds = {r["seed"] for r in runs}
            paired = [r for r in default if r["seed"] in seeds] or default
            deltas = []
            for count in (step_counts[0], step_counts[-1]):
                mine = statistics.fmean(fd(r, count) for r in runs)
                theirs = statistics.fmean(fd(r, count) for r in paired)
                deltas.append(f"{mine - theirs:+.1f}")
            cells.append(" / ".join(deltas))
        else:
            cells.append("")
        top = (
            max(first["protocol"]["cfg_grid"]) if first["definition"]["fixed_cfg"] is None else None
        )
        cells.append(
            "; ".join(
                "/".join(_scale_text(r["cfg_by_steps"][str(c)], top) for c in step_counts)
                for r in runs
            )
        )
        minutes = [_train_minutes(r) for r in runs]
        cells.append("" if first["definition"]["sampling_only"] else _mean_spread(minutes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(phase: str, args: argparse.Namespace) -> str:
    """The phase's table and its settings, from the result files only."""
    full_steps, default_steps = budget_steps(phase, args.quick)
    expected = protocol(phase, args, default_steps)
    results = load_results(Path(args.results_dir), phase, expected)
    if not results:
        return f"no result files in {Path(args.results_dir) / phase}"
    rates = [
        rate
        for r in results
        for rate in (
            (r.get("matmul_gflops") or {}).get("before"),
            (r.get("matmul_gflops") or {}).get("after"),
        )
        if rate
    ]
    notes = [
        f"Phase {phase}: the default's budget is {default_steps:,} steps "
        f"({PHASES[phase][0]:g} of {full_steps:,}); other variants train that wall time "
        "converted through their back-to-back step time. "
        f"FD-MNIST of {args.num:,} samples (seed {SCORE_SEED}) at each step count's guidance "
        f"scale tuned on {args.tune_num:,} other samples (seed {TUNE_SEED}) by a local search "
        f"over {list(args.cfg_grid)} (^ = the top of the grid)"
        f"{'; FID of the 1-step samples' if args.fid else ''}. "
        f"float32 matmul {min(rates):.0f}-{max(rates):.0f} GFLOP/s over the runs."
        if rates
        else f"Phase {phase}: {default_steps:,} default steps.",
    ]
    return "\n\n".join(notes + [report_table(results, args.step_counts)])


def _train_minutes(result: Mapping[str, Any]) -> float:
    """Wall minutes of a run's training phases (a reused run's as recorded)."""
    phases = result["training"].values()
    return sum(t.get("wall_seconds", 0.0) for t in phases if isinstance(t, dict)) / 60


def _seed_means(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{variant: {'fd': {count: mean FD-MNIST}, 'minutes': mean train minutes}} over seeds."""
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        by_variant.setdefault(result["variant"], []).append(result)
    means = {}
    for name, runs in by_variant.items():
        counts = sorted(int(c) for c in runs[0]["scores"])
        minutes = [_train_minutes(r) for r in runs]
        means[name] = {
            "fd": {
                c: statistics.fmean(float(r["scores"][str(c)]["fd_mnist"]) for r in runs)
                for c in counts
            },
            "minutes": statistics.fmean(minutes),
            "sampling_only": runs[0]["definition"]["sampling_only"],
        }
    return means


def plot(args: argparse.Namespace, figures: Path) -> list[Path]:
    """Two figures from the result files: FD-MNIST against sampling steps per variant (each phase
    with results), and FD-MNIST at the fewest and most steps against training minutes for the
    variants run in both phases (the quality-per-minute frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = {}
    for phase in PHASES:
        expected = protocol(phase, args, budget_steps(phase, args.quick)[1])
        results = load_results(Path(args.results_dir), phase, expected)
        if results:
            phases[phase] = _seed_means(results)
    if not phases:
        raise SystemExit(f"error: no result files under {args.results_dir}")
    figures.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, len(phases), figsize=(6.5 * len(phases), 4.5), squeeze=False)
    for ax, (phase, means) in zip(axes[0], phases.items(), strict=True):
        for name in sorted(means, key=_order):
            counts = sorted(means[name]["fd"])
            values = [means[name]["fd"][c] for c in counts]
            if name == "default":
                ax.plot(counts, values, "k-", marker="o", linewidth=2.5, label=name, zorder=3)
            else:
                ax.plot(counts, values, marker=".", linewidth=1, alpha=0.8, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("FD-MNIST (tuned guidance; lower is better)")
        ax.set_title(f"{phase} ({PHASES[phase][0]:g} of the budget)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = figures / "recipe_fd_vs_steps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    both = [
        name
        for name in phases.get("full", {})
        if name in phases.get("screen", {}) and not phases["full"][name]["sampling_only"]
    ]
    if both:
        counts = sorted(phases["full"][both[0]]["fd"])
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, count in zip(axes, (counts[0], counts[-1]), strict=True):
            for name in sorted(both, key=_order):
                points = [
                    (phases[p][name]["minutes"], phases[p][name]["fd"][count]) for p in PHASES
                ]
                style = "k-" if name == "default" else "-"
                ax.plot(*zip(*sorted(points), strict=True), style, marker="o", label=name)
            ax.set_yscale("log")
            ax.set_xlabel("training minutes (the runs' own machines)")
            ax.set_ylabel(f"FD-MNIST at {count} step{'s' if count > 1 else ''}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = figures / "recipe_fd_vs_minutes.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags; --quick replaces the protocol by a tiny one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=sorted(PHASES), default="screen")
    parser.add_argument("--workdir", help="where runs, calibrations and evaluations go")
    parser.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    parser.add_argument("--combine", action="append", default=[], help="'a+b': a combination")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--results_dir", default=None, help=f"default {RESULTS}")
    parser.add_argument("--num", type=int, default=1000, help="scored samples per step count")
    parser.add_argument("--tune_num", type=int, default=250, help="tuning samples per count")
    parser.add_argument("--cfg_grid", type=float, nargs="+", default=list(CFG_GRID))
    parser.add_argument("--step_counts", type=int, nargs="+", default=list(STEP_COUNTS))
    parser.add_argument("--no_fid", dest="fid", action="store_false", help="skip FID at 1 step")
    parser.add_argument(
        "--inception",
        default=None,
        help="converted FID Inception weights (default: the evaluate CLI's default path)",
    )
    parser.add_argument(
        "--calibrate_only",
        action="store_true",
        help="only measure the step times (cached per run) while the machine is quiet, then stop",
    )
    parser.add_argument(
        "--require_calibrated",
        action="store_true",
        help="fail a timed run whose step times were not measured by --calibrate_only (for runs "
        "that share the machine)",
    )
    parser.add_argument("--calibration_rounds", type=int, default=3)
    parser.add_argument("--calibration_steps", type=int, default=30, help="steps per burst")
    parser.add_argument("--quick", action="store_true", help="tiny model, 40 steps (smoke)")
    parser.add_argument("--report", action="store_true", help="print the tables and stop")
    parser.add_argument("--report_out", default=None, help="also write the report here")
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    parser.add_argument(
        "--kind",
        choices=("sampling", "neutral", "timed"),
        default=None,
        help="with --list: print the names of that kind of variant only, one a line",
    )
    parser.add_argument(
        "--plot", default=None, help="write the figures into this directory (e.g. docs/benchmarks)"
    )
    parser.add_argument("--calibrate_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.step_counts, args.cfg_grid = [1, 2], [1.0, 2.0]
        args.num, args.tune_num, args.fid = 16, 16, False
        if args.results_dir is None and args.workdir:
            args.results_dir = str(Path(args.workdir) / "results")
    args.results_dir = args.results_dir or str(RESULTS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the requested variants (or the report); returns the exit status."""
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.calibrate_worker is not None:
        request = json.loads(args.calibrate_worker)
        result = calibrate_worker(request, args.calibration_rounds, args.calibration_steps)
        print(json.dumps(result))
        return 0
    if args.list:
        for variant in VARIANTS.values():
            if args.kind is None:
                print(f"{variant.name}: {json.dumps(variant.definition())}")
            elif variant.name != "default" and kind(variant) == args.kind:
                print(variant.name)
        return 0
    if args.plot:
        for path in plot(args, Path(args.plot)):
            print(path)
        return 0
    if args.report:
        text = report(args.phase, args)
        print(text)
        if args.report_out:
            Path(args.report_out).write_text(text + "\n")
        return 0
    if not args.workdir:
        raise SystemExit("error: --workdir is required to run variants")
    if args.fid:
        from shortcut_jax.evaluators import inception

        weights = args.inception or inception.default_weights_path()
        if not os.path.exists(weights):
            raise SystemExit(
                f"error: FID needs {weights} (python -m shortcut_jax.tools.convert_inception "
                "--help; --inception names another file), or pass --no_fid"
            )
    names = list(args.only) if args.only else ([] if args.combine else list(VARIANTS))
    names += list(args.combine)
    for name in names:
        resolve(name)  # unknown names fail before any training
    seeds = args.seeds if args.seeds is not None else list(PHASES[args.phase][1])
    if args.calibrate_only:
        for name in names:
            if resolve(name).sampling_only:
                continue
            for seed in seeds:
                ratios = calibrate_run(name, args.phase, seed, args)
                print(f"[{name} seed {seed}] step time / default: {ratios}", flush=True)
        return 0
    failed = []
    for name in names:
        for seed in seeds:
            try:
                run(name, args.phase, seed, args)
            except (RuntimeError, ValueError, KeyError, OSError) as error:
                print(f"[{name} seed {seed}] FAILED: {error}", flush=True)
                failed.append(f"{name} seed {seed}")
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
