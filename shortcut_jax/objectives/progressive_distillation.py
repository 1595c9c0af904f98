"""Progressive distillation (Salimans and Ho, ICLR 2022, "Progressive Distillation for Fast Sampling
of Diffusion Models", Algorithm 2), in the flow form for a flow-matching or shortcut teacher.

The paper distils a DDIM sampler: the student learns to take in one step of size 2d what the
teacher takes in two DDIM steps of size d, the step count halves stage by stage, and after each
stage the student becomes the next stage's teacher. Here times follow the library's flow
convention x_t = (1 - t) x0 + t x1 (x0 noise at t = 0, x1 data at t = 1) and the networks predict
velocities, so one DDIM step is one Euler step x + d v (for the linear path the deterministic DDIM
update from an x1-prediction x1_hat = x_t + (1 - t) v is exactly the Euler step). For a student
with N steps (step size 2d = 1 / N) at a grid time t = i / N, i ~ U{0, ..., N - 1}:

    x_mid = x_t + d v_teacher(x_t, t, d),
    x_end = x_mid + d v_teacher(x_mid, t + d, d),
    target = (x_end - x_t) / (2 d),

and the student regresses v_student(x_t, t, 2d) onto the target with squared error. The student's
one step x_t + 2d v_student then lands on x_end, the two-teacher-step point. Equivalence with the
paper's x-space target: the paper's x_tilde is the data prediction whose one DDIM step from t
reaches the two-teacher-step point; here that is x1_tilde = x_t + (1 - t) target, so
||x1_hat - x1_tilde||^2 = (1 - t)^2 ||v_student - target||^2: our unweighted velocity loss is the
paper's x-space loss with weight 1 / (1 - t)^2, a truncated-SNR-like weighting (the paper's
max(SNR, 1) also grows towards the data end).

Stages (`config.teacher.stage_steps`, default denoise_timesteps / 2, ..., 2, 1, each half the one
before; `config.teacher.steps_per_stage` training steps each, 0 = an even split of total_steps):
stage 0's teacher is the frozen teacher run (`config.teacher.workdir`, its own model, queried at
step size d = 1 / (2 N_0)); the student starts from that run's parameters (Algorithm 2 initialises
the student as a copy of the teacher) unless `config.init_from` names another run or
`config.teacher.init_student` is False (a fresh student, e.g. with another model config). At the
end of each stage the student's current parameters (not their EMA, as in Algorithm 2) are copied
into the train state's target slot and are the frozen teacher of the next stage: the slot is an
"EMA" whose rate is 1 (kept) except at the last step of a stage, where it is 0 (a copy). The
student keeps its step-size input, so it samples at any step count with the Euler sampler; it is
trained at the stage's level d = 1 / N_k.

Each stage is its own training run, as in Algorithm 2: the learning-rate schedule (the run's
warm-up and decay, over the stage's steps) restarts at every stage, and so does the sampling EMA
(`ema_params` starts afresh from the student after the stage's first update), so the final
student's EMA holds nothing of earlier stages. A stage much shorter than the EMA's horizon is
still scored mostly from its starting point (350 steps at rate 0.999 keep 70 % of the stage's
first update); the paper's own configs use no EMA (`config.ema_rate = 0`, which
`shortcut_jax.paper_settings` sets), so each stage is scored from its own final parameters. The
Adam moments carry over from stage to stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax import timesteps
from shortcut_jax.objectives import (
    ApplyFn,
    ObjectiveConfig,
    Regression,
    TeacherRun,
    expand,
    register,
    stage_steps,
    steps_per_stage,
    unit_weights,
)
from shortcut_jax.objectives.flow_matching import drop_labels


def stage_index(step: jax.Array | int, settings: ObjectiveConfig) -> jax.Array:
    """() int32, the stage at training step `step` (the last stage once the schedule is done)."""
    stage = jnp.asarray(step, jnp.int32) // settings.distill_steps_per_stage
    return jnp.minimum(stage, len(settings.distill_stage_steps) - 1)


def student_steps(step: jax.Array | int, settings: ObjectiveConfig) -> jax.Array:
    """() int32, the student's step count N_k at training step `step`."""
    counts = jnp.asarray(settings.distill_stage_steps, jnp.int32)
    return counts[stage_index(step, settings)]


