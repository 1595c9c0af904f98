"""The one train loop for every objective: data, state, step, metrics, checkpoints, grids."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from shortcut_jax import (
    atomic_files,
    checkpoint,
    compiled_step,
    config_lib,
    data,
    images,
    latent_space,
    metric_files,
    models,
    objectives,
    optim,
    preemption,
    prefetch,
    run_guard,
    sampling,
    sharding,
    steps,
    teacher,
)
from shortcut_jax.data import checks as data_checks
from shortcut_jax.evaluators import features, report, sweep
from shortcut_jax.state import TrainState, init_state, sharded_abstract_state


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last saved checkpoint is left untouched."""


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[int, dict[str, float]]:
    """Trains `config` in `workdir`, resuming from the newest checkpoint there.

    Before anything compiles, `run_guard.guard_start` refuses (with a `run_guard.RunGuardError`)
    a workdir that cannot be written or whose disk is full, a workdir another run is training in,
    and a resume whose config would change the run; the workdir stays locked until this returns.

    Returns:
      {step: metric averages} for every step this call logged (also written to the CLU writers).
    """
    config_lib.validate(config)
    with run_guard.guard_start(config, workdir) as held:
        return _train_and_evaluate(config, workdir, held)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, held: run_guard.HeldWorkdir
) -> dict[int, dict[str, float]]:
    """`train_and_evaluate` once the start checks passed."""
    # ----------------------------------------------------------------- config and workdir
    workdir = str(checkpoint.workdir_path(workdir))
    is_chief = jax.process_index() == 0
    # Only process 0 writes metrics, logs and images.
    writer = metric_files.create_writer(workdir, is_chief, config=config)

    # ----------------------------------------------------------------- data, model, state
    vae = latent_space.load_run_vae(config) if latent_space.uses_vae(config) else None
    source = data.get_source(config, jax.process_index(), jax.process_count())
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = sharding.make_mesh(config)
    abstract_state, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    init_fn = functools.partial(init_state, config, model, optimizer)
    manager = checkpoint.make_manager(workdir, config.max_checkpoints_to_keep, for_training=True)
    state, resumed = checkpoint.restore_or_init(
        manager,
        abstract_state,
        jax.jit(init_fn, out_shardings=state_sharding),
        fallback=bool(config.get("restore_fallback", False)),
    )
    # The frozen teacher run (reloaded on every start) and config.init_from (fresh runs only).
    teacher_run, state = teacher.prepare(config, workdir, mesh, state, resumed)
    start_step = int(sharding.to_host(state.step))
    run_guard.record_start(config, workdir, start_step, state)  # starts.json and config.json
    num_params = models.count_params(state.params)
    logging.info(
        "%s at step %d of %d; %s parameters; objective %s; mesh %s.",
        "Resumed" if resumed else "Initialised",
        start_step,
        config.total_steps,
        f"{num_params:,}",
        config.objective,
        dict(mesh.shape),
    )
    if not resumed and is_chief:
        writer.write_hparams(_flat_hparams(config))

    train_step = compiled_step.build(
        config,
        mesh,
        model,
        optimizer,
        state_sharding,
        teacher_run,
        vae if latent_space.is_online(config) else None,  # images in, VAE encode in the step
    )

    decoder = latent_space.PixelDecoder(vae, mesh, config.eval_batch_size)
    grid_writer = SampleGridWriter(config, model, workdir, writer, mesh, decoder)
    evaluator = PeriodicEvaluator(config, grid_writer.apply_fn, workdir, writer, mesh, decoder)

    # ----------------------------------------------------------------- loop
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=config.total_steps, writer=writer, every_steps=config.log_every_steps
    )
    checked = data_checks.FiniteBatches(
        source, _data_name(config), start_step, bool(config.data.get("skip_non_finite", False))
    )
    batches = prefetch.to_devices(checked, mesh, depth=2)
    sums = None  # metric (total, count) sums since the last log, on the device
    history: dict[int, dict[str, float]] = {}
    last_saved = manager.latest_step()
    timer = _Throughput(config.batch_size)
    watcher = preemption.PreemptionWatcher(manager.reached_preemption)
    watcher.install()
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            batch = next(batches)
            if sums is None:
                sums = train_step.zero_sums(state, batch)
            state, sums, loss = train_step(state, sums, batch)
            if step == start_step + 1:
                jax.block_until_ready(loss)
                timer.start(step)
                logging.info("First step (compile + run): %.1f s", timer.first_step_seconds)
            report_progress(step)
            is_last = step == config.total_steps

            if step % config.log_every_steps == 0 or is_last:
                held.confirm()  # a run that lost its bucket lease stops here, on every process
                summary = steps.summarize(jax.tree.map(sharding.to_host, sums))
                sums = train_step.zero_sums(state, batch)
                _raise_if_not_finite(summary.get("loss", float("nan")), step, manager, workdir)
                summary.update(timer.measure(step))
                if checked.skipped:
                    summary["data/skipped_examples"] = float(checked.skipped)
                writer.write_scalars(step, summary)
                history[step] = summary
            preempted = watcher.reached(step)  # every step, on every process
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                total, count = (float(sharding.to_host(value)) for value in loss)
                _raise_if_not_finite(total / max(count, 1.0), step, manager, workdir)
                held.confirm()  # never write a checkpoint into a workdir another run took over
                checkpoint.save(manager, state, config, step)  # refuses a non-finite state
                last_saved = step
            if preempted:
                manager.wait_until_finished()
                logging.warning(
                    "Preempted: saved step %d in %s; rerun the same command to resume.",
                    step,
                    checkpoint.checkpoint_dir(workdir),
                )
                return history
            if is_last:
                break  # the final grids and evaluation follow, once the checkpoint is whole
            sample_every = config.sample_every_steps
            if sample_every and step % sample_every == 0:
                grid_writer.write(state, step)
                timer.start(step)  # sampling time is not training throughput
            eval_every = config.eval_every_steps
            if eval_every and step % eval_every == 0:
                history.setdefault(step, {}).update(evaluator.run(state, step))
                timer.start(step)
        manager.wait_until_finished()  # a SIGTERM from here on finds the last checkpoint whole
        if int(sharding.to_host(state.step)) == config.total_steps:
            _final_outputs(config, workdir, state, grid_writer, evaluator, history, watcher)
    finally:
        manager.wait_until_finished()  # never leave a save half-written (SIGTERM still handled)
        watcher.uninstall()
        manager.close()
        writer.flush()

    logging.info("Done at step %d; last checkpoint %s.", config.total_steps, last_saved)
    return history


