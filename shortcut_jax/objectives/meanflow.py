"""MeanFlow (Geng, Deng, Bai, Kolter and He 2025, "Mean Flows for One-step Generative Modeling").

The network predicts the average velocity over an interval instead of the instantaneous one. In
the paper's convention z_tau = (1 - tau) x + tau e (tau = 1 noise), v = e - x, and

    u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau,                    (paper eq. 3)
    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),                  (eq. 6, r held fixed)
    d/dt u = v . du/dz + du/dt,   computed by jvp along (v, 0, 1),         (eq. 8)
    loss = || u_theta(z_t, r, t) - stop_grad(u_tgt) ||^2,                  (eq. 9)
    one-step sample: x = z_1 - u(z_1, 0, 1).                                (eq. 12)

Translation to this library (x_s = (1 - s) x0 + s x1, s = 0 noise, velocity w = x1 - x0, and a
network s(x, s, d) whose Euler step x_{s+d} = x_s + d s(x_s, s, d) is a shortcut step): s = 1 - t,
the interval [r, t] is our [s, s + d] with d = t - r, w = -v and s(x, s, d) = -u(x, r, t). With the
end point s + d held fixed (the paper's fixed r), eq. 6 becomes

    s_tgt = w + d * (d/ds) s(x_s, s, d),  (d/ds) s = jvp of s(x, s, d) along (w, 1, -1),

so r = t (d = 0) gives s_tgt = w, the flow-matching target, and sampling is the library's Euler
shortcut sampler (one step: x1 = x0 + s(x0, 0, 1)). The network embeds d as its step size (d below
1/denoise_timesteps, including d = 0, embed as the finest level: `timesteps.level_of`).

Time sampling (paper section 4.3): two logit-normal draws sigmoid(N(time_mean, time_std)); t is
the larger, r the smaller, and a fraction 1 - ratio_r_neq_t of the examples gets r = t (the best
setting in the paper: logit-normal(-0.4, 1.0), 25 % with r != t). Adaptive loss weighting (eq. 10
and its appendix): w = stop_grad(1 / (e + c)^p) with e the example's squared error, p = 1 and
c = 1e-3 by default; we take e as the mean over the example's elements (as the per-example loss of
every objective here), so c does not scale with the data dimension. The target uses the teacher
the train loop provides (`config.bootstrap_teacher`: the current parameters under stop-gradient,
as in the paper, or their EMA). The jvp costs about one extra forward and backward-free pass on
the batch; the paper's implementation shares the forward of u with the loss, ours evaluates the
student again (the train step owns the student's forward).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shortcut_jax import timesteps
from shortcut_jax.objectives import (
    ApplyFn,
    ObjectiveConfig,
    Regression,
    expand,
    register,
    unit_weights,
)
from shortcut_jax.objectives.flow_matching import drop_labels


def sample_times(
    rng: jax.Array, batch_size: int, settings: ObjectiveConfig
) -> tuple[jax.Array, jax.Array]:
    """Draws (s, d) per example: our start time s = 1 - t and the interval length d = t - r.

    Returns:
      s: (B,) float32 in (0, 1). d: (B,) float32 in [0, 1 - s], 0 for a fraction
      1 - meanflow_ratio_r_neq_t of the examples.
    """
    normal_rng, equal_rng = jax.random.split(rng)
    normal = jax.random.normal(normal_rng, (2, batch_size))
    draws = jax.nn.sigmoid(settings.meanflow_time_mean + settings.meanflow_time_std * normal)
    t, r = jnp.max(draws, axis=0), jnp.min(draws, axis=0)
    equal = jax.random.uniform(equal_rng, (batch_size,)) >= settings.meanflow_ratio_r_neq_t
    r = jnp.where(equal, t, r)
    return (1.0 - t).astype(jnp.float32), (t - r).astype(jnp.float32)


def meanflow_target(
    apply_fn: ApplyFn,
    params: Any,
    x_s: jax.Array,
    s: jax.Array,
    d: jax.Array,
    labels: jax.Array,
    velocity: jax.Array,
) -> jax.Array:
    """stop_grad(w + d * (d/ds) net(x_s, s, d)) with the end point s + d fixed.

    Args:
      apply_fn: apply_fn(params, x, t, d, labels) -> average velocity over [t, t + d].
      params: parameters the target is computed with (no gradient flows into them).
      x_s: (B, ...) points on the path. s: (B,) times. d: (B,) interval lengths.
      labels: (B,) labels. velocity: (B, ...) the conditional velocity w = x1 - x0.

    Returns:
      (B, ...) the MeanFlow target.
    """

    def network(x: jax.Array, time: jax.Array, step: jax.Array) -> jax.Array:
        return apply_fn(params, x, time, step, labels)

    ones = jnp.ones_like(s)
    _, total_derivative = jax.jvp(network, (x_s, s, d), (velocity, ones, -ones))
    return jax.lax.stop_gradient(velocity + expand(d, x_s.ndim) * total_derivative)


def adaptive_weight(per_example_error: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """w = 1 / (e + c)^p per example (applied under stop-gradient by the train step)."""
    return 1.0 / jnp.power(
        per_example_error + settings.meanflow_adaptive_c, settings.meanflow_adaptive_p
    )


@register("meanflow", uses_teacher=True, loss_weighting=adaptive_weight)
def meanflow_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """Builds the MeanFlow regression batch (every example; r = t ones regress w itself).

    Args:
      apply_fn: apply_fn(params, x, t, d, labels) -> average velocity.
      teacher_params: parameters of the target's jvp (stop-gradient current ones, or an EMA).
      batch: {'image': (B, ...) data, 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: unused.
    """
    del step
    x1 = batch["image"]
    batch_size = x1.shape[0]
    noise_rng, drop_rng, time_rng = jax.random.split(rng, 3)
    x0 = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)
    s, d = sample_times(time_rng, batch_size, settings)
    x_s = timesteps.interpolate(x0, x1, s)
    target = meanflow_target(apply_fn, teacher_params, x_s, s, d, labels, x1 - x0)
    regression = Regression(
        x_t=x_s,
        t=s,
        d=d,
        labels=labels,
        target=target,
        is_bootstrap=d > 0,
        weight=unit_weights(batch_size),
    )
    return regression, {"meanflow_target_rms": jnp.sqrt(jnp.mean(jnp.square(target)))}
