"""The optimizer from `config.optim`: AdamW with warm-up, optional cosine decay and clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax

from shortcut_jax import objectives


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `optim.learning_rate`, then constant or cosine decay to the end.

    For an objective trained in stages (`objectives.Objective.stages`) the schedule runs over one
    stage and restarts at each; the last stage decays over the steps left to total_steps. Each
    stage warms up for `optim.warmup_steps` but at most a tenth of the stage.
    """
    name = config.get("objective")
    stages = objectives.get(name).stages if name in objectives.names() else None
    if stages is None:
        return _one_schedule(config, int(config.total_steps), int(config.optim.warmup_steps))
    length, count = stages(config)
    last = max(int(config.total_steps) - (count - 1) * length, length)
    warmup = min(int(config.optim.warmup_steps), length // 10)
    per_stage = _one_schedule(config, length, warmup)
    last_stage = _one_schedule(config, last, warmup)

    def schedule(step):
        start = objectives.stage_start(step, (length, count))
        in_stage = step - start
        return jax.numpy.where(
            start == (count - 1) * length, last_stage(in_stage), per_stage(in_stage)
        )

    return schedule


def _one_schedule(config: ml_collections.ConfigDict, steps: int, warmup: int) -> optax.Schedule:
    optim = config.optim
    peak = float(optim.learning_rate)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(steps, warmup + 1),
            end_value=peak * float(optim.end_lr_fraction),
        )
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])


def weight_decay_mask(params: optax.Params) -> optax.Params:
    """Decays matrices (kernels, embedding tables) but not biases or normalisation scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with the schedule above and global-norm gradient clipping when grad_clip_norm > 0."""
    optim = config.optim
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(config),
        b1=float(optim.beta1),
        b2=float(optim.beta2),
        weight_decay=float(optim.weight_decay),
        mask=weight_decay_mask,
    )
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(float(optim.grad_clip_norm)), adamw)
    return adamw
