"""Consistency training (Song, Dhariwal, Chen and Sutskever 2023, "Consistency Models", Alg. 3).

Variance-exploding noise x_sigma = x + sigma z with sigma in [sigma_min, sigma_max] (EDM, Karras et
al. 2022). The consistency function is parametrised with skip and output coefficients (paper
eq. 5 and appendix C, with the EDM input scaling c_in):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma)),
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
    c_out  = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2),
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2),

so f(x, sigma_min) = x. F is the library's network; its time is our t in [0, 1] with
sigma(t) = (sigma_max^(1/rho) + t (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (t = 0 noise,
t = 1 sigma_min; the Karras discretisation sigma_1 < ... < sigma_N is t = (N - i) / (N - 1)); its
step-size input is 0 (unused). The loss at training step k (Alg. 3) is

    || f_theta(x + sigma_{n+1} z, sigma_{n+1}) - f_theta-(x + sigma_n z, sigma_n) ||^2,
    n ~ U{1, ..., N(k) - 1},  the same z for both,

with the target network theta- the EMA of theta at rate mu(k) (the train state's teacher, always an
EMA for this objective), and the curriculum (appendix C, eq. for N(k) and mu(k))

    N(k)  = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1,  mu(k) = exp(s0 log(mu0) / N(k)),

K = config.total_steps; defaults s0 = 2, s1 = 150, mu0 = 0.9 (their CIFAR-10 setting). The metric:
the paper's best CT runs use LPIPS, which needs pretrained weights we cannot load offline, so we use
its squared L2 metric (also in the paper, lambda(sigma) = 1). The train step regresses F, so the
target is written in F's terms, F_tgt = (f_target - c_skip x) / c_out, with per-example weight
c_out^2, which makes the weighted loss exactly the squared L2 distance of the two f values.

Sampling is the paper's multistep consistency sampling (Alg. 1): x = sigma_max z, then at each
time point x0_hat = f(x, sigma_i) and, before the next one, x = x0_hat + sqrt(sigma_{i+1}^2 -
sigma_min^2) z' with fresh noise z'; one step is the single-step sample f(sigma_max z, sigma_max).
The time points are sigma(t_i) of the library's step schedule.

`improved_consistency_training` is iCT (Song and Dhariwal 2023, "Improved Techniques for Training
Consistency Models", section 3 and Algorithm 1), with the same parametrisation and sampler:

- no EMA target: theta- = stop_grad(theta) (the target slot copies the parameters every step);
- the pseudo-Huber metric sqrt(||f - f-||^2 + c^2) - c, c = 0.00054 sqrt(H W C) (`config.loss`
  'auto' picks it), on the consistency functions' difference (`Regression.error_scale` = c_out);
- the loss weight lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n);
- the lognormal noise schedule p(n) ~ erf((ln sigma_{n+1} - P_mean) / (sqrt 2 P_std))
  - erf((ln sigma_n - P_mean) / (sqrt 2 P_std)), P_mean = -1.1, P_std = 2
  (`config.consistency.p_mean`, `p_std`);
- the exponential curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1,
  K' = floor(K / (log2 floor(s1 / s0) + 1)), with the paper's s0 = 10, s1 = 1280 set by
  `shortcut_jax.paper_settings` (the config defaults are the 2023 algorithm's).

Left out: iCT's network (NCSN++ with dropout 0.3) and its two-step sampler's tuned mid point; the
library's DiT and the multistep sampler above are used.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from shortcut_jax.objectives import (
    ApplyFn,
    Network,
    ObjectiveConfig,
    Regression,
    Sampler,
    expand,
    register,
)
from shortcut_jax.objectives.flow_matching import drop_labels


def sigma_of(t: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """The noise level of our time t in [0, 1] (0 -> sigma_max, 1 -> sigma_min). Returns (B,)."""
    inv_rho = 1.0 / settings.consistency_rho
    low = settings.consistency_sigma_min**inv_rho
    high = settings.consistency_sigma_max**inv_rho
    return (high + jnp.asarray(t, jnp.float32) * (low - high)) ** settings.consistency_rho


def coefficients(
    sigma: jax.Array, settings: ObjectiveConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in) at noise levels sigma (B,)."""
    sigma_data, sigma_min = settings.consistency_sigma_data, settings.consistency_sigma_min
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma_data**2 + sigma**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def consistency_function(
    network: Network, x: jax.Array, t: jax.Array, settings: ObjectiveConfig
) -> jax.Array:
    """f(x, sigma(t)) = c_skip x + c_out network(c_in x, t, 0). x: (B, ...); t: (B,)."""
    c_skip, c_out, c_in = coefficients(sigma_of(t, settings), settings)
    output = network(expand(c_in, x.ndim) * x, t, jnp.zeros_like(t))
    return expand(c_skip, x.ndim) * x + expand(c_out, x.ndim) * output