def _data_name(config: ml_collections.ConfigDict) -> str:
    """The data source as a message names it."""
    if config.data.get("pairs_dir"):
        return f"reflow pairs in {config.data.pairs_dir}"
    if config.data.get("latent_dir"):
        return f"latents in {config.data.latent_dir}"
    if config.data.name == "image_folder":
        return f"image_folder {config.data.image_dir}"
    if config.data.name == "tfds":
        return f"tfds {config.data.tfds_name}:{config.data.tfds_split}"
    return str(config.data.name)


FINAL_NAME = "final.json"


def _final_outputs(
    config: ml_collections.ConfigDict,
    workdir: str,
    state: TrainState,
    grid_writer: SampleGridWriter,
    evaluator: PeriodicEvaluator,
    history: dict[int, dict[str, float]],
    watcher: preemption.PreemptionWatcher,
) -> None:
    """The sample grids and evaluation of the last step, once: a rerun completes what is missing.

    WORKDIR/final.json records that they were written for `config.total_steps`. A SIGTERM while
    they run stops them at once (the checkpoint is already whole); the rerun of the same command
    restores the last checkpoint and writes them, without training.
    """
    step = int(config.total_steps)
    marker = os.path.join(workdir, FINAL_NAME)
    with contextlib.suppress(OSError, ValueError, TypeError):
        if json.loads(epath.Path(marker).read_text())["step"] == step:
            return
    try:
        with watcher.interruptible():
            grid_writer.write(state, step)
            if config.eval_every_steps:
                history.setdefault(step, {}).update(evaluator.run(state, step))
    except preemption.Terminated:
        logging.warning(
            "SIGTERM during the final sample grids and evaluation of step %d: the checkpoint is "
            "saved; rerun the same command to write them (nothing is trained again).",
            step,
        )
        return
    if jax.process_index() == 0:
        atomic_files.write_json(marker, {"step": step, "evaluated": bool(config.eval_every_steps)})


