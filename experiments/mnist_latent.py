"""The MNIST default in the latent space of a small KL autoencoder trained here, on this machine.

Three commands, in this order (all offline; ~5-25 min, ~1 min and ~17 min on 2 cores):

    python -m shortcut_jax.tools.train_autoencoder --out ~/.cache/shortcut_jax/mnist_autoencoder.npz
    python -m shortcut_jax.tools.encode_latents --config experiments/mnist_latent.py \
        --out ~/.cache/shortcut_jax/mnist_latents
    python -m shortcut_jax.main --config experiments/mnist_latent.py --workdir runs/mnist_latent

(with $SHORTCUT_JAX_CACHE set, use that directory instead of ~/.cache/shortcut_jax in the first two
commands: the config looks there). Then `python -m shortcut_jax.evaluate --workdir
runs/mnist_latent --steps 1,2,4,8,128 --num 1000 --metrics fd_mnist` scores decoded samples.

Everything of experiments/mnist.py (DiT width 128, depth 4, 4 heads, batch 32, teacher = current
parameters, CFG 1.5) at the budget BENCHMARKS section 5 measured (the pixel default's before it
became 7,000 steps: 14,000 steps, AdamW 5e-4 cosine, bootstrap_every 8, FD-MNIST halfway and at
the end), but the
model works on the 7x7x4 latents of `shortcut_jax.tools.train_autoencoder` (AutoencoderKL blocks
(16, 32, 32), downsample factor 4) with patch size 1: 49 tokens, as many as the pixel default's
28 / 4 patches. Training reads the scaled posterior moments that encode_latents stored for all
5,000 digits (a fresh posterior sample every step); samples are decoded to 28x28 pixels before
grids and scores. No flips: digits are not mirror-symmetric.

`SCALING_FACTOR` is what the first command computes deterministically with its defaults (--steps
3000 --seed 0; 1 / std of the training latents, rounded to 4 significant digits, as the file
stores it). A config never reads files when it is built, so after training with other flags,
pass the printed factor: `--config.vae.scaling_factor=...` to both encode_latents and main (both
refuse a factor that differs from the latents').
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

# What `python -m shortcut_jax.tools.train_autoencoder` (defaults: 3,000 steps, seed 0) stores.
SCALING_FACTOR = 1.045
LATENT_CHANNELS = 4
DOWNSAMPLE_FACTOR = 4  # 28x28 digits -> 7x7 latents
AUTOENCODER_FILE = "mnist_autoencoder.npz"
LATENT_DIR = "mnist_latents"


def cache_dir() -> str:
    """$SHORTCUT_JAX_CACHE, else ~/.cache/shortcut_jax (read when the config is built)."""
    return os.environ.get("SHORTCUT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "shortcut_jax"
    )


def _mnist_default() -> ml_collections.ConfigDict:
    """get_config() of experiments/mnist.py beside this file (so the two never drift apart)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist.py")
    spec = importlib.util.spec_from_file_location("_mnist_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    """experiments/mnist.py on 7x7x4 autoencoder latents with DiT patch size 1 (49 tokens)."""
    config = _mnist_default()
    # The budget BENCHMARKS section 5 measured (the pixel default's until it became 7,000 steps).
    config.total_steps = 14_000
    config.optim.learning_rate = 5e-4
    config.bootstrap_every = 8
    config.eval_every_steps = 7_000
    cache = cache_dir()
    config.vae.path = os.path.join(cache, AUTOENCODER_FILE)
    config.vae.scaling_factor = SCALING_FACTOR
    config.vae.latent_channels = LATENT_CHANNELS
    config.vae.downsample_factor = DOWNSAMPLE_FACTOR
    config.vae.sample_posterior = True  # as LDM: a posterior sample per example and step
    config.vae.dtype = "float32"
    config.data.latent_dir = os.path.join(cache, LATENT_DIR)
    config.data.random_flip = False
    config.model.patch_size = 1
    return config