def stage_teacher_rate(step: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """The target slot's EMA rate after training step `step`: 0 (copy the student) when the next
    step starts a new stage, else 1 (keep the stage's teacher)."""
    next_step = jnp.asarray(step, jnp.int32) + 1
    starts_stage = (next_step % settings.distill_steps_per_stage == 0) & (
        next_step // settings.distill_steps_per_stage < len(settings.distill_stage_steps)
    )
    return jnp.where(starts_stage, 0.0, 1.0).astype(jnp.float32)


def two_step_target(
    velocity: ApplyFn,
    x_t: jax.Array,
    t: jax.Array,
    d_teacher: jax.Array,
) -> jax.Array:
    """(x_end - x_t) / (2 d): the average velocity of two teacher Euler steps of size d.

    Args:
      velocity: velocity(x, t, d) -> (B, ...), the teacher.
      x_t: (B, ...) start points. t: (B,) start times. d_teacher: (B,) teacher step sizes.
    """
    d = expand(d_teacher, x_t.ndim)
    x_mid = x_t + d * velocity(x_t, t, d_teacher)
    x_end = x_mid + d * velocity(x_mid, t + d_teacher, d_teacher)
    return (x_end - x_t) / (2.0 * d)


@register(
    "progressive_distillation",
    uses_teacher=True,
    target_network=True,
    teacher_ema_rate=stage_teacher_rate,
    needs_teacher_run=True,
    student_starts_as_teacher=True,
    stages=lambda config: (steps_per_stage(config), len(stage_steps(config))),
)
def progressive_distillation_targets(
    apply_fn: ApplyFn,
    teacher: TeacherRun,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """The progressive-distillation regression batch at training step `step`.

    Args:
      apply_fn: apply_fn(params, x, t, d, labels) -> the student's velocity.
      teacher: the frozen teacher run (stage 0) and, in `teacher.student`, the previous stage's
        student (later stages).
      batch: {'image': (B, ...) data, 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: () training step.
    """
    x1 = batch["image"]
    batch_size = x1.shape[0]
    noise_rng, drop_rng, time_rng = jax.random.split(rng, 3)
    x0 = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)
    num_steps = student_steps(step, settings)
    index = jax.random.randint(time_rng, (batch_size,), 0, num_steps)
    t = index.astype(jnp.float32) / num_steps.astype(jnp.float32)
    d_student = jnp.full((batch_size,), 1.0, jnp.float32) / num_steps.astype(jnp.float32)
    x_t = timesteps.interpolate(x0, x1, t)

    def from_run() -> jax.Array:
        def velocity(x, time, d):
            return teacher.apply_fn(teacher.params, x, time, d, labels)

        return two_step_target(velocity, x_t, t, d_student / 2)

    def from_previous_stage() -> jax.Array:
        def velocity(x, time, d):
            return apply_fn(teacher.student, x, time, d, labels)

        return two_step_target(velocity, x_t, t, d_student / 2)

    stage = stage_index(step, settings)
    target = jax.lax.cond(stage == 0, from_run, from_previous_stage)
    regression = Regression(
        x_t=x_t,
        t=t,
        d=d_student,
        labels=labels,
        target=jax.lax.stop_gradient(target),
        is_bootstrap=jnp.ones((batch_size,), bool),
        weight=unit_weights(batch_size),
    )
    metrics = {
        "distill_stage": stage.astype(jnp.float32),
        "distill_student_steps": num_steps.astype(jnp.float32),
    }
    return regression, metrics
