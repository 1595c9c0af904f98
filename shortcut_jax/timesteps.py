"""Time and step-size grids shared by every objective and the sampler.

The network takes a step size d as a float in [0, 1]. Shortcut models train the dyadic sizes
d = 1/M for M in {1, 2, 4, ..., denoise_timesteps}, whose log2 index is ``d_level = log2(M)``:
level 0 is one step of size 1 and level ``log2(denoise_timesteps)`` is the smallest step, the one
flow matching trains. The network embeds the continuous level ``-log2(d)`` (`level_of`), so the
dyadic sizes embed exactly as the integer levels did before d became a float; sizes below
1/denoise_timesteps (including d = 0, MeanFlow's r = t) embed as the finest level.

How the shortcut objective draws its levels and times is set by `TimeSampling` (config fields
`bootstrap_levels`, `bootstrap_curriculum_fraction`, `flow_time`, `flow_time_mean`,
`flow_time_std`); its defaults are the draws every run made before those fields existed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

# How each bootstrap example's student level is drawn (config.bootstrap_levels).
LEVEL_SCHEMES = ("uniform", "coarse", "curriculum")
# Where the flow-matching part's times come from (config.flow_time).
FLOW_TIMES = ("uniform_grid", "logit_normal")


@dataclasses.dataclass(frozen=True)
class TimeSampling:
    """How the shortcut objective draws bootstrap levels and flow-part times.

    Attributes:
      levels: 'uniform' over the student levels 0 .. log2(T) - 1 (level 0 = one step of size 1);
        'coarse': p(level) proportional to 2**-level, so one step gets about half of the bootstrap
        examples and each finer level half as many as the one before; 'curriculum': only the
        finest level at step 0, coarser levels join one by one (linearly in training progress)
        until all are open at `curriculum_fraction` of total_steps, uniform over the open ones.
      curriculum_fraction: in (0, 1], the fraction of training after which every level is open.
      flow_time: 'uniform_grid' (t uniform on {0, 1/T, ..., (T-1)/T}) or 'logit_normal'
        (t = sigmoid(mean + std * n), n ~ N(0, 1); t = 1 is data, so mean > 0 favours the data end).
      flow_time_mean, flow_time_std: the logit-normal's parameters.
    """

    levels: str = "uniform"
    curriculum_fraction: float = 0.5
    flow_time: str = "uniform_grid"
    flow_time_mean: float = 0.0
    flow_time_std: float = 1.0

    @classmethod
    def from_settings(cls, settings: Any) -> TimeSampling:
        """Reads the config fields of the same meaning from an `objectives.ObjectiveConfig`."""
        return cls(
            levels=settings.bootstrap_levels,
            curriculum_fraction=settings.bootstrap_curriculum_fraction,
            flow_time=settings.flow_time,
            flow_time_mean=settings.flow_time_mean,
            flow_time_std=settings.flow_time_std,
        )


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def num_levels(denoise_timesteps: int) -> int:
    """Number of step-size levels below the flow level: log2(denoise_timesteps)."""
    if not is_power_of_two(denoise_timesteps):
        raise ValueError(f"denoise_timesteps must be a power of two, got {denoise_timesteps!r}")
    return denoise_timesteps.bit_length() - 1


def flow_level(denoise_timesteps: int) -> int:
    """The d_level of the smallest step d_min = 1/denoise_timesteps."""
    return num_levels(denoise_timesteps)


def step_size(d_level: jax.Array) -> jax.Array:
    """d = 2**-d_level as float32, exact for integer levels. d_level: (B,) int."""
    return jnp.ldexp(jnp.ones(jnp.shape(d_level), jnp.float32), -jnp.asarray(d_level, jnp.int32))


def level_of(d: jax.Array, max_level: float) -> jax.Array:
    """The continuous level -log2(d), with d clamped to at least 2**-max_level.

    Exact for powers of two (so d = 2**-k gives the float k bit for bit), and differentiable in d
    above the clamp (d level / d d = -1 / (d ln 2)), which MeanFlow's jvp needs.

    Args:
      d: (B,) float step sizes in [0, 1].
      max_level: the finest level log2(denoise_timesteps); d below 2**-max_level embeds as it.

    Returns:
      (B,) float32 levels in [0, max_level].
    """
    d = jnp.maximum(jnp.asarray(d, jnp.float32), jnp.exp2(-jnp.float32(max_level)))
    # d = m * 2**e with m in [0.5, 1): -log2(d) = (1 - e) - log2(2 m), and log2(1) is exactly 0.
    _, exponent = jnp.frexp(jax.lax.stop_gradient(d))
    mantissa = d * jnp.ldexp(jnp.ones_like(d), 1 - exponent)  # in [1, 2); exact rescaling
    return jnp.minimum((1 - exponent).astype(jnp.float32) - jnp.log2(mantissa), max_level)


def sample_flow_times(rng: jax.Array, batch_size: int, denoise_timesteps: int) -> jax.Array:
    """t for the flow-matching part: uniform on the grid {0, 1/T, ..., (T-1)/T}. Returns (B,)."""
    index = jax.random.randint(rng, (batch_size,), 0, denoise_timesteps)
    return index.astype(jnp.float32) / denoise_timesteps


def sample_logit_normal_times(
    rng: jax.Array, batch_size: int, mean: float, std: float
) -> jax.Array:
    """t = sigmoid(mean + std * n), n ~ N(0, 1): SD3's logit-normal, in (0, 1). Returns (B,)."""
    normal = jax.random.normal(rng, (batch_size,), jnp.float32)
    return jax.nn.sigmoid(mean + std * normal)


