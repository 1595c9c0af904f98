"""shortcut_jax: train shortcut models (Frans et al., ICLR 2025) in JAX/Flax, one CPU to TPU pods."""

__version__ = "0.1.0"
