"""Flow matching (rectified flow; Liu et al. 2023, Lipman et al. 2023).

With x_t = (1 - t) x0 + t x1 (x0 ~ N(0, I) noise at t = 0, x1 data at t = 1) the network regresses
the conditional velocity x1 - x0, whose conditional mean is the velocity of the probability-flow
ODE; sampling integrates it with Euler steps.
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


def drop_labels(rng: jax.Array, labels: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """Replaces each label by the null class (num_classes) with probability class_dropout_prob.

    Unconditional runs (num_classes == 0) get the null label 0 everywhere.
    """
    if settings.num_classes == 0:
        return jnp.zeros_like(labels)
    dropped = jax.random.bernoulli(rng, settings.class_dropout_prob, labels.shape)
    return jnp.where(dropped, settings.num_classes, labels).astype(jnp.int32)


def flow_part(
    rng: jax.Array, x0: jax.Array, x1: jax.Array, labels: jax.Array, settings: ObjectiveConfig
) -> Regression:
    """Flow-matching examples at the smallest step size.

    t is uniform on the 1/denoise_timesteps grid, or logit-normal with config.flow_time =
    'logit_normal' (`timesteps.TimeSampling`).

    Args:
      rng: key for t.
      x0: (B, ...) noise. x1: (B, ...) data. labels: (B,) labels (already dropped for CFG).
      settings: objective config.
    """
    batch_size = x1.shape[0]
    sampling = timesteps.TimeSampling.from_settings(settings)
    t = timesteps.flow_times(rng, batch_size, settings.denoise_timesteps, sampling)
    d = jnp.full((batch_size,), 1.0 / settings.denoise_timesteps, jnp.float32)
    return Regression(
        x_t=timesteps.interpolate(x0, x1, t),
        t=t,
        d=d,
        labels=labels,
        target=x1 - x0,
        is_bootstrap=jnp.zeros((batch_size,), bool),
        weight=unit_weights(batch_size),
    )


@register("flow_matching", uses_teacher=False)
def flow_matching_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """The flow-matching baseline on the same network as the shortcut model.

    The target x1 - x0 does not depend on the step size, so each example gets a dyadic d drawn
    uniformly from all levels: the network learns the same velocity at every level and can be
    sampled with any step count by the same sampler as a shortcut model (a fair baseline), instead
    of meeting untrained step-size embeddings at 1-4 steps.

    Args:
      apply_fn: unused (flow matching needs no teacher).
      teacher_params: unused.
      batch: {'image': (B, ...) data in [-1, 1], 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: unused.
    """
    del apply_fn, teacher_params, step
    x1 = batch["image"]
    noise_rng, drop_rng, time_rng, level_rng = jax.random.split(rng, 4)
    x0 = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)
    regression = flow_part(time_rng, x0, x1, labels, settings)
    levels = timesteps.num_levels(settings.denoise_timesteps) + 1
    d_level = jax.random.randint(level_rng, (x1.shape[0],), 0, levels)
    return regression.replace(d=timesteps.step_size(d_level)), {}
