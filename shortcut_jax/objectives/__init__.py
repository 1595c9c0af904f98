"""Registry of training objectives.

An objective turns a data batch into a regression problem: the network inputs (x_t, t, d, labels),
the stop-gradient targets, per-example loss weights, and which examples are self-consistency
(bootstrap) examples. The train step owns the forward pass, the loss, the gradient, the optimizer
and the EMA updates, so every objective shares one loop and the loop never branches on an
objective's name: what an objective needs from it is metadata of its registry entry (a teacher,
an EMA target network and its rate, a loss weighting), and how its network turns into samples is
its `Sampler` (one network evaluation per step, run by `shortcut_jax.sampling`).

    @register("name", uses_teacher=True, sampler=EULER)
    def build_targets(apply_fn, teacher_params, batch, rng, settings, step=0):
        ...  # -> (Regression, {metric name: scalar})

`settings` is the frozen `ObjectiveConfig` read from the run config; "cfg" in a name always means
classifier-free guidance (`bootstrap_cfg`, `cfg_scale`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Regression:
    """One regression batch: regress apply_fn(params, x_t, t, d, labels) onto target.

    The train step minimises mean(weight * loss_weighting(l) * l) with l the per-example loss
    (`config.loss`) of the error error_scale * (output - target) (`Objective.loss_weighting`,
    stop-gradient; 1 when None).

    Attributes:
      x_t: (B, ...) network input.
      t: (B,) float32 time in [0, 1] (0 = noise, 1 = data).
      d: (B,) float32 step size in [0, 1] (2**-level for the dyadic levels).
      labels: (B,) int32 class labels, num_classes = null class.
      target: (B, ...) regression target (already stop-gradient).
      is_bootstrap: (B,) bool, True for self-consistency examples.
      weight: (B,) float32 fixed per-example loss weights.
      error_scale: (B,) float32 factors of each example's error before the loss, or None (1):
        for a network whose output enters its prediction scaled (consistency models'
        c_out F), so a non-quadratic loss sees the prediction's error, not the network's.
    """

    x_t: jax.Array
    t: jax.Array
    d: jax.Array
    labels: jax.Array
    target: jax.Array
    is_bootstrap: jax.Array
    weight: jax.Array
    error_scale: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The fields of the run config that objectives and their samplers read.

    Frozen, so it is hashable and safe as a static argument of jit. Fields of one objective carry
    its prefix and come from its sub-config (`config.meanflow`, `config.diffusion`,
    `config.consistency`, `config.live_reflow`; `distill_*` from `config.teacher`).
    """

    name: str
    denoise_timesteps: int
    bootstrap_every: int
    bootstrap_cfg: bool
    cfg_scale: float
    class_dropout_prob: float
    target_clip: float
    num_classes: int
    total_steps: int = 1
    bootstrap_levels: str = "uniform"
    bootstrap_curriculum_fraction: float = 0.5
    bootstrap_level_weights: tuple[float, ...] = ()
    flow_time: str = "uniform_grid"
    flow_time_mean: float = 0.0
    flow_time_std: float = 1.0
    meanflow_ratio_r_neq_t: float = 0.25
    meanflow_time_mean: float = -0.4
    meanflow_time_std: float = 1.0
    meanflow_adaptive_p: float = 1.0
    meanflow_adaptive_c: float = 1e-3
    diffusion_schedule: str = "cosine"
    diffusion_prediction: str = "eps"
    diffusion_clip_x0: float = 1.0
    diffusion_eta: float = 0.0
    consistency_sigma_min: float = 0.002
    consistency_sigma_max: float = 80.0
    consistency_sigma_data: float = 0.5
    consistency_rho: float = 7.0
    consistency_s0: int = 2
    consistency_s1: int = 150
    consistency_mu0: float = 0.9
    consistency_p_mean: float = -1.1
    consistency_p_std: float = 2.0
    live_reflow_steps: int = 8
    live_reflow_levels: str = "all"
    distill_stage_steps: tuple[int, ...] = (1,)
    distill_steps_per_stage: int = 1
    distill_scales: int = 18
    distill_target_ema_rate: float = 0.95
    distill_ode_solver: str = "heun"

    @classmethod
    def from_config(cls, config: Any) -> ObjectiveConfig:
        """Builds it from a run config (ml_collections.ConfigDict)."""
        mean_flow, ddpm = config.meanflow, config.diffusion
        consistency, live = config.consistency, config.live_reflow
        return cls(
            name=str(config.objective),
            denoise_timesteps=int(config.denoise_timesteps),
            bootstrap_every=int(config.bootstrap_every),
            bootstrap_cfg=bool(config.bootstrap_cfg),
            cfg_scale=float(config.cfg_scale),
            class_dropout_prob=float(config.class_dropout_prob),
            target_clip=float(config.target_clip),
            num_classes=int(config.data.num_classes),
            total_steps=int(config.total_steps),
            bootstrap_levels=str(config.get("bootstrap_levels", "uniform")),
            bootstrap_curriculum_fraction=float(config.get("bootstrap_curriculum_fraction", 0.5)),
            bootstrap_level_weights=tuple(
                float(w) for w in config.get("bootstrap_level_weights", ()) or ()
            ),
            flow_time=str(config.get("flow_time", "uniform_grid")),
            flow_time_mean=float(config.get("flow_time_mean", 0.0)),
            flow_time_std=float(config.get("flow_time_std", 1.0)),
            meanflow_ratio_r_neq_t=float(mean_flow.ratio_r_neq_t),
            meanflow_time_mean=float(mean_flow.time_mean),
            meanflow_time_std=float(mean_flow.time_std),
            meanflow_adaptive_p=float(mean_flow.adaptive_p),
            meanflow_adaptive_c=float(mean_flow.adaptive_c),
            diffusion_schedule=str(ddpm.schedule),
            diffusion_prediction=str(ddpm.prediction),
            diffusion_clip_x0=float(ddpm.clip_x0),
            diffusion_eta=float(ddpm.eta),
            consistency_sigma_min=float(consistency.sigma_min),
            consistency_sigma_max=float(consistency.sigma_max),
            consistency_sigma_data=float(consistency.sigma_data),
            consistency_rho=float(consistency.rho),
            consistency_s0=int(consistency.s0),
            consistency_s1=int(consistency.s1),
            consistency_mu0=float(consistency.mu0),
            consistency_p_mean=float(consistency.get("p_mean", -1.1)),
            consistency_p_std=float(consistency.get("p_std", 2.0)),
            live_reflow_steps=int(live.steps),
            live_reflow_levels=str(live.get("levels", "all")),
            **_distillation_fields(config),
        )