class _Throughput:
    """Train throughput between log steps, excluding compilation and the first step."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.created = time.perf_counter()
        self.first_step_seconds = 0.0
        self.last_time = 0.0
        self.last_step = None

    def start(self, step: int) -> None:
        """Starts (or restarts, after sampling) the clock at `step`."""
        self.last_time = time.perf_counter()
        if self.last_step is None:
            self.first_step_seconds = self.last_time - self.created
        self.last_step = step

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        result = {"perf/first_step_seconds": self.first_step_seconds}
        if self.last_step is not None and step > self.last_step:
            steps_per_second = (step - self.last_step) / (now - self.last_time)
            result["perf/steps_per_second"] = steps_per_second
            result["perf/images_per_second"] = steps_per_second * self.batch_size
        self.last_time, self.last_step = now, step
        return result


class SampleGridWriter:
    """Samples the same noise at each configured step count; writes PNGs and image summaries."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: Any,
        workdir: str,
        writer: metric_writers.MetricWriter,
        mesh: jax.sharding.Mesh | None = None,
        decoder: latent_space.PixelDecoder | None = None,
    ):
        self.config = config
        self.element_shape = latent_space.model_shape(config)
        if decoder is None:
            decoder = latent_space.PixelDecoder.for_config(config, mesh, config.eval_batch_size)
        self.decoder = decoder
        self.directory = os.path.join(workdir, "samples")
        self.writer = writer
        self.apply_fn = steps.make_apply_fn(model)
        self.objective = objectives.ObjectiveConfig.from_config(config)  # its own sampler
        self.is_chief = jax.process_index() == 0
        self.mesh = mesh

    def write(self, state: TrainState, step: int) -> dict[str, np.ndarray]:
        """Samples with the EMA (or raw) parameters and writes one grid per step count.

        Latent samples are decoded to pixels; guidance follows `latent_space.guidance_scale`.
        """
        config = self.config
        params = state.ema_params if config.sample_use_ema else state.params
        rng = jax.random.PRNGKey(config.seed + 1)  # the same noise at every step and count
        grids = {}
        for num_steps in config.sample_steps:
            samples, _ = sampling.sample_batch(
                self.apply_fn,
                params,
                rng,
                num=config.sample_num,
                shape=self.element_shape,
                num_steps=int(num_steps),
                denoise_timesteps=config.denoise_timesteps,
                cfg_scale=latent_space.guidance_scale(config, int(num_steps)),
                num_classes=config.data.num_classes,
                mesh=self.mesh,
                objective=self.objective,
                sharding_rules=sharding.logical_rules(config),
            )
            name = f"{num_steps} step" + ("s" if num_steps > 1 else "")
            grids[name] = self.decoder(samples)
        if self.is_chief:
            self._save(grids, step)
        return grids

    def _save(self, grids: dict[str, np.ndarray], step: int) -> None:
        path = os.path.join(self.directory, f"step_{step:07d}.png")
        if len(self.element_shape) == 1:
            images.scatter_png(path, grids)
            return
        images.save_labeled_grids(path, grids, ncols=self._columns())
        summaries = {
            f"samples/{name.replace(' ', '_')}": images.make_grid(samples, ncols=self._columns())[
                None
            ]
            for name, samples in grids.items()
        }
        self.writer.write_images(step, summaries)

    def _columns(self) -> int:
        num_classes = self.config.data.num_classes
        return num_classes if 0 < num_classes <= 20 else 8


