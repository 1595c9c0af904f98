"""Consistency distillation (Song, Dhariwal, Chen and Sutskever, ICML 2023, "Consistency Models",
Algorithm 2) from a frozen flow-matching (or shortcut) teacher run.

The consistency model lives in the paper's own variance-exploding time, x_sigma = x + sigma z, with
the parametrisation, the Karras discretisation sigma_1 = sigma_min < ... < sigma_N = sigma_max and
the multistep sampler of `consistency_training` (imported, not repeated): our t in [0, 1] maps to
sigma(t) and sigma_n sits at t = (N - n) / (N - 1). N is fixed (`config.teacher.consistency_scales`,
the paper's CIFAR-10 CD setting N = 18). Training step (Algorithm 2):

    n ~ U{1, ..., N - 1},  x_{n+1} = x + sigma_{n+1} z,
    x_hat_n = x_{n+1} + (sigma_n - sigma_{n+1}) (x_{n+1} - D(x_{n+1}, sigma_{n+1})) / sigma_{n+1},
    loss = || f_theta(x_{n+1}, sigma_{n+1}) - f_theta-(x_hat_n, sigma_n) ||^2,

one step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma by the solver Phi:
Heun's second-order step (the paper's CD experiments, after EDM; `config.teacher.ode_solver`
'heun', two teacher evaluations) or the Euler step written above ('euler', one evaluation),

    Heun: x_e = Euler step,  x_hat_n = x_{n+1} + (sigma_n - sigma_{n+1}) (g(x_{n+1}, sigma_{n+1})
          + g(x_e, sigma_n)) / 2,  g(x, sigma) = (x - D(x, sigma)) / sigma,

and the target network theta- the EMA of theta at the fixed
rate mu = `config.teacher.target_ema_rate` (0.95, their CIFAR-10 CD value), kept in the train
state's target slot. The teacher's denoiser D comes from its flow velocity: x + sigma z scaled by
1 / (1 + sigma) is the flow point (1 - s) z + s x at flow time s = 1 / (1 + sigma), so

    D(x_sigma, sigma) = x_f + (1 - s) v_teacher(x_f, s, 1 / T_teacher),
    x_f = x_sigma / (1 + sigma),

the data prediction of the flow teacher at its finest step size (its flow level). The metric is
squared L2 (lambda = 1): the paper's best CD runs use LPIPS, whose pretrained weights cannot be
loaded offline.

The student starts as a copy of the teacher (`student_starts_as_teacher`; the consistency models
code copies the teacher's weights into the model and the target model before training, and so
does the shortcut paper's CD baseline), so it is the same velocity network in the same flow
parametrisation. Its consistency function is the paper's with the teacher's denoiser in place of
EDM's: with EDM's D = c_skip_edm x + c_out_edm F, F = (D - c_skip_edm x) / c_out_edm, and

    f(x, sigma) = c_skip x + c_out F = c_skip x + (sigma - sigma_min) / sigma (D - c_skip_edm x),
    c_skip_edm = sigma_data^2 / (sigma^2 + sigma_data^2),  D the student's own flow denoiser,

which is x at sigma_min and the student's denoiser where sigma >> sigma_min. It is affine in the
network's velocity, f = a x + b v(x / (1 + sigma), 1 / (1 + sigma), 1 / T) with
b = (sigma - sigma_min) / (1 + sigma) (`student_coefficients`), so the step regresses v onto
(f_target - a x) / b with the error scaled by b: the loss is the squared L2 distance of the two f
values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax.objectives import (
    ApplyFn,
    ObjectiveConfig,
    Regression,
    Sampler,
    TeacherRun,
    expand,
    register,
)
from shortcut_jax.objectives.consistency_training import coefficients, renoise, sigma_of
from shortcut_jax.objectives.flow_matching import drop_labels


def flow_denoiser(
    velocity: ApplyFn, x_sigma: jax.Array, sigma: jax.Array, teacher_d: float
) -> jax.Array:
    """D(x_sigma, sigma): the flow teacher's data prediction at a VE noise level.

    Args:
      velocity: velocity(x, t, d) -> (B, ...), the teacher in flow time.
      x_sigma: (B, ...) noisy points x + sigma z. sigma: (B,) noise levels.
      teacher_d: the step size the teacher is queried at (its finest level).
    """
    flow_t = 1.0 / (1.0 + sigma)
    x_flow = x_sigma * expand(flow_t, x_sigma.ndim)
    v = velocity(x_flow, flow_t, jnp.full_like(sigma, teacher_d))
    return x_flow + expand(1.0 - flow_t, x_sigma.ndim) * v


def euler_ode_step(
    velocity: ApplyFn,
    x: jax.Array,
    sigma_from: jax.Array,
    sigma_to: jax.Array,
    teacher_d: float,
) -> jax.Array:
    """One Euler step of dx/dsigma = (x - D(x, sigma)) / sigma from sigma_from to sigma_to."""
    slope = _ode_slope(velocity, x, sigma_from, teacher_d)
    return x + expand(sigma_to - sigma_from, x.ndim) * slope


def heun_ode_step(
    velocity: ApplyFn,
    x: jax.Array,
    sigma_from: jax.Array,
    sigma_to: jax.Array,
    teacher_d: float,
) -> jax.Array:
    """One Heun (second-order) step of the same ODE: the mean of the slopes at both ends."""
    slope = _ode_slope(velocity, x, sigma_from, teacher_d)
    x_euler = x + expand(sigma_to - sigma_from, x.ndim) * slope
    slope_end = _ode_slope(velocity, x_euler, sigma_to, teacher_d)
    return x + expand(sigma_to - sigma_from, x.ndim) * (slope + slope_end) / 2


ODE_SOLVERS = {"euler": euler_ode_step, "heun": heun_ode_step}


def _ode_slope(velocity: ApplyFn, x: jax.Array, sigma: jax.Array, teacher_d: float) -> jax.Array:
    return (x - flow_denoiser(velocity, x, sigma, teacher_d)) / expand(sigma, x.ndim)


def student_coefficients(
    sigma: jax.Array, settings: ObjectiveConfig
) -> tuple[jax.Array, jax.Array]:
    """(a, b) at noise levels sigma (B,): f(x, sigma) = a x + b v(x / (1 + sigma), ...)."""
    sigma_data, sigma_min = settings.consistency_sigma_data, settings.consistency_sigma_min
    c_skip, _, _ = coefficients(sigma, settings)
    c_skip_edm = sigma_data**2 / (sigma**2 + sigma_data**2)
    a = c_skip + (sigma - sigma_min) / sigma * (1.0 / (1.0 + sigma) - c_skip_edm)
    return a, (sigma - sigma_min) / (1.0 + sigma)


def student_function(
    network: ApplyFn, x: jax.Array, t: jax.Array, settings: ObjectiveConfig
) -> jax.Array:
    """f(x, sigma(t)) of a student that is a velocity network in flow time (module docstring).

    Args:
      network: network(x, flow time, d) -> velocity; queried at its finest level 1 / T.
      x: (B, ...) points x + sigma z. t: (B,) our consistency time (`sigma_of`).
    """
    sigma = sigma_of(t, settings)
    a, b = student_coefficients(sigma, settings)
    flow_t = 1.0 / (1.0 + sigma)
    fine = jnp.full_like(sigma, 1.0 / settings.denoise_timesteps)
    v = network(x * expand(flow_t, x.ndim), flow_t, fine)
    return expand(a, x.ndim) * x + expand(b, x.ndim) * v


def distilled_step(
    network: ApplyFn,
    x: jax.Array,
    t: jax.Array,
    d: jax.Array,
    fresh_noise: jax.Array,
    settings: ObjectiveConfig,
) -> jax.Array:
    """One step of multistep consistency sampling with the distilled student's f."""
    return renoise(student_function(network, x, t, settings), t, d, fresh_noise, settings)


