"""Score a trained run at several step budgets.

    python -m shortcut_jax.evaluate --workdir runs/mnist --steps 1,2,4,8,16,32,64,128 \
        --num 5000 [--cfg 1.5] [--ref_stats stats.npz] [--metrics fd_mnist,fid]

Samples from the newest (or --checkpoint_step) checkpoint with the same noise at every budget,
scores the samples (FD-MNIST for the embedded MNIST, FID when the Inception weights are there,
with k-NN precision/recall), and writes results.json, results.md and scores_vs_nfe.png to
--out (default WORKDIR/eval/step_N; a bucket path works too), each file atomically. Bad flags
(also --steps beyond the run's denoise_timesteps and --metrics that cannot score its data) give
one line on stderr and exit status 2; a workdir that is not a run, missing weights or statistics,
NaN samples and an output that cannot be written one line and exit status 1 (the rule of
`shortcut_jax.cli_inputs`). Only this package's INFO lines are logged.

Only the parameter set that is scored is read from the checkpoint (`checkpoint.load_params`).
Host memory does not grow with --num: each chunk's features are added to float64 running moments
(`fid.RunningStatistics`); only --pr_num features per metric are kept for precision/recall.
Latent runs decode in passes of config.vae.decode_batch_size images per device.

On several hosts, start the same command on every host with --distributed (and, off TPU pods
and SLURM, --coordinator_address, --num_processes and --process_id): the chunks are split over
the devices of all processes, each process adds the features its devices computed, the moments
are merged across processes, and process 0 writes the report. The scores equal those of one
process sampling the same examples.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from etils import epath
from tqdm import tqdm

from shortcut_jax import checkpoint, cli_inputs, preemption, sharding
from shortcut_jax.distributed import initialize_distributed
from shortcut_jax.evaluators import features, registry, report, sweep

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (written by shortcut_jax.main).")
_STEPS = flags.DEFINE_list("steps", None, "Step budgets; default 1, 2, 4, ..., denoise_timesteps.")
_NUM = flags.DEFINE_integer("num", 5_000, "Samples per step budget (the paper's FID uses 50000).")
_CFG = flags.DEFINE_float(
    "cfg",
    None,
    "Guidance scale at every budget (default: the run's sample_cfg_scale where its "
    "sample_guidance policy applies it).",
)
_REF_STATS = flags.DEFINE_string(
    "ref_stats", None, "FID reference statistics .npz (mu, sigma); default: from the run's data."
)
_REF_NUM = flags.DEFINE_integer(
    "ref_num", None, "Real examples behind a reference from the data (default eval_ref_num)."
)
_METRICS = flags.DEFINE_string(
    "metrics", "auto", f"'auto' or a comma list of {', '.join(registry.names())}."
)
_INCEPTION = flags.DEFINE_string(
    "inception", None, "Converted Inception weights .npz (default: the run's or the cache's)."
)
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: newest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples per sampling call.")
_PR_NUM = flags.DEFINE_integer(
    "pr_num", sweep.DEFAULT_PR_NUM, "Features per side for precision/recall (0 = skip)."
)
_OUT = flags.DEFINE_string("out", None, "Output directory (default WORKDIR/eval/step_N).")
_CACHE = flags.DEFINE_string(
    "cache_dir",
    None,
    "Where reference features are cached (default WORKDIR/eval); share it "
    "between runs on the same data to compute the reference once.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first: one process per host, all running this command.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --distributed, off TPU/SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    """Checks the flags and the run, samples at every budget, scores and writes the report."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _DISTRIBUTED.value:
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    unwritten = "no report was written (results.json and the table appear only when complete)"
    with (
        preemption.exit_on_sigterm(unwritten),
        cli_inputs.errors_as_one_line(
            checkpoint.CheckpointError,
            sharding.ShardingError,  # the run's mesh does not fit these devices
            sweep.EvaluationError,  # no metric's weights here, unreadable --ref_stats, ...
            features.WeightsError,
            features.NonFiniteImagesError,
            OSError,  # an output or cache path that cannot be made: one line naming it
        ),
    ):
        _evaluate()


def _budgets(denoise_timesteps: int) -> list[int]:
    """The --steps budgets (default 1, 2, 4, ..., denoise_timesteps), each checked."""
    if not _STEPS.value:
        return [2**k for k in range(denoise_timesteps.bit_length())]
    try:
        budgets = [int(value) for value in _STEPS.value]
    except ValueError:
        raise cli_inputs.InputError(f"--steps={_STEPS.value}: integers expected") from None
    bad = [s for s in budgets if not 1 <= s <= denoise_timesteps]
    if bad:
        raise cli_inputs.InputError(f"--steps: {bad} outside 1..{denoise_timesteps}")
    return budgets