class PeriodicEvaluator:
    """Scores samples at config.eval_steps during training and writes them to the CLU writers.

    The feature networks and reference statistics are built at the first evaluation (the
    reference features are cached in WORKDIR/eval, keyed by the networks' weights, so a resumed
    run reuses them). Every process samples and extracts features; process 0 scores and writes.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        apply_fn: sampling.ApplyFn,
        workdir: str,
        writer: metric_writers.MetricWriter,
        mesh: jax.sharding.Mesh,
        decoder: latent_space.PixelDecoder | None = None,
    ):
        self.config = config
        self.apply_fn = apply_fn  # one function for every evaluation: samplers compile once
        self.decoder = decoder
        self.cache_dir = os.path.join(workdir, "eval")
        self.writer = writer
        self.mesh = mesh
        self.is_chief = jax.process_index() == 0
        self.metrics: list[sweep.Metric] | None = None

    def run(self, state: TrainState, step: int) -> dict[str, float]:
        """Samples config.eval_num images per budget and returns {'eval/...': score}."""
        config = self.config
        if self.metrics is None:
            self.metrics = sweep.build_metrics(
                config, cache_dir=self.cache_dir, is_chief=self.is_chief
            )
        start = time.perf_counter()
        try:
            rows, _ = sweep.sweep(
                config,
                state.ema_params if config.sample_use_ema else state.params,
                self.metrics,
                steps=config.eval_steps,
                num=config.eval_num,
                cfg_scale=None,  # the run's guidance policy (latent_space.guidance_scale)
                seed=config.seed + 2,
                batch_size=config.eval_batch_size,
                mesh=self.mesh,
                is_chief=self.is_chief,
                apply_fn=self.apply_fn,
                decoder=self.decoder,
            )
        except features.NonFiniteImagesError as error:
            # Every process holds the same gathered samples, so all of them get here together.
            # A score of NaN images would be meaningless; a diverging model is the loss guard's
            # business (and the save's finiteness check), so training goes on.
            logging.error("Evaluation at step %d skipped: %s", step, error)
            scalars = {"eval/non_finite_samples": 1.0}
            if self.is_chief:
                self.writer.write_scalars(step, scalars)
            return scalars
        scalars: dict[str, float] = {}
        if self.is_chief:
            for metric in self.metrics:
                for bound in ("floor", "ceiling"):
                    if getattr(metric, bound) is not None:
                        scalars[f"eval/{metric.name}_{bound}"] = float(getattr(metric, bound))
            for row in rows:
                for key, value in row.items():
                    if key not in report.ROW_KEYS:
                        name = key.replace("/", "_")
                        scalars[f"eval/{name}/steps_{row['steps']}"] = float(value)
            scalars["perf/eval_seconds"] = time.perf_counter() - start
            self.writer.write_scalars(step, scalars)
            logging.info("Evaluation at step %d: %s", step, scalars)
        return scalars


def _raise_if_not_finite(loss: float, step: int, manager: Any, workdir: str) -> None:
    if np.isfinite(loss):
        return
    manager.wait_until_finished()  # a save in flight is the last good checkpoint: keep it
    raise NonFiniteLossError(
        f"The loss is {loss} at step {step}. Nothing was saved at this step; the last good "
        f"checkpoint is step {manager.latest_step()} in {checkpoint.checkpoint_dir(workdir)} and "
        "a rerun resumes from it. Lower config.optim.learning_rate, set "
        "config.optim.grad_clip_norm > 0 or check the data for NaNs."
    )


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(prefix: str, node: Any) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                visit(name + ".", value)
            elif isinstance(value, (bool, int, float, str)):
                flat[name] = value
            else:
                flat[name] = str(value)

    visit("", config)
    return flat
