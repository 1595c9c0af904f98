"""The train step shared by every objective: targets, loss, gradient, optimizer and EMA updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from shortcut_jax import objectives, optim, timesteps
from shortcut_jax.state import TrainState

# A metric is accumulated as (total, count) so that averages over many steps are exact even when
# a step has no example of a kind (e.g. no bootstrap example at some level).
Metrics = dict[str, tuple[jax.Array, jax.Array]]


def make_apply_fn(model: nn.Module) -> Callable[..., jax.Array]:
    """Wraps a model as apply_fn(params, x, t, d, labels) -> output, d a float step size."""

    def apply_fn(params: Any, x: jax.Array, t: jax.Array, d: jax.Array, labels: jax.Array):
        return model.apply({"params": params}, x, t, d, labels)

    return apply_fn


def bootstrap_level_name(level: int) -> str:
    """Metric name of the bootstrap loss for student step size d = 2**-level."""
    return f"loss_bootstrap/d=1_{2**level}"


def regression_metrics(
    per_example_loss: jax.Array, regression: objectives.Regression, denoise_timesteps: int
) -> Metrics:
    """Loss totals and counts: all, flow part, bootstrap part and bootstrap part per step size.

    Args:
      per_example_loss: (B,) mean squared error of each example (unweighted, so the numbers of
        every objective are comparable).
      regression: the batch the loss was computed on.
      denoise_timesteps: defines the levels.
    """
    ones = jnp.ones_like(per_example_loss)
    is_bootstrap = regression.is_bootstrap.astype(per_example_loss.dtype)

    def masked(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.sum(per_example_loss * mask), jnp.sum(mask)

    metrics = {
        "loss": masked(ones),
        "loss_flow": masked(ones - is_bootstrap),
        "loss_bootstrap": masked(is_bootstrap),
    }
    for level in range(timesteps.num_levels(denoise_timesteps)):
        at_level = (regression.d == timesteps.step_size(level)).astype(per_example_loss.dtype)
        metrics[bootstrap_level_name(level)] = masked(is_bootstrap * at_level)
    return metrics


def pseudo_huber_c(huber_c: float, dim: int) -> float:
    """The pseudo-Huber constant c: `huber_c` (`config.loss.huber_c`), or 0.00054 * sqrt(dim)
    when it is 0 (Song and Dhariwal 2023, improved consistency training; dim = H * W * C)."""
    return float(huber_c) if huber_c > 0 else 0.00054 * float(dim) ** 0.5


def per_example_loss(
    mean_square: jax.Array, dim: int, kind: str, huber_c: float = 0.0
) -> jax.Array:
    """The per-example loss from the per-example mean squared error (B,) over `dim` values.

    'l2': the mean squared error itself. 'pseudo_huber': sqrt(||e||^2 + c^2) - c with
    ||e||^2 = dim * mean_square, the squared error near 0 and the absolute error far from it.
    """
    if kind == "l2":
        return mean_square
    if kind == "pseudo_huber":
        return jnp.sqrt(dim * mean_square + huber_c**2) - huber_c
    raise ValueError(f"config.loss.kind = {kind!r} is unknown; allowed: 'l2', 'pseudo_huber'")


def make_loss_fn(
    config: ml_collections.ConfigDict, model: nn.Module
) -> Callable[[Any, objectives.Regression], tuple[jax.Array, jax.Array]]:
    """Builds loss_fn(params, regression) -> (loss, logged per-example loss) of the train step.

    loss: () the mean over the batch of weight * adaptive * l(e), where l is `config.loss.kind`
    ('auto': the objective's own) of the per-example error e (scaled by
    `regression.error_scale`), weight is `regression.weight` and adaptive the stop-gradient
    weighting 1 / (l + c)^p of the objective (MeanFlow) or of `config.loss.adaptive_p` (1 when
    neither). The logged per-example loss (B,) is `regression.weight` times the (scaled) mean
    squared error, whatever the loss kind and weighting, so the logged numbers of every run
    compare.
    """
    objective = objectives.get(config.objective)
    objective_config = objectives.ObjectiveConfig.from_config(config)
    apply_fn = make_apply_fn(model)
    loss_config = config.get("loss") or ml_collections.ConfigDict()
    kind = objectives.loss_kind(config)
    adaptive_p = float(loss_config.get("adaptive_p", 0.0))
    adaptive_c = float(loss_config.get("adaptive_c", 1e-3))
    explicit_huber_c = float(loss_config.get("huber_c", 0.0))

    def loss_fn(params: Any, regression: objectives.Regression) -> tuple[jax.Array, jax.Array]:
        prediction = apply_fn(params, regression.x_t, regression.t, regression.d, regression.labels)
        error = jnp.square(prediction - regression.target)
        mean_square = jnp.mean(error.reshape(error.shape[0], -1), axis=1)
        if regression.error_scale is not None:
            mean_square = jnp.square(regression.error_scale) * mean_square
        dim = error[0].size
        huber_c = pseudo_huber_c(explicit_huber_c, dim) if kind == "pseudo_huber" else 0.0
        loss = per_example_loss(mean_square, dim, kind, huber_c)
        weight = regression.weight
        if objective.loss_weighting is not None:
            adaptive = objective.loss_weighting(loss, objective_config)
            weight = weight * jax.lax.stop_gradient(adaptive)
        elif adaptive_p > 0:
            adaptive = 1.0 / jnp.power(loss + adaptive_c, adaptive_p)
            weight = weight * jax.lax.stop_gradient(adaptive)
        return jnp.mean(weight * loss), regression.weight * mean_square

    return loss_fn


def make_update_fn(
    config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Any], TrainState]:
    """Builds update(state, grads) -> state one step on: optimizer, EMA and EMA teacher.

    The sampling EMA restarts at each stage of an objective trained in stages
    (`objectives.Objective.stages`).

    A teacher that shares the EMA buffer (`objectives.shares_ema_buffer`) is updated once, as
    `ema_params`.
    """
    objective = objectives.get(config.objective)
    objective_config = objectives.ObjectiveConfig.from_config(config)
    ema_rate = float(config.ema_rate)
    ema_teacher = objectives.keeps_teacher_buffer(objective, config)

    def teacher_rate(step: jax.Array) -> jax.Array:
        if objective.teacher_ema_rate is None:
            return jnp.asarray(config.teacher_ema_rate, jnp.float32)
        return objective.teacher_ema_rate(step, objective_config)

    stages = objective.stages(config) if objective.stages is not None else None

    def sampling_ema_step_size(step: jax.Array) -> jax.Array | float:
        if stages is None:
            return 1.0 - ema_rate
        # A fresh EMA per stage: the stage's first update copies the parameters.
        starts = objectives.stage_start(step, stages) == step
        return jnp.where(starts, 1.0, 1.0 - ema_rate).astype(jnp.float32)

    def update(state: TrainState, grads: Any) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rate = teacher_rate(state.step)
        ema_step_size = sampling_ema_step_size(state.step)
        return state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=optax.incremental_update(params, state.ema_params, ema_step_size),
            teacher_params=(
                optax.incremental_update(params, state.teacher_params, 1.0 - rate)
                if ema_teacher
                else state.teacher_params
            ),
        )

    return update


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    teacher_run: objectives.TeacherRun | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Builds the pure train step (state, batch, teacher_params=None) -> (new_state, metrics).

    batch: {'image': (B, ...) float32 in [-1, 1], 'label': (B,) int32}. It is jitted, sharded and
    given its frozen inputs in one place, `shortcut_jax.compiled_step.build`.
    For an objective with `needs_teacher_run`, `teacher_run` is the frozen run
    (`shortcut_jax.teacher.prepare`), whose static fields are used here and whose parameters are
    passed to each call as `teacher_params` (an argument, so they are not compiled in).
    """
    if objectives.get(config.objective).needs_teacher_run and teacher_run is None:
        raise ValueError(f"objective {config.objective!r} needs teacher_run (teacher.prepare)")
    objective = objectives.get(config.objective)
    objective_config = objectives.ObjectiveConfig.from_config(config)
    apply_fn = make_apply_fn(model)
    schedule = optim.learning_rate_schedule(config)
    ema_teacher = objectives.keeps_teacher_buffer(objective, config)
    shared_teacher = objectives.shares_ema_buffer(objective, config)
    loss_fn = make_loss_fn(config, model)
    update = make_update_fn(config, optimizer)

    def train_step(
        state: TrainState, batch: dict, teacher_params: Any = None
    ) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        if shared_teacher:
            teacher = state.ema_params
        elif ema_teacher:
            teacher = state.teacher_params
        else:
            teacher = jax.lax.stop_gradient(state.params)
        if objective.needs_teacher_run:
            teacher = teacher_run.replace(
                params=jax.lax.stop_gradient(teacher_params), student=teacher
            )
        regression, objective_metrics = objective.build_targets(
            apply_fn, teacher, batch, rng, objective_config, state.step
        )
        (_, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, regression
        )
        new_state = update(state, grads)
        one = jnp.ones((), jnp.float32)
        metrics = regression_metrics(per_example, regression, config.denoise_timesteps)
        metrics["grad_norm"] = (optax.global_norm(grads), one)
        metrics["param_norm"] = (optax.global_norm(new_state.params), one)
        metrics["learning_rate"] = (jnp.asarray(schedule(state.step), jnp.float32), one)
        for name, value in objective_metrics.items():
            metrics[name] = (value, one)
        return new_state, metrics

    return train_step


def summarize(accumulated: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """Turns accumulated (total, count) pairs into averages; metrics never observed are dropped."""
    summary = {}
    for name, (total, count) in accumulated.items():
        if float(count) > 0:
            summary[name] = float(total) / float(count)
    return summary
