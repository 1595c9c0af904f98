"""Install shortcut_jax: `pip install -e .` (the metadata, dependencies and extras are in
pyproject.toml; the README's "Quick start" has the install command for each kind of machine).

Extras: `[test]` the test suite (CPU only); `[parity]` torch and diffusers for the parity tests;
`[convert]` torch for converting the FID Inception weights; `[tf]` TensorFlow, for building
TFDS datasets and jax2tf; `[tpu]` TPU VMs and the TPU compiler; `[cuda12]` / `[cuda13]` NVIDIA GPUs;
`[gpu-compile]` the GPU compiler of `python -m shortcut_jax.compile` (no GPU needed).
"""

from setuptools import setup

setup()
