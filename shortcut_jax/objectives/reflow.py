"""Reflow (Liu, Gong and Liu, ICLR 2023, "Flow Straight and Fast: Learning to Generate and Transfer
Data with Rectified Flow", eq. 1 and Algorithm 1, the k-rectified flow).

Stage one draws a fixed coupling from a trained flow: noise x0 ~ N(0, I) and x1 = ODE_teacher(x0),
the teacher's sampler run from x0 (`python -m shortcut_jax.tools.reflow_pairs`, read back by
`data.pairs.PairSource` when `config.data.pairs_dir` names them, as {'noise': x0, 'image': x1,
'label'}). Stage two, this objective, trains rectified flow on that coupling instead of
independent noise:

    x_t = (1 - t) x0 + t x1,  t ~ U[0, 1],  min E || v(x_t, t) - (x1 - x0) ||^2,

whose straighter paths sample well with few Euler steps. As for flow matching, each example gets a
dyadic step size d drawn uniformly from all levels (the target does not depend on d), so the
network samples at any step count with the same Euler sampler.
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
from shortcut_jax.objectives.flow_matching import drop_labels


@register("reflow", uses_teacher=False, uses_pairs=True)
def reflow_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """Rectified flow on stored pairs.

    Args:
      apply_fn: unused.
      teacher_params: unused (the teacher's work is in the pairs).
      batch: {'noise': (B, ...) x0, 'image': (B, ...) x1 = teacher ODE(x0), 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: unused.
    """
    del apply_fn, teacher_params, step
    x0, x1 = batch["noise"], batch["image"]
    batch_size = x1.shape[0]
    drop_rng, time_rng, level_rng = jax.random.split(rng, 3)
    labels = drop_labels(drop_rng, batch["label"], settings)
    t = jax.random.uniform(time_rng, (batch_size,), jnp.float32)
    levels = timesteps.num_levels(settings.denoise_timesteps) + 1
    d_level = jax.random.randint(level_rng, (batch_size,), 0, levels)
    regression = Regression(
        x_t=timesteps.interpolate(x0, x1, t),
        t=t,
        d=timesteps.step_size(d_level),
        labels=labels,
        target=x1 - x0,
        is_bootstrap=jnp.zeros((batch_size,), bool),
        weight=unit_weights(batch_size),
    )
    return regression, {}
