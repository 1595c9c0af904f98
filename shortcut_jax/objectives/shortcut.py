"""The shortcut-model objective (Frans et al., ICLR 2025).

The first batch_size // bootstrap_every examples are self-consistency examples: a step of size 2d
from x_t must equal two steps of size d taken by the teacher,

    target = stop_grad(mean(s(x_t, t, d), s(x'_{t+d}, t + d, d))),  x'_{t+d} = x_t + d s(x_t, t, d),

and the network at (x_t, t, 2d) regresses onto it. The other examples regress x1 - x0 at the
smallest step size (flow matching), which anchors the finest level.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shortcut_jax import timesteps
from shortcut_jax.objectives import ApplyFn, ObjectiveConfig, Regression, register
from shortcut_jax.objectives.flow_matching import drop_labels, flow_part


def teacher_velocity(
    apply_fn: ApplyFn,
    teacher_params: Any,
    x: jax.Array,
    t: jax.Array,
    d_level: jax.Array,
    labels: jax.Array,
    cfg: ObjectiveConfig,
) -> jax.Array:
    """The teacher's velocity s(x, t, d), guided where CFG inside the targets applies.

    With `bootstrap_cfg`, examples whose teacher level is the flow level (the only level trained on
    unguided flow targets) get v_null + cfg_scale * (v_cond - v_null); coarser levels inherit the
    guidance through bootstrapping, so guiding them again would compound it. Null-labelled
    examples are unaffected (v_cond == v_null for them).

    Args:
      x: (B, ...) inputs. t: (B,). d_level: (B,) teacher levels. labels: (B,).
    """
    if not (cfg.bootstrap_cfg and cfg.num_classes > 0):
        return apply_fn(teacher_params, x, t, d_level, labels)
    batch_size = x.shape[0]
    null = jnp.full_like(labels, cfg.num_classes)
    both = apply_fn(
        teacher_params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([d_level, d_level]),
        jnp.concatenate([labels, null]),
    )
    v_cond, v_null = both[:batch_size], both[batch_size:]
    v_guided = v_null + cfg.cfg_scale * (v_cond - v_null)
    at_flow_level = d_level == timesteps.flow_level(cfg.denoise_timesteps)
    return jnp.where(_expand(at_flow_level, x.ndim), v_guided, v_cond)


def bootstrap_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    x_t: jax.Array,
    t: jax.Array,
    d_level: jax.Array,
    labels: jax.Array,
    cfg: ObjectiveConfig,
) -> jax.Array:
    """Mean of two teacher half steps of size d = 2**-(d_level + 1), clipped to +-target_clip.

    Args:
      x_t: (B, ...) start points. t: (B,) start times. d_level: (B,) student levels (step 2d).
      labels: (B,) labels.

    Returns:
      (B, ...) stop-gradient targets for the student s(x_t, t, 2d).
    """
    teacher_level = d_level + 1
    d = _expand(timesteps.step_size(teacher_level), x_t.ndim)
    v_first = teacher_velocity(apply_fn, teacher_params, x_t, t, teacher_level, labels, cfg)
    x_mid = _clip(x_t + d * v_first, cfg.target_clip)
    t_mid = t + timesteps.step_size(teacher_level)
    v_second = teacher_velocity(apply_fn, teacher_params, x_mid, t_mid, teacher_level, labels, cfg)
    target = _clip((v_first + v_second) / 2, cfg.target_clip)
    return jax.lax.stop_gradient(target)


@register("shortcut", uses_teacher=True, min_bootstrap_every=2)
def shortcut_targets(
    apply_fn: ApplyFn, teacher_params: Any, batch: dict, rng: jax.Array, cfg: ObjectiveConfig
) -> tuple[Regression, dict[str, jax.Array]]:
    """Builds the shortcut regression batch: bootstrap part first, then the flow part.

    Args:
      apply_fn: apply_fn(params, x, t, d_level, labels) -> velocity.
      teacher_params: parameters of the teacher (stop-gradient of the current ones, or an EMA).
      batch: {'image': (B, ...) data in [-1, 1], 'label': (B,) int32}.
      rng: key.
      cfg: objective config.

    Returns:
      The Regression over all B examples and diagnostics.
    """
    x1 = batch["image"]
    batch_size = x1.shape[0]
    num_bootstrap = batch_size // cfg.bootstrap_every
    noise_rng, drop_rng, boot_rng, flow_rng = jax.random.split(rng, 4)
    x0 = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], cfg)

    d_level, t = timesteps.sample_bootstrap_levels_and_times(
        boot_rng, num_bootstrap, cfg.denoise_timesteps
    )
    x_t = timesteps.interpolate(x0[:num_bootstrap], x1[:num_bootstrap], t)
    boot_labels = labels[:num_bootstrap]
    target = bootstrap_targets(apply_fn, teacher_params, x_t, t, d_level, boot_labels, cfg)
    bootstrap = Regression(
        x_t=x_t,
        t=t,
        d_level=d_level,
        labels=boot_labels,
        target=target,
        is_bootstrap=jnp.ones((num_bootstrap,), bool),
    )
    flow = flow_part(flow_rng, x0[num_bootstrap:], x1[num_bootstrap:], labels[num_bootstrap:], cfg)
    regression = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), bootstrap, flow)
    metrics = {"bootstrap_target_rms": jnp.sqrt(jnp.mean(jnp.square(target)))}
    return regression, metrics


def _expand(values: jax.Array, ndim: int) -> jax.Array:
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _clip(x: jax.Array, limit: float) -> jax.Array:
    return jnp.clip(x, -limit, limit) if limit > 0 else x
