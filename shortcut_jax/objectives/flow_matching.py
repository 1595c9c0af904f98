"""Flow matching (rectified flow): regress the velocity x1 - x0 at x_t = (1 - t) x0 + t x1."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shortcut_jax import timesteps
from shortcut_jax.objectives import ApplyFn, ObjectiveConfig, Regression, register


def drop_labels(rng: jax.Array, labels: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
    """Replaces each label by the null class (num_classes) with probability class_dropout_prob.

    Unconditional runs (num_classes == 0) get the null label 0 everywhere.
    """
    if cfg.num_classes == 0:
        return jnp.zeros_like(labels)
    dropped = jax.random.bernoulli(rng, cfg.class_dropout_prob, labels.shape)
    return jnp.where(dropped, cfg.num_classes, labels).astype(jnp.int32)


def flow_part(
    rng: jax.Array, x0: jax.Array, x1: jax.Array, labels: jax.Array, cfg: ObjectiveConfig
) -> Regression:
    """Flow-matching examples at the smallest step size, t on the 1/denoise_timesteps grid.

    Args:
      rng: key for t.
      x0: (B, ...) noise. x1: (B, ...) data. labels: (B,) labels (already dropped for CFG).
      cfg: objective config.
    """
    batch_size = x1.shape[0]
    t = timesteps.sample_flow_times(rng, batch_size, cfg.denoise_timesteps)
    d_level = jnp.full((batch_size,), timesteps.flow_level(cfg.denoise_timesteps), jnp.int32)
    return Regression(
        x_t=timesteps.interpolate(x0, x1, t),
        t=t,
        d_level=d_level,
        labels=labels,
        target=x1 - x0,
        is_bootstrap=jnp.zeros((batch_size,), bool),
    )


@register("flow_matching", uses_teacher=False)
def flow_matching_targets(
    apply_fn: ApplyFn, teacher_params: Any, batch: dict, rng: jax.Array, cfg: ObjectiveConfig
) -> tuple[Regression, dict[str, jax.Array]]:
    """The flow-matching baseline on the same network as the shortcut model.

    The target x1 - x0 does not depend on the step size, so each example gets a d_level drawn
    uniformly from all levels: the network learns the same velocity at every level and can be
    sampled with any step count by the same sampler as a shortcut model (a fair baseline), instead
    of meeting untrained level embeddings at 1-4 steps.

    Args:
      apply_fn: unused (flow matching needs no teacher).
      teacher_params: unused.
      batch: {'image': (B, ...) data in [-1, 1], 'label': (B,) int32}.
      rng: key.
      cfg: objective config.
    """
    del apply_fn, teacher_params
    x1 = batch["image"]
    noise_rng, drop_rng, time_rng, level_rng = jax.random.split(rng, 4)
    x0 = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], cfg)
    regression = flow_part(time_rng, x0, x1, labels, cfg)
    levels = timesteps.num_levels(cfg.denoise_timesteps) + 1
    d_level = jax.random.randint(level_rng, (x1.shape[0],), 0, levels).astype(jnp.int32)
    return regression.replace(d_level=d_level), {}