def _distillation_fields(config: Any) -> dict[str, Any]:
    """The `config.teacher` fields (none for a config without that section)."""
    if config.get("teacher") is None:
        return {}
    return {
        "distill_stage_steps": stage_steps(config),
        "distill_steps_per_stage": steps_per_stage(config),
        "distill_scales": int(config.teacher.consistency_scales),
        "distill_target_ema_rate": float(config.teacher.target_ema_rate),
        "distill_ode_solver": str(config.teacher.get("ode_solver", "heun")),
    }


def stage_steps(config: Any) -> tuple[int, ...]:
    """The student's step counts, one per progressive-distillation stage.

    `config.teacher.stage_steps`, or () = denoise_timesteps / 2, denoise_timesteps / 4, ..., 1.
    """
    explicit = tuple(int(n) for n in config.teacher.stage_steps)
    if explicit:
        return explicit
    steps, count = [], int(config.denoise_timesteps) // 2
    while count >= 1:
        steps.append(count)
        count //= 2
    return tuple(steps) or (1,)


def steps_per_stage(config: Any) -> int:
    """Training steps per progressive-distillation stage (0 in the config = an even split)."""
    explicit = int(config.teacher.steps_per_stage)
    if explicit > 0:
        return explicit
    return max(1, int(config.total_steps) // len(stage_steps(config)))


@flax.struct.dataclass
class TeacherRun:
    """What the train step hands to an objective with `needs_teacher_run` as its teacher.

    Attributes:
      params: the frozen teacher run's parameters (its model config may differ from the student's).
      student: the usual teacher of the student: its EMA target network when the objective has one
        (`target_network`), else its stop-gradient parameters.
      apply_fn: apply_fn(params, x, t, d, labels) of the teacher run's own model (static).
      denoise_timesteps: the teacher run's finest step count; 1 / it is its flow level (static).
    """

    params: Any
    student: Any
    apply_fn: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)
    denoise_timesteps: int = flax.struct.field(pytree_node=False, default=128)