def num_scales(step: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """N(k), the discretisation at training step k (an int32 in [s0, s1 + 1])."""
    s0, s1 = settings.consistency_s0, settings.consistency_s1
    fraction = jnp.asarray(step, jnp.float32) / max(settings.total_steps, 1)
    value = jnp.ceil(jnp.sqrt(fraction * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    return jnp.clip(value, s0, s1 + 1).astype(jnp.int32)


def target_ema_rate(step: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """mu(k) = exp(s0 log(mu0) / N(k)), the target network's EMA rate at step k."""
    scales = num_scales(step, settings).astype(jnp.float32)
    return jnp.exp(settings.consistency_s0 * jnp.log(settings.consistency_mu0) / scales)


def consistency_step(
    network: Network,
    x: jax.Array,
    t: jax.Array,
    d: jax.Array,
    fresh_noise: jax.Array,
    settings: ObjectiveConfig,
) -> jax.Array:
    """One step of multistep consistency sampling: denoise at t, re-noise to t + d."""
    return renoise(consistency_function(network, x, t, settings), t, d, fresh_noise, settings)


def renoise(
    x0: jax.Array, t: jax.Array, d: jax.Array, fresh_noise: jax.Array, settings: ObjectiveConfig
) -> jax.Array:
    """The denoised x0 taken to the noise level of time t + d (multistep consistency sampling)."""
    sigma_next = sigma_of(jnp.minimum(t + d, 1.0), settings)
    # At the last time point sigma_next = sigma_min, so no noise is added.
    scale = jnp.sqrt(jnp.maximum(sigma_next**2 - settings.consistency_sigma_min**2, 0.0))
    return x0 + expand(scale, x0.ndim) * fresh_noise


def _start(noise: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    return settings.consistency_sigma_max * noise


@register(
    "consistency_training",
    uses_teacher=True,
    target_network=True,
    teacher_ema_rate=target_ema_rate,
    sampler=Sampler(step=consistency_step, start=_start),
)
def consistency_training_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """The consistency-training regression batch at training step `step`.

    Args:
      apply_fn: apply_fn(params, x, t, d, labels) -> F.
      teacher_params: the EMA target network theta-.
      batch: {'image': (B, ...) data, 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: () training step k of the curriculum.
    """
    x1 = batch["image"]
    batch_size = x1.shape[0]
    noise_rng, drop_rng, index_rng = jax.random.split(rng, 3)
    z = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)
    scales = num_scales(step, settings)
    # n in {1, ..., N - 1}; sigma_n sits at t = (N - n) / (N - 1), sigma_{n+1} one grid step lower.
    n = jax.random.randint(index_rng, (batch_size,), 1, scales)
    regression = adjacent_levels_regression(
        apply_fn, teacher_params, x1, z, labels, scales, n, settings
    )
    c_out = regression.error_scale
    regression = regression.replace(weight=c_out**2, error_scale=None)
    return regression, {"consistency_scales": scales.astype(jnp.float32)}


def adjacent_levels_regression(
    apply_fn: ApplyFn,
    teacher_params: Any,
    x1: jax.Array,
    z: jax.Array,
    labels: jax.Array,
    scales: jax.Array,
    n: jax.Array,
    settings: ObjectiveConfig,
) -> Regression:
    """The student at sigma_{n+1} regresses the target network's f at sigma_n (the same noise).

    Written in F's terms: target (f_target - c_skip x) / c_out at the student's level, so that
    c_out (F - target) is the difference of the two f values; `error_scale` holds c_out and
    `weight` is 1 (the callers set their weighting).

    Args:
      x1: (B, ...) data. z: (B, ...) the noise of both levels. labels: (B,) after dropout.
      scales: () int32 N, the discretisation. n: (B,) int32 in {1, ..., N - 1}.
    """
    batch_size = x1.shape[0]
    spacing = 1.0 / (scales - 1).astype(jnp.float32)
    t_target = (scales - n).astype(jnp.float32) * spacing
    t_student = t_target - spacing
    x_target = x1 + expand(sigma_of(t_target, settings), x1.ndim) * z
    x_student = x1 + expand(sigma_of(t_student, settings), x1.ndim) * z

    def target_network(x: jax.Array, t: jax.Array, d: jax.Array) -> jax.Array:
        return apply_fn(teacher_params, x, t, d, labels)

    f_target = jax.lax.stop_gradient(
        consistency_function(target_network, x_target, t_target, settings)
    )
    c_skip, c_out, c_in = coefficients(sigma_of(t_student, settings), settings)
    target = (f_target - expand(c_skip, x1.ndim) * x_student) / expand(c_out, x1.ndim)
    return Regression(
        x_t=expand(c_in, x1.ndim) * x_student,
        t=t_student,
        d=jnp.zeros((batch_size,), jnp.float32),
        labels=labels,
        target=jax.lax.stop_gradient(target),
        is_bootstrap=jnp.ones((batch_size,), bool),
        weight=jnp.ones((batch_size,), jnp.float32),
        error_scale=c_out,
    )


def improved_num_scales(step: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """iCT's N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    s0, s1 = settings.consistency_s0, settings.consistency_s1
    doublings = int(math.log2(max(s1 // s0, 1))) + 1
    stage_length = max(settings.total_steps // doublings, 1)
    exponent = jnp.asarray(step, jnp.int32) // stage_length
    value = jnp.minimum(s0 * jnp.left_shift(1, jnp.minimum(exponent, 30)), s1) + 1
    return value.astype(jnp.int32)


def lognormal_index_logits(scales: jax.Array, max_scales: int, settings: ObjectiveConfig):
    """Log-probabilities of n in {1, ..., N - 1} under iCT's lognormal schedule, (max_scales - 1,).

    Entries n >= N are -inf; sigma_n is the n-th smallest of the Karras discretisation with N
    points (sigma_1 = sigma_min, sigma_N = sigma_max).
    """
    n = jnp.arange(1, max_scales, dtype=jnp.float32)
    count = scales.astype(jnp.float32)
    low = sigma_of((count - n) / (count - 1.0), settings)
    high = sigma_of((count - n - 1.0) / (count - 1.0), settings)
    scale = math.sqrt(2.0) * settings.consistency_p_std
    mass = erf((jnp.log(high) - settings.consistency_p_mean) / scale) - erf(
        (jnp.log(low) - settings.consistency_p_mean) / scale
    )
    valid = n <= count - 1.0
    return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def _copy_every_step(step: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    del step, settings
    return jnp.asarray(0.0, jnp.float32)


@register(
    "improved_consistency_training",
    uses_teacher=True,
    target_network=True,
    teacher_ema_rate=_copy_every_step,
    sampler=Sampler(step=consistency_step, start=_start),
    loss="pseudo_huber",
)
def improved_consistency_training_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """The iCT regression batch at training step `step` (arguments as consistency training's).

    teacher_params is the target slot, a copy of the parameters made after every update, so it
    is the current parameters under stop-gradient.
    """
    x1 = batch["image"]
    batch_size = x1.shape[0]
    noise_rng, drop_rng, index_rng = jax.random.split(rng, 3)
    z = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)
    scales = improved_num_scales(step, settings)
    logits = lognormal_index_logits(scales, settings.consistency_s1 + 1, settings)
    n = jax.random.categorical(index_rng, logits, shape=(batch_size,)) + 1
    regression = adjacent_levels_regression(
        apply_fn, teacher_params, x1, z, labels, scales, n, settings
    )
    sigma_student, sigma_target = (
        sigma_of(regression.t, settings),
        sigma_of(regression.t + 1.0 / (scales - 1).astype(jnp.float32), settings),
    )
    regression = regression.replace(weight=1.0 / (sigma_student - sigma_target))
    return regression, {"consistency_scales": scales.astype(jnp.float32)}
