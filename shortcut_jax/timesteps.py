"""Time and step-size grids shared by every objective and the sampler.

A step size is d = 1/M for M in {1, 2, 4, ..., denoise_timesteps}; the network sees its log2 index
``d_level = log2(M)``, so level 0 is one step of size 1 and level ``log2(denoise_timesteps)`` is the
smallest step, the one flow matching trains.
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
    """d = 2**-d_level as float32. d_level: (B,) int."""
    return jnp.exp2(-d_level.astype(jnp.float32))


def sample_flow_times(rng: jax.Array, batch_size: int, denoise_timesteps: int) -> jax.Array:
    """t for the flow-matching part: uniform on the grid {0, 1/T, ..., (T-1)/T}. Returns (B,)."""
    index = jax.random.randint(rng, (batch_size,), 0, denoise_timesteps)
    return index.astype(jnp.float32) / denoise_timesteps


def sample_bootstrap_levels_and_times(
    rng: jax.Array, batch_size: int, denoise_timesteps: int
) -> tuple[jax.Array, jax.Array]:
    """Draws, per example, a shortcut level and a start time for the self-consistency part.

    Each example gets its own d_level uniform over {0, ..., log2(T) - 1} (so every step size is
    trained at every batch size, even when the bootstrap part has fewer examples than levels) and a
    time t uniform on the grid of multiples of 2d = 2**-d_level, i.e. the start of a step of size 2d
    that the two half steps of size d must reproduce.

    Returns:
      d_level: (B,) int32, the level of the *student* step 2d; the teacher uses d_level + 1.
      t: (B,) float32 in [0, 1).
    """
    level_rng, time_rng = jax.random.split(rng)
    levels = num_levels(denoise_timesteps)
    d_level = jax.random.randint(level_rng, (batch_size,), 0, levels)
    sections = jnp.left_shift(1, d_level)  # number of student steps of size 2**-d_level
    uniform = jax.random.uniform(time_rng, (batch_size,))
    index = jnp.minimum(jnp.floor(uniform * sections), sections - 1)
    t = index / sections.astype(jnp.float32)
    return d_level.astype(jnp.int32), t.astype(jnp.float32)


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t x1 with t: (B,) broadcast over the trailing axes of x0 and x1."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
    return (1.0 - t) * x0 + t * x1