def _start(noise: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    return settings.consistency_sigma_max * noise


def _target_rate(step: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    del step
    return jnp.asarray(settings.distill_target_ema_rate, jnp.float32)


@register(
    "consistency_distillation",
    uses_teacher=True,
    target_network=True,
    teacher_ema_rate=_target_rate,
    needs_teacher_run=True,
    student_starts_as_teacher=True,
    sampler=Sampler(step=distilled_step, start=_start),
)
def consistency_distillation_targets(
    apply_fn: ApplyFn,
    teacher: TeacherRun,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """The consistency-distillation regression batch.

    Args:
      apply_fn: apply_fn(params, x, t, d, labels) -> velocity, the student network.
      teacher: the frozen flow teacher run; `teacher.student` is the EMA target network theta-.
      batch: {'image': (B, ...) data, 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: unused (N and mu are fixed).
    """
    del step
    x1 = batch["image"]
    batch_size = x1.shape[0]
    noise_rng, drop_rng, index_rng = jax.random.split(rng, 3)
    z = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)
    scales = settings.distill_scales
    n = jax.random.randint(index_rng, (batch_size,), 1, scales)
    spacing = 1.0 / (scales - 1)
    t_target = (scales - n).astype(jnp.float32) * spacing
    t_student = t_target - spacing
    sigma_student, sigma_target = sigma_of(t_student, settings), sigma_of(t_target, settings)
    x_student = x1 + expand(sigma_student, x1.ndim) * z

    def teacher_velocity(x: jax.Array, t: jax.Array, d: jax.Array) -> jax.Array:
        return teacher.apply_fn(teacher.params, x, t, d, labels)

    x_hat = ODE_SOLVERS[settings.distill_ode_solver](
        teacher_velocity, x_student, sigma_student, sigma_target, 1.0 / teacher.denoise_timesteps
    )

    def target_network(x: jax.Array, t: jax.Array, d: jax.Array) -> jax.Array:
        return apply_fn(teacher.student, x, t, d, labels)

    f_target = jax.lax.stop_gradient(student_function(target_network, x_hat, t_target, settings))
    a, b = student_coefficients(sigma_student, settings)
    flow_t = 1.0 / (1.0 + sigma_student)
    target = (f_target - expand(a, x1.ndim) * x_student) / expand(b, x1.ndim)
    regression = Regression(
        x_t=expand(flow_t, x1.ndim) * x_student,
        t=flow_t,
        d=jnp.full((batch_size,), 1.0 / settings.denoise_timesteps, jnp.float32),
        labels=labels,
        target=jax.lax.stop_gradient(target),
        is_bootstrap=jnp.ones((batch_size,), bool),
        weight=jnp.ones((batch_size,), jnp.float32),
        error_scale=b,
    )
    return regression, {"consistency_scales": jnp.asarray(scales, jnp.float32)}
