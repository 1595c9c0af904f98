"""shortcut_jax: shortcut models (Frans et al., ICLR 2025) in JAX/Flax, from one CPU to TPU pods."""

from shortcut_jax import allocator as _allocator

# Before anything imports jax: keep XLA:CPU's per-step temporaries mapped (see allocator.py).
_allocator.tune_glibc_malloc()

__version__ = "0.1.0"
