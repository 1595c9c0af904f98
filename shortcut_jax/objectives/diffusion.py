"""Diffusion (DDPM, Ho et al. 2020) with epsilon or v prediction, sampled by DDIM (Song et al.
2021).

Diffusion time tau in [0, 1] runs from data (tau = 0) to noise (tau = 1); the network's time is
this library's t = 1 - tau (t = 0 noise), its step size input is 0 (the finest level: diffusion has
no step-size conditioning). With abar(tau) the cumulative signal level,

    x_tau = sqrt(abar) x + sqrt(1 - abar) eps,                          (DDPM eq. 4)
    eps prediction: target eps (DDPM eq. 14, the simple loss);
    v prediction:   target v = sqrt(abar) eps - sqrt(1 - abar) x          (Salimans & Ho 2022).

Schedules (continuous in tau, `config.diffusion.schedule`):
  'cosine': abar = f(tau) / f(0), f = cos^2((tau + 0.008) / 1.008 * pi / 2)   (Nichol & Dhariwal
            2021 eq. 17), floored at ALPHA_BAR_MIN (their beta clip keeps abar(1) > 0 too);
  'linear': abar = exp(-(0.1 tau + 9.95 tau^2)), the continuous limit of DDPM's 1000 betas from
            1e-4 to 0.02 (Song et al. 2021, SDE paper, VP SDE).
Training draws tau uniformly in (0, 1] (continuous-time DDPM), so any grid is trained.

DDIM (Song et al. 2021, eq. 12) from tau_a to tau_b < tau_a:

    x_b = sqrt(abar_b) x0_hat + sqrt(1 - abar_b - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_b) / (1 - abar_a)) sqrt(1 - abar_a / abar_b),

deterministic at eta = 0 (`config.diffusion.eta`); at eta = 1 its mean is the DDPM posterior mean
of q(x_b | x_a, x0_hat) (DDPM eq. 7), which `ddpm_posterior_mean` computes and the tests check.
A sampler of N steps walks the library's step schedule (tau = 1 - t), so any N in
[1, denoise_timesteps] works. x0_hat is clipped to +-clip_x0 (DDPM's clip_denoised; 0 = off) and
eps_hat recomputed from it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from shortcut_jax.objectives import (
    ApplyFn,
    Network,
    ObjectiveConfig,
    Regression,
    Sampler,
    expand,
    register,
    unit_weights,
)
from shortcut_jax.objectives.flow_matching import drop_labels

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v")
ALPHA_BAR_MIN = 1e-5
_COSINE_OFFSET = 0.008
_LINEAR_BETA_MIN, _LINEAR_BETA_MAX = 0.1, 20.0


def alpha_bar(tau: jax.Array, schedule: str) -> jax.Array:
    """abar(tau) of the named schedule; 1 at tau = 0. tau: (B,) in [0, 1]. Returns (B,) float32."""
    tau = jnp.asarray(tau, jnp.float32)
    if schedule == "cosine":

        def f(x):
            return jnp.cos((x + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2

        value = f(tau) / f(jnp.zeros_like(tau))
    elif schedule == "linear":
        value = jnp.exp(
            -(_LINEAR_BETA_MIN * tau + 0.5 * (_LINEAR_BETA_MAX - _LINEAR_BETA_MIN) * tau**2)
        )
    else:
        raise ValueError(f"config.diffusion.schedule = {schedule!r}; allowed: {SCHEDULES}")
    return jnp.where(tau <= 0, 1.0, jnp.clip(value, ALPHA_BAR_MIN, 1.0))


def predictions(
    output: jax.Array, x: jax.Array, abar: jax.Array, prediction: str, clip_x0: float
) -> tuple[jax.Array, jax.Array]:
    """(x0_hat, eps_hat) from the network output at x = x_tau with signal level abar (B,)."""
    signal = expand(jnp.sqrt(abar), x.ndim)
    noise = expand(jnp.sqrt(1.0 - abar), x.ndim)
    if prediction == "eps":
        eps = output
        x0 = (x - noise * eps) / signal
    elif prediction == "v":
        x0 = signal * x - noise * output
        eps = noise * x + signal * output
    else:
        raise ValueError(f"config.diffusion.prediction = {prediction!r}; allowed: {PREDICTIONS}")
    if clip_x0 > 0:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = (x - signal * x0) / noise
    return x0, eps


def ddim_update(
    x0: jax.Array,
    eps: jax.Array,
    abar_a: jax.Array,
    abar_b: jax.Array,
    eta: float,
    noise: jax.Array,
) -> jax.Array:
    """The DDIM step from abar_a to abar_b >= abar_a given (x0_hat, eps_hat); eta = 0 adds no noise.

    abar_a, abar_b: (B,). x0, eps, noise: (B, ...). Returns (B, ...).
    """
    ndim = x0.ndim
    variance = eta**2 * (1.0 - abar_b) / (1.0 - abar_a) * jnp.clip(1.0 - abar_a / abar_b, 0.0, 1.0)
    direction = jnp.sqrt(jnp.clip(1.0 - abar_b - variance, 0.0, 1.0))
    return (
        expand(jnp.sqrt(abar_b), ndim) * x0
        + expand(direction, ndim) * eps
        + expand(jnp.sqrt(variance), ndim) * noise
    )


def ddpm_posterior_mean(
    x_a: jax.Array, x0: jax.Array, abar_a: jax.Array, abar_b: jax.Array
) -> jax.Array:
    """Mean of q(x_b | x_a, x0) for the DDPM step from abar_a to abar_b (DDPM eq. 7)."""
    alpha = abar_a / abar_b
    beta = 1.0 - alpha
    coef_x0 = jnp.sqrt(abar_b) * beta / (1.0 - abar_a)
    coef_xa = jnp.sqrt(alpha) * (1.0 - abar_b) / (1.0 - abar_a)
    return expand(coef_x0, x0.ndim) * x0 + expand(coef_xa, x0.ndim) * x_a


def ddim_step(
    network: Network,
    x: jax.Array,
    t: jax.Array,
    d: jax.Array,
    fresh_noise: jax.Array,
    settings: ObjectiveConfig,
) -> jax.Array:
    """One DDIM step from our t to t + d (diffusion time 1 - t to 1 - t - d)."""
    abar_a = alpha_bar(1.0 - t, settings.diffusion_schedule)
    abar_b = alpha_bar(jnp.maximum(1.0 - t - d, 0.0), settings.diffusion_schedule)
    output = network(x, t, jnp.zeros_like(d))
    x0, eps = predictions(
        output, x, abar_a, settings.diffusion_prediction, settings.diffusion_clip_x0
    )
    return ddim_update(x0, eps, abar_a, abar_b, settings.diffusion_eta, fresh_noise)


@register("diffusion", uses_teacher=False, sampler=Sampler(step=ddim_step))
def diffusion_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """The DDPM regression batch: x_tau and its eps (or v) target, tau ~ U(0, 1].

    Args:
      apply_fn, teacher_params, step: unused (no teacher).
      batch: {'image': (B, ...) data, 'label': (B,) int32}.
      rng: key.
      settings: objective config.
    """
    del apply_fn, teacher_params, step
    x1 = batch["image"]
    batch_size = x1.shape[0]
    noise_rng, drop_rng, time_rng = jax.random.split(rng, 3)
    eps = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)
    t = jax.random.uniform(time_rng, (batch_size,), jnp.float32)  # tau = 1 - t in (0, 1]
    abar = alpha_bar(1.0 - t, settings.diffusion_schedule)
    signal = expand(jnp.sqrt(abar), x1.ndim)
    noise = expand(jnp.sqrt(1.0 - abar), x1.ndim)
    if settings.diffusion_prediction == "eps":
        target = eps
    elif settings.diffusion_prediction == "v":
        target = signal * eps - noise * x1
    else:
        raise ValueError(
            f"config.diffusion.prediction = {settings.diffusion_prediction!r}; "
            f"allowed: {PREDICTIONS}"
        )
    regression = Regression(
        x_t=signal * x1 + noise * eps,
        t=t,
        d=jnp.zeros((batch_size,), jnp.float32),
        labels=labels,
        target=target,
        is_bootstrap=jnp.zeros((batch_size,), bool),
        weight=unit_weights(batch_size),
    )
    return regression, {}
