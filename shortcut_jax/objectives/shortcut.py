"""The shortcut-model objective (Frans et al., ICLR 2025).

The first batch_size // bootstrap_every examples are self-consistency examples: a step of size 2d
from x_t must equal two steps of size d taken by the teacher,

    target = stop_grad(mean(s(x_t, t, d), s(x'_{t+d}, t + d, d))),  x'_{t+d} = x_t + d s(x_t, t, d),

and the network at (x_t, t, 2d) regresses onto it. The other examples regress x1 - x0 at the
smallest step size (flow matching), which anchors the finest level.

Recipe knobs (config fields; the defaults are the paper's recipe): how the bootstrap levels are
drawn (`bootstrap_levels`: uniform, weighted toward the coarse levels, or a fine-to-coarse
curriculum; see `timesteps.TimeSampling`), a loss weight per bootstrap level
(`bootstrap_level_weights`), and the flow part's time distribution (`flow_time`).
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
from shortcut_jax.objectives.flow_matching import drop_labels, flow_part


def teacher_velocity(
    apply_fn: ApplyFn,
    teacher_params: Any,
    x: jax.Array,
    t: jax.Array,
    d: jax.Array,
    labels: jax.Array,
    settings: ObjectiveConfig,
    guided: int | None = None,
) -> jax.Array:
    """The teacher's velocity s(x, t, d), guided where CFG inside the targets applies.

    With `bootstrap_cfg`, examples whose teacher step is the smallest one (the only step size
    trained on unguided flow targets) get v_null + cfg_scale * (v_cond - v_null); coarser steps
    inherit the guidance through bootstrapping, so guiding them again would compound it.
    Null-labelled examples are unaffected (v_cond == v_null for them).

    Args:
      x: (B, ...) inputs. t: (B,). d: (B,) float teacher step sizes. labels: (B,).
      guided: None = any example may be at the flow level (the null branch runs for all B);
        k = exactly the first k examples are (`timesteps.sample_bootstrap_levels_and_times` with
        finest_count k), so the null branch runs for those k only: B + k network rows, not 2 B.
    """
    if not (settings.bootstrap_cfg and settings.num_classes > 0):
        return apply_fn(teacher_params, x, t, d, labels)
    batch_size = x.shape[0]
    count = batch_size if guided is None else guided
    null = jnp.full_like(labels[:count], settings.num_classes)
    both = apply_fn(
        teacher_params,
        jnp.concatenate([x, x[:count]]),
        jnp.concatenate([t, t[:count]]),
        jnp.concatenate([d, d[:count]]),
        jnp.concatenate([labels, null]),
    )
    v_cond, v_null = both[:batch_size], both[batch_size:]
    v_guided = v_null + settings.cfg_scale * (v_cond[:count] - v_null)
    if guided is not None:
        return jnp.concatenate([v_guided, v_cond[count:]])
    at_flow_level = d <= 1.0 / settings.denoise_timesteps
    return jnp.where(expand(at_flow_level, x.ndim), v_guided, v_cond)


def bootstrap_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    x_t: jax.Array,
    t: jax.Array,
    d_level: jax.Array,
    labels: jax.Array,
    settings: ObjectiveConfig,
    guided: int | None = None,
) -> jax.Array:
    """Mean of two teacher half steps of size d = 2**-(d_level + 1), clipped to +-target_clip.

    Args:
      x_t: (B, ...) start points. t: (B,) start times. d_level: (B,) int student levels (step 2d).
      labels: (B,) labels.
      guided: see `teacher_velocity` (the first `guided` examples are at the finest level).

    Returns:
      (B, ...) stop-gradient targets for the student s(x_t, t, 2d).
    """
    d = timesteps.step_size(d_level + 1)
    v_first = teacher_velocity(apply_fn, teacher_params, x_t, t, d, labels, settings, guided)
    x_mid = _clip(x_t + expand(d, x_t.ndim) * v_first, settings.target_clip)
    v_second = teacher_velocity(apply_fn, teacher_params, x_mid, t + d, d, labels, settings, guided)
    target = _clip((v_first + v_second) / 2, settings.target_clip)
    return jax.lax.stop_gradient(target)


@register("shortcut", uses_teacher=True, min_bootstrap_every=2)
def shortcut_targets(
    apply_fn: ApplyFn,
    teacher_params: Any,
    batch: dict,
    rng: jax.Array,
    settings: ObjectiveConfig,
    step: jax.Array | int = 0,
) -> tuple[Regression, dict[str, jax.Array]]:
    """Builds the shortcut regression batch: bootstrap part first, then the flow part.

    Args:
      apply_fn: apply_fn(params, x, t, d, labels) -> velocity.
      teacher_params: parameters of the teacher (stop-gradient of the current ones, or an EMA).
      batch: {'image': (B, ...) data in [-1, 1], 'label': (B,) int32}.
      rng: key.
      settings: objective config.
      step: () number of updates applied so far (the level curriculum's progress).

    Returns:
      The Regression over all B examples and diagnostics.
    """
    x1 = batch["image"]
    batch_size = x1.shape[0]
    num_bootstrap = batch_size // settings.bootstrap_every
    noise_rng, drop_rng, boot_rng, flow_rng = jax.random.split(rng, 4)
    x0 = jax.random.normal(noise_rng, x1.shape, x1.dtype)
    labels = drop_labels(drop_rng, batch["label"], settings)

    guided = None
    if settings.bootstrap_cfg and settings.num_classes > 0:
        guided = timesteps.guided_count(num_bootstrap, settings.denoise_timesteps)
    sampling = timesteps.TimeSampling.from_settings(settings)
    progress = jnp.asarray(step, jnp.float32) / max(int(settings.total_steps), 1)
    d_level, t = timesteps.sample_bootstrap_levels_and_times(
        boot_rng,
        num_bootstrap,
        settings.denoise_timesteps,
        finest_count=guided or 0,
        log_weights=timesteps.level_log_weights(sampling, settings.denoise_timesteps, progress),
    )
    x_t = timesteps.interpolate(x0[:num_bootstrap], x1[:num_bootstrap], t)
    boot_labels = labels[:num_bootstrap]
    target = bootstrap_targets(
        apply_fn, teacher_params, x_t, t, d_level, boot_labels, settings, guided
    )
    bootstrap = Regression(
        x_t=x_t,
        t=t,
        d=timesteps.step_size(d_level),
        labels=boot_labels,
        target=target,
        is_bootstrap=jnp.ones((num_bootstrap,), bool),
        weight=level_loss_weights(d_level, settings),
    )
    flow = flow_part(
        flow_rng, x0[num_bootstrap:], x1[num_bootstrap:], labels[num_bootstrap:], settings
    )
    regression = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), bootstrap, flow)
    metrics = {"bootstrap_target_rms": jnp.sqrt(jnp.mean(jnp.square(target)))}
    return regression, metrics


def level_loss_weights(d_level: jax.Array, settings: ObjectiveConfig) -> jax.Array:
    """Loss weight of each bootstrap example: config.bootstrap_level_weights[d_level].

    The weights are given per student level 0 (one step of size 1) .. log2(T) - 1 and multiply the
    examples' squared errors as they are (not renormalised: weights of 2 double the bootstrap
    part's share of the loss); () = every weight 1.

    Args:
      d_level: (B,) int student levels.
      settings: objective config.

    Returns:
      (B,) float32.
    """
    weights = tuple(settings.bootstrap_level_weights)
    if not weights:
        return unit_weights(d_level.shape[0])
    return jnp.asarray(weights, jnp.float32)[d_level]


def _clip(x: jax.Array, limit: float) -> jax.Array:
    return jnp.clip(x, -limit, limit) if limit > 0 else x
