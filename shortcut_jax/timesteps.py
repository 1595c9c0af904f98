"""Time and step-size grids shared by every objective and the sampler.

The network takes a step size d as a float in [0, 1]. Shortcut models train the dyadic sizes
d = 1/M for M in {1, 2, 4, ..., denoise_timesteps}, whose log2 index is ``d_level = log2(M)``:
level 0 is one step of size 1 and level ``log2(denoise_timesteps)`` is the smallest step, the one
flow matching trains. The network embeds the continuous level ``-log2(d)`` (`level_of`), so the
dyadic sizes embed exactly as the integer levels did before d became a float; sizes below
1/denoise_timesteps (including d = 0, MeanFlow's r = t) embed as the finest level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def sample_bootstrap_levels_and_times(
    rng: jax.Array, batch_size: int, denoise_timesteps: int, finest_count: int = 0
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

    Returns:
      d_level: (B,) int32, the level of the *student* step 2d; the teacher uses d_level + 1.
      t: (B,) float32 in [0, 1).
    """
    level_rng, time_rng = jax.random.split(rng)
    levels = num_levels(denoise_timesteps)
    if not 0 <= finest_count <= batch_size:
        raise ValueError(f"finest_count must be in [0, {batch_size}], got {finest_count}")
    if finest_count and levels > 1:
        coarser = jax.random.randint(level_rng, (batch_size - finest_count,), 0, levels - 1)
        d_level = jnp.concatenate([jnp.full((finest_count,), levels - 1, coarser.dtype), coarser])
    else:
        d_level = jax.random.randint(level_rng, (batch_size,), 0, levels)
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
