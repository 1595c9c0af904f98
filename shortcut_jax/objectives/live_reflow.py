"""Live reflow: the single-stage reflow baseline of the shortcut-model paper (Frans et al., ICLR
2025, section 5 "Live Reflow").

One network conditioned on the step size d learns flow matching and, at the same time, a reflow
of its own flow at every step size it samples with:

- the last B - B / bootstrap_every examples are the flow-matching part of the shortcut objective
  (x1 - x0 at d = 1 / denoise_timesteps, t on the 1 / denoise_timesteps grid);
- the first B / bootstrap_every examples start from fresh noise x0 and integrate the model's own
  flow, stop-gradient, with `config.live_reflow.steps` (default 8) Euler steps of size
  1 / steps, the network queried at the smallest step size d = 1 / denoise_timesteps (the level
  flow matching trains) and guided as the shortcut teacher is (`bootstrap_cfg`, `cfg_scale`).
  The end point x1_hat and x0 make a reflow pair: the straight line x_t = (1 - t) x0 + t x1_hat,
  whose velocity x1_hat - x0 is also its average velocity over any [t, t + d]. Each example gets
  a step size d = 2**-level, the levels 0 ... log2(denoise_timesteps) - 1 tiled over the part (a
  random offset, so every level appears once the part has as many examples as levels) and t on
  the grid of multiples of d, and the network at (x_t, t, d) regresses x1_hat - x0.

So every step size the Euler sampler uses learns the reflow of the current model (the finest one
flow matching), and an M-step sample follows the straightened flow. Neither the end points nor the
targets are clipped (the official baseline does not clip; `target_clip` is the shortcut
objective's). The teacher is `config.bootstrap_teacher` (the current parameters under
stop-gradient, or their EMA).

`config.live_reflow.levels = 'one_step'` trains the reflow pairs at d = 1 only, as the paper's
official code does (baselines/targets_livereflow.py); the step sizes between 1 and
1 / denoise_timesteps are then never trained and its 2- to 64-step samples query untrained levels.
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
      (B, ...) stop-gradient end points (not clipped).
    """
    num_steps = settings.live_reflow_steps
    batch_size = x0.shape[0]
    d_flow = jnp.full((batch_size,), 1.0 / settings.denoise_timesteps, jnp.float32)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.full((batch_size,), i / num_steps, jnp.float32)
        v = teacher_velocity(apply_fn, teacher_params, x, t, d_flow, labels, settings)
        return x + v / num_steps

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
    d, t = reflow_steps_and_times(time_rng, num_reflow, settings)
    target = x1_hat - reflow_x0
    reflow = Regression(
        x_t=timesteps.interpolate(reflow_x0, x1_hat, t),
        t=t,
        d=d,
        labels=reflow_labels,
        target=target,
        is_bootstrap=jnp.ones((num_reflow,), bool),
        weight=unit_weights(num_reflow),
    )
    flow = flow_part(flow_rng, x0[num_reflow:], x1[num_reflow:], labels[num_reflow:], settings)
    regression = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), reflow, flow)
    return regression, {"reflow_target_rms": jnp.sqrt(jnp.mean(jnp.square(target)))}


def reflow_steps_and_times(
    rng: jax.Array, count: int, settings: ObjectiveConfig
) -> tuple[jax.Array, jax.Array]:
    """Step sizes d and start times t of the reflow part.

    `live_reflow_levels` 'all': the levels 0 ... log2(T) - 1 tiled over the `count` examples from
    a random offset, d = 2**-level, t uniform on the grid of multiples of d. 'one_step': d = 1,
    t uniform on the 1 / T grid (the official code).

    Returns:
      d: (count,) float32 step sizes. t: (count,) float32 start times in [0, 1 - d].
    """
    offset_rng, time_rng = jax.random.split(rng)
    if settings.live_reflow_levels == "one_step":
        t = timesteps.sample_flow_times(time_rng, count, settings.denoise_timesteps)
        return jnp.ones((count,), jnp.float32), t
    levels = timesteps.num_levels(settings.denoise_timesteps)
    offset = jax.random.randint(offset_rng, (), 0, levels)
    level = (jnp.arange(count) + offset) % levels
    sections = jnp.left_shift(1, level)
    index = jax.random.randint(time_rng, (count,), 0, sections)
    t = index.astype(jnp.float32) / sections.astype(jnp.float32)
    return timesteps.step_size(level).astype(jnp.float32), t