def flow_times(
    rng: jax.Array, batch_size: int, denoise_timesteps: int, sampling: TimeSampling
) -> jax.Array:
    """t of the flow-matching part as `sampling.flow_time` says. Returns (B,) float32."""
    if sampling.flow_time == "uniform_grid":
        return sample_flow_times(rng, batch_size, denoise_timesteps)
    if sampling.flow_time == "logit_normal":
        return sample_logit_normal_times(
            rng, batch_size, sampling.flow_time_mean, sampling.flow_time_std
        )
    raise ValueError(f"flow_time must be one of {FLOW_TIMES}, got {sampling.flow_time!r}")


def level_log_weights(
    sampling: TimeSampling, denoise_timesteps: int, progress: jax.Array | float = 0.0
) -> jax.Array | None:
    """Unnormalised log-probabilities of the student levels 0 .. log2(T) - 1; None = uniform.

    Args:
      sampling: the scheme (`TimeSampling.levels`).
      denoise_timesteps: T.
      progress: () training progress step / total_steps in [0, 1] (read by 'curriculum' only).

    Returns:
      None for 'uniform' (drawn with randint, as before the schemes existed), else (L,) float32
      with -inf for the levels the curriculum has not opened yet.
    """
    levels = num_levels(denoise_timesteps)
    index = jnp.arange(levels, dtype=jnp.float32)
    if sampling.levels == "uniform":
        return None
    if sampling.levels == "coarse":
        return -index * math.log(2.0)
    if sampling.levels == "curriculum":
        return jnp.where(index >= coarsest_open_level(sampling, levels, progress), 0.0, -jnp.inf)
    raise ValueError(f"bootstrap_levels must be one of {LEVEL_SCHEMES}, got {sampling.levels!r}")


def coarsest_open_level(
    sampling: TimeSampling, levels: int, progress: jax.Array | float
) -> jax.Array:
    """The curriculum's coarsest open level at `progress`: L - 1 at 0, 0 from the fraction on.

    Level k opens at progress curriculum_fraction * (L - 1 - k) / (L - 1). Returns () float32.
    """
    opened = jnp.asarray(progress, jnp.float32) / sampling.curriculum_fraction
    return jnp.clip(jnp.ceil((levels - 1) * (1.0 - opened)), 0, levels - 1)


def sample_bootstrap_levels_and_times(
    rng: jax.Array,
    batch_size: int,
    denoise_timesteps: int,
    finest_count: int = 0,
    log_weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draws, per example, a shortcut level and a start time for the self-consistency part.

    Each example gets its own d_level uniform over {0, ..., log2(T) - 1} (so every step size is
    trained at every batch size, even when the bootstrap part has fewer examples than levels) and a
    time t uniform on the grid of multiples of 2d = 2**-d_level, i.e. the start of a step of size 2d
    that the two half steps of size d must reproduce.

    With `finest_count` = k > 0 the first k examples are at the finest student level log2(T) - 1
    (whose teacher step is the flow level, the one guidance inside the targets applies to) and the
    other B - k draw their level uniformly over the coarser ones: a fixed number of guided examples,
    so the teacher evaluates its null branch for those k only. `guided_count` gives the k that keeps
    the finest level's share close to 1 / log2(T).

    `log_weights` (L,) (`level_log_weights`; None = uniform) replaces the uniform level draw by a
    categorical one; with `finest_count` the other examples draw from the coarser levels' weights,
    and sit at the finest level too while no coarser level has a finite weight.

    Returns:
      d_level: (B,) int32, the level of the *student* step 2d; the teacher uses d_level + 1.
      t: (B,) float32 in [0, 1).
    """
    level_rng, time_rng = jax.random.split(rng)
    levels = num_levels(denoise_timesteps)
    if not 0 <= finest_count <= batch_size:
        raise ValueError(f"finest_count must be in [0, {batch_size}], got {finest_count}")
    if finest_count and levels > 1:
        count = batch_size - finest_count
        if log_weights is None:
            coarser = jax.random.randint(level_rng, (count,), 0, levels - 1)
        else:
            coarser_weights = log_weights[: levels - 1]
            drawn = jax.random.categorical(level_rng, coarser_weights, shape=(count,))
            any_open = jnp.any(jnp.isfinite(coarser_weights))
            coarser = jnp.where(any_open, drawn, levels - 1).astype(jnp.int32)
        d_level = jnp.concatenate([jnp.full((finest_count,), levels - 1, coarser.dtype), coarser])
    elif log_weights is None:
        d_level = jax.random.randint(level_rng, (batch_size,), 0, levels)
    else:
        d_level = jax.random.categorical(level_rng, log_weights, shape=(batch_size,))
    sections = jnp.left_shift(1, d_level)  # number of student steps of size 2**-d_level
    uniform = jax.random.uniform(time_rng, (batch_size,))
    index = jnp.minimum(jnp.floor(uniform * sections), sections - 1)
    t = index / sections.astype(jnp.float32)
    return d_level.astype(jnp.int32), t.astype(jnp.float32)


def guided_count(num_bootstrap: int, denoise_timesteps: int) -> int:
    """ceil(num_bootstrap / log2(T)): the bootstrap examples kept at the guided (finest) level.

    The paper's code tiles the levels over the bootstrap part and evaluates the null branch for
    the same number of examples; at its batch 256 (32 bootstrap examples, 7 levels) that is 5, so
    each teacher call sees 32 + 5 examples instead of 2 x 32.
    """
    return -(-num_bootstrap // max(num_levels(denoise_timesteps), 1))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t x1 with t: (B,) broadcast over the trailing axes of x0 and x1."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
    return (1.0 - t) * x0 + t * x1