def _metric_names(config) -> list[str]:
    """The --metrics names resolved for the run; InputError (a usage error) for a name that is
    not a metric or cannot score the run's data. 'auto' finding none is a run-time failure."""
    if _METRICS.value != "auto":
        names = registry.split(_METRICS.value)
        unknown = registry.unknown(names)
        if not names or unknown:
            raise cli_inputs.InputError(
                f"--metrics={_METRICS.value}: unknown metric(s) {unknown or []}; use 'auto' or a "
                f"comma list of {', '.join(registry.names())}"
            )
        for name in names:
            problem = registry.get(name).data_problem(config)
            if problem:
                raise cli_inputs.InputError(f"--metrics={name} cannot score this run: {problem}")
    return sweep.metric_names(config, _METRICS.value)


def _evaluate() -> None:
    if not 2 <= _NUM.value <= cli_inputs.MAX_COUNT:
        raise cli_inputs.InputError(
            f"--num={_NUM.value}: at least 2 samples per budget (at most {cli_inputs.MAX_COUNT:,})"
        )
    cli_inputs.check_positive("--batch_size", _BATCH.value)
    cli_inputs.check_seed("--seed", _SEED.value)
    if _PR_NUM.value < 0:
        raise cli_inputs.InputError(f"--pr_num={_PR_NUM.value}: must be >= 0 (0 = skip)")
    # --cfg applies at every budget; without it the run's policy (config.sample_guidance) decides.
    cfg_scale = cli_inputs.check_guidance_scale("--cfg", _CFG.value)
    if _REF_NUM.value is not None and _REF_NUM.value < 4:
        raise cli_inputs.InputError(f"--ref_num={_REF_NUM.value}: at least 4 real examples")
    step = cli_inputs.checkpoint_step(_WORKDIR.value, _STEP.value)
    # The run's mesh layout over the devices of every process; only the scored parameters load.
    mesh = sharding.make_mesh(checkpoint.restore_config(_WORKDIR.value, step), jax.devices())
    config, params, step = checkpoint.load_params(_WORKDIR.value, step, raw=_RAW.value, mesh=mesh)
    is_chief = jax.process_index() == 0
    if _INCEPTION.value:
        config.eval_inception_path = _INCEPTION.value
    if _REF_NUM.value is not None:
        config.eval_ref_num = _REF_NUM.value
    budgets = _budgets(config.denoise_timesteps)
    out = epath.Path(
        _OUT.value or checkpoint.workdir_path(_WORKDIR.value) / "eval" / f"step_{step}"
    )
    cache_dir = _CACHE.value or str(checkpoint.workdir_path(_WORKDIR.value) / "eval")
    cli_inputs.check_output_directory("--out", str(out), 2**20)  # before hours of sampling
    names = _metric_names(config)
    metrics = sweep.build_metrics(
        config, names=names, cache_dir=cache_dir, ref_stats=_REF_STATS.value, is_chief=is_chief
    )
    total = _NUM.value * len(budgets) * (1 + len(metrics))
    with tqdm(total=total, unit="img", desc="sampling + features", disable=not is_chief) as bar:
        rows, _ = sweep.sweep(
            config,
            params,
            metrics,
            steps=budgets,
            num=_NUM.value,
            cfg_scale=cfg_scale,
            seed=_SEED.value,
            batch_size=_BATCH.value,
            mesh=mesh,
            pr_num=_PR_NUM.value,
            is_chief=is_chief,
            progress=bar.update,
        )
    if not is_chief:
        return
    settings = {
        "workdir": _WORKDIR.value,
        "ref_num": int(config.eval_ref_num),
        "checkpoint_step": step,
        "objective": config.objective,
        "num": _NUM.value,
        "cfg_scale": float(config.sample_cfg_scale) if cfg_scale is None else cfg_scale,
        "guidance": config.sample_guidance if cfg_scale is None else "all (--cfg)",
        "params": "raw" if _RAW.value else "ema",
        "seed": _SEED.value,
        "processes": jax.process_count(),
    }
    result = report.make_report(
        rows=rows,
        metrics={metric.name: metric.describe() for metric in metrics},
        settings=settings,
    )
    paths = report.write(result, out)
    print(report.markdown_table({"": result}))
    logging.info("Wrote %s", ", ".join(paths.values()))


if __name__ == "__main__":
    cli_inputs.run(main)