ApplyFn = Callable[..., jax.Array]
# (apply_fn, teacher_params, batch, rng, settings, step) -> (Regression, metrics); step () int32
# is the number of updates applied so far (curricula), 0 by default.
BuildTargets = Callable[..., tuple[Regression, dict[str, jax.Array]]]
# network(x, t, d) -> the (guided) network output, (B, ...); built by the sampler.
Network = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How an objective's network becomes samples, one network evaluation per step.

    The sampler (`shortcut_jax.sampling`) walks the step schedule t_0 = 0 < t_1 < ... < t_N = 1
    (step sizes d_i = t_{i+1} - t_i) from `start(noise)`, calling
    ``x = step(network, x, t_i, d_i, fresh_noise, settings)`` at each step.

    Attributes:
      step: (network, x (B, ...), t (B,), d (B,), fresh_noise (B, ...) standard normal,
        settings) -> next x. Deterministic steps ignore fresh_noise (jit removes it).
      start: (noise (B, ...) standard normal, settings) -> the state at t = 0.
    """

    step: Callable[[Network, jax.Array, jax.Array, jax.Array, jax.Array, Any], jax.Array]
    start: Callable[[jax.Array, Any], jax.Array] = lambda noise, settings: noise


def euler_step(
    network: Network,
    x: jax.Array,
    t: jax.Array,
    d: jax.Array,
    fresh_noise: jax.Array,
    settings: ObjectiveConfig,
) -> jax.Array:
    """x + d * network(x, t, d): a shortcut step (the network's output is the average velocity
    over [t, t + d]; for flow matching the instantaneous one)."""
    del fresh_noise, settings
    return (x + expand(d, x.ndim) * network(x, t, d)).astype(x.dtype)


EULER = Sampler(step=euler_step)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A registered objective and what the train loop must provide for it.

    Attributes:
      name: the value of `config.objective`.
      build_targets: the pure target builder.
      uses_teacher: the objective evaluates a teacher: the current parameters under stop-gradient
        or their EMA at `config.teacher_ema_rate`, per `config.bootstrap_teacher`.
      target_network: the teacher is always the EMA target network, whatever
        `config.bootstrap_teacher` says (consistency training).
      teacher_ema_rate: (step (), settings) -> the target network's EMA rate at that step; None =
        `config.teacher_ema_rate`.
      loss_weighting: (per-example squared error (B,), settings) -> (B,) weights, applied under
        stop-gradient (MeanFlow's adaptive weighting); None = 1.
      sampler: how the network is sampled.
      min_bootstrap_every: smallest valid `config.bootstrap_every` (0 = the field is unused).
      needs_teacher_run: the objective distils a frozen teacher from another run
        (`config.teacher.workdir`, loaded by `shortcut_jax.teacher`); its build_targets gets a
        `TeacherRun` as the teacher.
      student_starts_as_teacher: the student starts from the teacher run's parameters unless
        `config.init_from` names another run or `config.teacher.init_student` is False
        (progressive distillation).
      uses_pairs: the objective trains on stored noise/sample pairs (`config.data.pairs_dir`,
        batches with a 'noise' entry).
      loss: the objective's own loss kind, what `config.loss.kind = 'auto'` means ('l2', or
        'pseudo_huber' for improved consistency training).
      stages: (config) -> (steps per stage, number of stages) for an objective trained in stages
        (progressive distillation): the learning-rate schedule (warm-up and decay over one stage)
        and the sampling EMA (`ema_params`, started afresh from the parameters after each
        stage's first update) restart at every stage; the last stage runs to total_steps.
        None = one stage.
    """

    name: str
    build_targets: BuildTargets
    uses_teacher: bool
    min_bootstrap_every: int = 0
    target_network: bool = False
    teacher_ema_rate: Callable[[jax.Array, ObjectiveConfig], jax.Array] | None = None
    loss_weighting: Callable[[jax.Array, ObjectiveConfig], jax.Array] | None = None
    sampler: Sampler = EULER
    needs_teacher_run: bool = False
    student_starts_as_teacher: bool = False
    uses_pairs: bool = False
    stages: Callable[[Any], tuple[int, int]] | None = None
    loss: str = "l2"


