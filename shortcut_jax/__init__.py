"""shortcut_jax: shortcut models (Frans et al., ICLR 2025) in JAX/Flax, from one CPU to TPU pods."""

__version__ = "0.1.0"
