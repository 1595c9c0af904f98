"""Live reflow: the single-stage reflow baseline of the shortcut-model paper (Frans et al., ICLR
2025, section 5 "Live Reflow", and the 'livereflow' baseline of its official code).

One network conditioned on the step size d learns flow matching and, at the same time, a reflow
of its own flow. What we implement (matching that baseline):

- the last B - B / bootstrap_every examples are the flow-matching part of the shortcut objective
  (x1 - x0 at d = 1 / denoise_timesteps, t on the 1 / denoise_timesteps grid);
- the first B / bootstrap_every examples start from fresh noise x0 and integrate the model's own
  flow, stop-gradient, with `config.live_reflow.steps` (default 8) Euler steps of size
  1 / steps, the network queried at the smallest step size d = 1 / denoise_timesteps (the level
  flow matching trains) and guided as the shortcut teacher is (`bootstrap_cfg`, `cfg_scale`);
  the end point x1_hat and x0 make a reflow pair, and the network at d = 1 (one step) regresses
  the straight velocity x1_hat - x0 at x_t = (1 - t) x0 + t x1_hat, t on the grid.

So the one-step level learns a reflow of the current model and every other level is flow
matching; the teacher is `config.bootstrap_teacher` (the current parameters under stop-gradient,
as the baseline, or their EMA). Intermediate points and targets are clipped to +-target_clip as
the shortcut targets are. Sampling is the Euler shortcut sampler.
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
    register,
    unit_weights,
)
from shortcut_jax.objectives.flow_matching import drop_labels, flow_part
from shortcut_jax.objectives.shortcut import teacher_velocity


def integrate_own_flow(
    apply_fn: ApplyFn,
    teacher_params: Any,
    x0: jax.Array,
    labels: jax.Array,
    settings: ObjectiveConfig,
) -> jax.Array:
    """x1_hat: `live_reflow_steps` Euler steps of the teacher's finest-level flow from x0.

    Args:
      x0: (B, ...) noise. labels: (B,) labels.

    Returns:
      (B, ...) stop-gradient end points, clipped to +-target_clip.
    """
    num_steps = settings.live_reflow_steps
    batch_size = x0.shape[0]
    d_flow = jnp.full((batch_size,), 1.0 / settings.denoise_timesteps, jnp.float32)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.full((batch_size,), i / num_steps, jnp.float32)
        v = teacher_velocity(apply_fn, teacher_params, x, t, d_flow, labels, settings)
        return _clip(x + v / num_steps, settings.target_clip)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, num_steps, body, x0))


@register("live_reflow", uses_teacher=True, min_bootstrap_every=2)
def live_reflow_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """Builds the live-reflow batch: reflow part (d = 1) first, then the flow part.

    Args:
      apply_fn: apply_fn(params, x, t, d, labels) -> velocity.
      teacher_params: the teacher (stop-gradient current parameters, or an EMA).
      batch: {'image': (B, ...) data, 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: unused.
    """
    del step
    x1 = batch["image"]
    batch_size = x1.shape[0]
    num_reflow = batch_size // settings.bootstrap_every
    noise_rng, drop_rng, time_rng, flow_rng = jax.random.split(rng, 4)
    x0 = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)

    reflow_x0, reflow_labels = x0[:num_reflow], labels[:num_reflow]
    x1_hat = integrate_own_flow(apply_fn, teacher_params, reflow_x0, reflow_labels, settings)
    t = timesteps.sample_flow_times(time_rng, num_reflow, settings.denoise_timesteps)
    target = _clip(x1_hat - reflow_x0, settings.target_clip)
    reflow = Regression(
        x_t=timesteps.interpolate(reflow_x0, x1_hat, t),
        t=t,
        d=jnp.ones((num_reflow,), jnp.float32),
        labels=reflow_labels,
        target=target,
        is_bootstrap=jnp.ones((num_reflow,), bool),
        weight=unit_weights(num_reflow),
    )
    flow = flow_part(flow_rng, x0[num_reflow:], x1[num_reflow:], labels[num_reflow:], settings)
    regression = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), reflow, flow)
    return regression, {"reflow_target_rms": jnp.sqrt(jnp.mean(jnp.square(target)))}


def _clip(x: jax.Array, limit: float) -> jax.Array:
    return jnp.clip(x, -limit, limit) if limit > 0 else x