def loss_kind(config: Any) -> str:
    """`config.loss.kind`, with 'auto' resolved to the objective's own loss (`Objective.loss`)."""
    kind = str((config.get("loss") or {}).get("kind", "auto"))
    if kind != "auto":
        return kind
    name = config.get("objective")
    return get(name).loss if name in _REGISTRY else "l2"


def stage_start(step: jax.Array | int, stages: tuple[int, int]) -> jax.Array:
    """() int32, the first training step of the stage that `step` belongs to.

    Args:
      step: () number of updates applied so far. stages: (steps per stage, number of stages).
    """
    length, count = stages
    stage = jnp.minimum(jnp.asarray(step, jnp.int32) // length, count - 1)
    return stage * length


_REGISTRY: dict[str, Objective] = {}


def register(name: str, *, uses_teacher: bool, **metadata: Any):
    """Decorator that registers a target builder under `name` with its `Objective` metadata."""

    def decorator(fn: BuildTargets) -> BuildTargets:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        _REGISTRY[name] = Objective(name, fn, uses_teacher, **metadata)
        return fn

    return decorator


def get(name: str) -> Objective:
    """Returns the objective registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"config.objective = {name!r} is unknown; allowed: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Names of all registered objectives."""
    return sorted(_REGISTRY)


def uses_ema_teacher(objective: Objective, bootstrap_teacher: str) -> bool:
    """Whether the train state keeps an EMA teacher / target network for `objective`."""
    return objective.target_network or (objective.uses_teacher and bootstrap_teacher == "ema")


def shares_ema_buffer(objective: Objective, config: Any) -> bool:
    """Whether the EMA teacher is `ema_params` itself, so the state keeps no `teacher_params`.

    True when the state keeps an EMA teacher (`uses_ema_teacher`) whose rate is the constant
    `config.teacher_ema_rate` (the objective has no rate schedule) and that rate equals
    `config.ema_rate`: the two EMAs would then start from the same copy and take the same update.
    """
    return (
        uses_ema_teacher(objective, str(config.bootstrap_teacher))
        and objective.teacher_ema_rate is None
        and float(config.teacher_ema_rate) == float(config.ema_rate)
    )


def keeps_teacher_buffer(objective: Objective, config: Any) -> bool:
    """Whether the train state holds `teacher_params`: an EMA teacher that is not `ema_params`."""
    return uses_ema_teacher(objective, str(config.bootstrap_teacher)) and not shares_ema_buffer(
        objective, config
    )


def unit_weights(batch_size: int) -> jax.Array:
    """(B,) float32 ones: the weights of an unweighted regression."""
    return jnp.ones((batch_size,), jnp.float32)


def expand(values: jax.Array, ndim: int) -> jax.Array:
    """Appends singleton axes to per-example values (B,) so they broadcast against (B, ...)."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


# Importing the modules registers them.
from shortcut_jax.objectives import (  # noqa: E402, F401
    consistency_distillation,
    consistency_training,
    diffusion,
    flow_matching,
    live_reflow,
    meanflow,
    progressive_distillation,
    reflow,
    shortcut,
)
