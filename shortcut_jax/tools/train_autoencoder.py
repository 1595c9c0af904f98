"""Trains a small KL autoencoder (our `AutoencoderKL`) on the embedded MNIST digits.

    python -m shortcut_jax.tools.train_autoencoder \
        --out ~/.cache/shortcut_jax/mnist_autoencoder.npz [--steps 3000] [--seed 0]

The first stage of latent diffusion (Rombach et al. 2022) without its perceptual and GAN terms,
on a CPU in minutes: `AutoencoderKL` of the Stable Diffusion block structure, narrowed for 28x28x1
digits (`DEFAULT_ARCH`: blocks (16, 32, 32), one resnet per encoder block, GroupNorm 8, 242 k
parameters; 28x28x1 -> 7x7x4 latents, downsample factor 4), trained on the 4,000 digits of the
class-stratified split that the FD-MNIST classifier trains on (`fd_mnist.split_indices`); the
other 1,000 stay held out for the reconstruction score. Blocks (32, 64, 64) cost 3.9x the FLOPs
(57.6 vs 14.8 GFLOP a step at batch 64) and trained 2.6x slower here; convolution backward passes
run at a small fraction of the matmul rate on XLA:CPU.

Loss per image, as the LDM `LPIPSWithDiscriminator` with its learned log-variance at 0 and no
perceptual or GAN term::

    loss = sum_pixels |x - decode(z)|  +  kl_weight * sum_latent KL(q(z|x) || N(0, I)),
    z = mean + std * eps  (a posterior sample, reparameterised)

averaged over the batch (784 pixels, 196 latent elements). LDM's kl_weight 1e-6 relies on the
perceptual and GAN terms. Without them a small weight leaves the posterior nearly a point mass
and the decoder never learns to tolerate nearby latents, which is what a generator's small errors
are. Measured (1,000 steps each, held-out digits; FD-MNIST of decoded posterior means, and of the
means plus N(0, sigma^2) noise in the unit-std latent; real held-out digits read 1.6):

    kl_weight   posterior std / latent std   MSE      FD    FD sigma=0.2   FD sigma=0.4
    1e-4        0.019                        0.0138   10.9  18.8           62.1
    1e-3        0.040                        0.0139   11.3  14.6           32.1
    1e-2        0.201                        0.0140   10.6  11.3           15.2

so 1e-2 (the default) makes the decoder robust to latent noise at no cost in reconstruction. With
the default 3,000 steps: posterior std / latent std 0.26, MSE 0.0073, FD 2.6, 2.9 and 4.7.

At the end the latent scaling factor is computed the LDM way: 1 / std of the training digits'
posterior samples (all 4,000, one fixed draw), rounded to 4 significant digits so that a config
can state it as a literal (`experiments/mnist_latent.py`). The file is written atomically with
`vae.save_vae` and loads with `vae.load_vae` (or as `config.vae.path`).

Training is a pure function of (steps, seed, recipe) on one jax/XLA build: batch order from a
seeded numpy generator, initialisation and posterior noise from `jax.random.key(seed)` folded with
the step, and XLA on CPU is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from shortcut_jax import atomic_files, cli_inputs
from shortcut_jax.data.mnist import load_mnist
from shortcut_jax.evaluators import fd_mnist
from shortcut_jax.models import vae as vae_lib

# Last entries of the numpy seed sequences of this module (keep its streams apart).
_EPOCH_TAG = 0x4145  # 'AE'
_SCALE_TAG = 0x4153  # 'AS'
SCALING_DIGITS = 4  # significant digits of the stored scaling factor

DEFAULT_ARCH = vae_lib.VaeArch(
    in_channels=1,
    out_channels=1,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything besides (steps, seed) that determines the trained autoencoder.

    Attributes:
      arch: the `VaeArch` (in/out channels must be 1 for MNIST).
      batch_size: digits per Adam step (the last partial batch of an epoch is dropped).
      learning_rate: peak Adam learning rate (linear warm-up, then cosine decay to 0).
      warmup_steps: linear warm-up steps.
      kl_weight: weight of the summed KL term against the summed reconstruction term.
      reconstruction: 'l1' (LDM's pixel loss) or 'l2' (squared error), summed over pixels.
      grad_clip_norm: global gradient-norm clip (0 = none).
    """

    arch: vae_lib.VaeArch = DEFAULT_ARCH
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-2
    reconstruction: str = "l1"
    grad_clip_norm: float = 1.0


DEFAULT_RECIPE = Recipe()
DEFAULT_STEPS = 3_000
DEFAULT_SEED = 0
RECONSTRUCTIONS = ("l1", "l2")


def default_path() -> str:
    """mnist_autoencoder.npz in $SHORTCUT_JAX_CACHE, else in ~/.cache/shortcut_jax."""
    return os.path.join(fd_mnist.default_cache_dir(), "mnist_autoencoder.npz")


# --------------------------------------------------------------------------------------------
# Pure math.
# --------------------------------------------------------------------------------------------


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per image, summed over the latent elements.

    Args:
      mean: (B, h, w, c) posterior means.
      logvar: (B, h, w, c) posterior log-variances (clipped to [-30, 20] like diffusers).

    Returns:
      (B,) float32.
    """
    logvar = jnp.clip(logvar, -30.0, 20.0)
    per_element = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(per_element, axis=(1, 2, 3))


def reconstruction_error(images: jax.Array, outputs: jax.Array, kind: str) -> jax.Array:
    """Per-image reconstruction error summed over pixels.

    Args:
      images: (B, H, W, C) targets in [-1, 1].
      outputs: (B, H, W, C) decoder outputs.
      kind: 'l1' (absolute error) or 'l2' (squared error).

    Returns:
      (B,) float32.
    """
    difference = outputs - images
    error = jnp.abs(difference) if kind == "l1" else jnp.square(difference)
    return jnp.sum(error, axis=(1, 2, 3))


def loss_fn(
    params: Any, images: jax.Array, rng: jax.Array, recipe: Recipe
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The first-stage loss of a batch (see the module docstring).

    Args:
      params: the autoencoder's parameter tree.
      images: (B, 28, 28, 1) float32 in [-1, 1].
      rng: key of the posterior sample.
      recipe: the arch, the loss kind and the KL weight.

    Returns:
      loss: scalar, batch mean of reconstruction + kl_weight * KL.
      aux: batch means of 'reconstruction', 'kl', 'mse' (per pixel) and 'posterior_std'.
    """
    module = vae_lib.AutoencoderKL(recipe.arch)
    mean, logvar = module.apply({"params": params}, images, method=vae_lib.AutoencoderKL.encode)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    latents = mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
    outputs = module.apply({"params": params}, latents, method=vae_lib.AutoencoderKL.decode)
    reconstruction = reconstruction_error(images, outputs, recipe.reconstruction)
    kl = kl_to_standard_normal(mean, logvar)
    loss = jnp.mean(reconstruction + recipe.kl_weight * kl)
    aux = {
        "reconstruction": jnp.mean(reconstruction),
        "kl": jnp.mean(kl),
        "mse": jnp.mean(jnp.square(outputs - images)),
        "posterior_std": jnp.mean(std),
    }
    return loss, aux


def make_optimizer(recipe: Recipe, num_steps: int) -> optax.GradientTransformation:
    """Adam with linear warm-up and cosine decay to 0 (and global-norm clipping if set)."""
    warmup = min(recipe.warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, recipe.learning_rate, warmup, max(num_steps, warmup + 1), 0.0
    )
    parts = [optax.clip_by_global_norm(recipe.grad_clip_norm)] if recipe.grad_clip_norm else []
    return optax.chain(*parts, optax.adam(schedule))


def make_train_step(recipe: Recipe, optimizer: optax.GradientTransformation, base_rng: jax.Array):
    """A jitted `step(params, opt_state, images, step) -> (params, opt_state, loss, aux)`.

    The posterior noise of step k is drawn from fold_in(base_rng, k): resuming or repeating a
    step gives the same numbers. params and opt_state are donated.
    """

    def step(params, opt_state, images, step_index):
        rng = jax.random.fold_in(base_rng, step_index)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, rng, recipe)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    return jax.jit(step, donate_argnums=(0, 1))


# --------------------------------------------------------------------------------------------
# Data, encoding and scores.
# --------------------------------------------------------------------------------------------


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FD-MNIST classifier's stratified split of the 5,000 embedded digits.

    Returns:
      images: (5000, 28, 28, 1) float32 in [-1, 1] (read-only).
      train: (4000,) int64 indices the autoencoder trains on.
      held_out: (1000,) int64 indices kept for the reconstruction score.
    """
    images, _ = load_mnist()
    train, held_out = fd_mnist.split_indices()
    return images, train, held_out


def posterior_moments(
    arch: vae_lib.VaeArch, params: Any, images: np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled posterior means and stds of `images`, in chunks.

    Args:
      arch: the block structure.
      params: the parameter tree.
      images: (N, H, W, C) float32 in [-1, 1].
      batch_size: images per call.

    Returns:
      (mean, std), each (N, H/f, W/f, latent_channels) float32 numpy.
    """
    encode = jax.jit(lambda p, x: vae_lib.encode_moments(arch, p, x))
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        mean, std = encode(params, jnp.asarray(images[start : start + batch_size]))
        means.append(np.asarray(mean))
        stds.append(np.asarray(std))
    return np.concatenate(means), np.concatenate(stds)


def reconstruct(
    vae: vae_lib.Vae, images: np.ndarray, batch_size: int = 500, sample_seed: int | None = None
) -> np.ndarray:
    """Decoded posterior means (or one posterior sample each) of `images`.

    Args:
      vae: the autoencoder.
      images: (N, H, W, C) float32 in [-1, 1].
      batch_size: images per call.
      sample_seed: None decodes the posterior means; an int decodes mean + std * eps with eps
        from numpy's generator of that seed.

    Returns:
      (N, H, W, C) float32, not clipped.
    """
    arch, scaling = vae.arch, vae.scaling_factor

    @jax.jit
    def round_trip(params, x, eps):
        mean, std = vae_lib.encode_moments(arch, params, x)
        latents = (mean + std * eps) * scaling
        return vae_lib.decode(arch, params, latents, scaling_factor=scaling)

    side = images.shape[1] // arch.downsample_factor
    shape = (len(images), side, side, arch.latent_channels)
    if sample_seed is None:
        eps = np.zeros(shape, np.float32)
    else:
        eps = np.random.default_rng(sample_seed).standard_normal(shape).astype(np.float32)
    outputs = [
        np.asarray(
            round_trip(
                vae.params,
                jnp.asarray(images[start : start + batch_size]),
                jnp.asarray(eps[start : start + batch_size]),
            )
        )
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def decode_scaled(vae: vae_lib.Vae, latents: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Decodes scaled latents (N, h, w, c) in chunks: (N, H, W, C) float32, not clipped."""
    decode = jax.jit(
        lambda params, z: vae_lib.decode(vae.arch, params, z, scaling_factor=vae.scaling_factor)
    )
    outputs = [
        np.asarray(decode(vae.params, jnp.asarray(latents[start : start + batch_size])))
        for start in range(0, len(latents), batch_size)
    ]
    return np.concatenate(outputs)


def latent_sample_std(mean: np.ndarray, std: np.ndarray, seed: int) -> float:
    """Standard deviation of one posterior sample per image, over every latent element.

    Args:
      mean: (N, h, w, c) unscaled posterior means.
      std: (N, h, w, c) posterior stds.
      seed: seed of the fixed draw.

    Returns:
      The std (float64 arithmetic, so the result does not depend on summation order much).
    """
    eps = np.random.default_rng([seed, _SCALE_TAG]).standard_normal(mean.shape)
    samples = mean.astype(np.float64) + std.astype(np.float64) * eps
    return float(np.std(samples))


def scaling_factor_of(sample_std: float) -> float:
    """LDM's `scale_by_std` factor 1 / std, rounded to `SCALING_DIGITS` significant digits.

    A short literal for configs (experiments/mnist_latent.py); the scaled latents' std is 1 to
    within 5e-4. Another CPU (another XLA code path) may train slightly different weights and
    print another factor: pass that one with --config.vae.scaling_factor (the latent source
    refuses a factor that differs from the one the latents were encoded for).
    """
    return float(f"{1.0 / sample_std:.{SCALING_DIGITS}g}")


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def _check(num_steps: int, recipe: Recipe) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if recipe.reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction={recipe.reconstruction!r}; allowed: {RECONSTRUCTIONS}")
    if recipe.arch.in_channels != 1 or recipe.arch.out_channels != 1:
        raise ValueError(f"MNIST digits have 1 channel; got {recipe.arch}")
    if not 0 <= recipe.kl_weight < math.inf:
        raise ValueError(f"kl_weight={recipe.kl_weight} must be a finite float >= 0")


def fit(
    num_steps: int,
    seed: int,
    recipe: Recipe,
    train_images: np.ndarray,
    log_every: int = 250,
) -> tuple[Any, list[dict[str, float]], dict[str, float]]:
    """The training loop alone: a pure function of its arguments (on one jax/XLA build).

    Args:
      num_steps: Adam steps (>= 1).
      seed: initialisation, batch order and posterior noise.
      recipe: architecture and loss.
      train_images: (N, 28, 28, 1) float32 in [-1, 1]; batches are drawn without replacement
        from a per-epoch permutation seeded by (seed, epoch).
      log_every: record the batch losses every this many steps (and at the last).

    Returns:
      params: the trained parameter tree (float32 numpy).
      history: one {step, loss, reconstruction, kl, mse, posterior_std} per record.
      timing: {'seconds': init + compile + steps, 'first_step_seconds', 'steps_per_second'
        (after the first step)}.
    """
    _check(num_steps, recipe)
    steps_per_epoch = len(train_images) // recipe.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={recipe.batch_size} exceeds the {len(train_images)} digits")
    started = time.perf_counter()
    size = recipe.arch.downsample_factor
    init = jax.jit(vae_lib.AutoencoderKL(recipe.arch).init)
    params = init(jax.random.key(seed), jnp.zeros((1, size, size, 1), jnp.float32))["params"]
    optimizer = make_optimizer(recipe, num_steps)
    opt_state = optimizer.init(params)
    train_step = make_train_step(recipe, optimizer, jax.random.fold_in(jax.random.key(seed), 1))

    history: list[dict[str, float]] = []
    first_step_done = started
    epoch, order = -1, np.arange(0)
    for step in range(num_steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = np.random.default_rng([seed, epoch, _EPOCH_TAG]).permutation(len(train_images))
        position = step % steps_per_epoch
        batch = train_images[
            order[position * recipe.batch_size : (position + 1) * recipe.batch_size]
        ]
        params, opt_state, loss, aux = train_step(params, opt_state, batch, np.int32(step))
        if step == 0:
            jax.block_until_ready(loss)
            first_step_done = time.perf_counter()
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
            record = {"step": step + 1, "loss": float(loss)}
            record.update({name: float(value) for name, value in aux.items()})
            history.append(record)
            logging.info("autoencoder step %d: %s", step + 1, record)
    params = jax.block_until_ready(params)
    finished = time.perf_counter()
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    timing = {
        "seconds": finished - started,
        "first_step_seconds": first_step_done - started,
        "steps_per_second": (num_steps - 1) / max(finished - first_step_done, 1e-9),
    }
    return params, history, timing


def train_autoencoder(
    num_steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    recipe: Recipe = DEFAULT_RECIPE,
    log_every: int = 250,
) -> tuple[vae_lib.Vae, dict[str, Any]]:
    """Trains on the 4,000 training digits (`fit`), sets the scaling factor, scores held-out.

    Args:
      num_steps: Adam steps (>= 1).
      seed: initialisation, batch order and posterior noise (and the scaling factor's draw).
      recipe: architecture and loss (see `Recipe`).
      log_every: record (and log) the batch losses every this many steps (and at the last).

    Returns:
      vae: the trained `Vae` with its scaling factor (float32 numpy params).
      metrics: JSON-ready dict: 'history' (see `fit`), 'train_seconds' (init, compile and the
        steps), 'first_step_seconds', 'steps_per_second' (after the first step),
        'held_out_mse' / 'held_out_l1' (per pixel on [-1, 1], the decoded posterior means of
        the 1,000 held-out digits, clipped), 'scaling_factor', 'latent_std' (of the unscaled
        posterior samples of the training digits), 'latent_mean_std' (of their means),
        'posterior_std_mean', 'posterior_std_over_latent_std' (how much of the latent spread
        is posterior noise), 'latent_shape', 'num_params', 'checksum', 'seed', 'steps',
        'recipe'.

    Raises:
      ValueError: on a bad recipe or step count.
    """
    _check(num_steps, recipe)
    images, train_index, held_out_index = split()
    train_images = np.asarray(images[train_index])
    params, history, timing = fit(num_steps, seed, recipe, train_images, log_every)

    mean, std = posterior_moments(recipe.arch, params, train_images)
    sample_std = latent_sample_std(mean, std, seed)
    scaling_factor = scaling_factor_of(sample_std)
    vae = vae_lib.Vae(
        recipe.arch,
        params,
        scaling_factor,
        vae_lib.params_checksum(params),
        f"train_autoencoder(steps={num_steps}, seed={seed})",
    )
    held_out = np.asarray(images[held_out_index])
    outputs = np.clip(reconstruct(vae, held_out), -1.0, 1.0)
    metrics = {
        "history": history,
        "train_seconds": timing["seconds"],
        "first_step_seconds": timing["first_step_seconds"],
        "steps_per_second": timing["steps_per_second"],
        "held_out_mse": float(np.mean(np.square(outputs - held_out))),
        "held_out_l1": float(np.mean(np.abs(outputs - held_out))),
        "scaling_factor": scaling_factor,
        "latent_std": sample_std,
        "latent_mean_std": float(np.std(mean)),
        "posterior_std_mean": float(np.mean(std)),
        "posterior_std_over_latent_std": float(np.mean(std)) / sample_std,
        "latent_shape": list(mean.shape[1:]),
        "num_params": vae.num_params,
        "checksum": vae.checksum,
        "seed": int(seed),
        "steps": int(num_steps),
        "recipe": {
            **dataclasses.asdict(recipe),
            "arch": dataclasses.asdict(recipe.arch),
        },
    }
    return vae, metrics


# --------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------


def _define_flags() -> dict[str, Any]:
    """The CLI's flags (defined only when run as a program, so importing defines none)."""
    return {
        "out": flags.DEFINE_string("out", None, f"Output .npz (local or gs://): {default_path()}"),
        "steps": flags.DEFINE_integer("steps", DEFAULT_STEPS, "Adam steps."),
        "seed": flags.DEFINE_integer("seed", DEFAULT_SEED, "Initialisation, batches and noise."),
        "kl_weight": flags.DEFINE_float(
            "kl_weight", DEFAULT_RECIPE.kl_weight, "Weight of the summed KL term."
        ),
        "reconstruction": flags.DEFINE_enum(
            "reconstruction", DEFAULT_RECIPE.reconstruction, list(RECONSTRUCTIONS), "Pixel loss."
        ),
        "metrics_out": flags.DEFINE_string("metrics_out", None, "Also write metrics JSON here."),
    }


def main(argv: list[str], flag_values: dict[str, Any]) -> None:
    """Trains, saves the .npz atomically and prints the numbers a config needs."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = {name: holder.value for name, holder in flag_values.items()}
    if not values["out"]:
        raise app.UsageError(f"--out is required (e.g. --out {default_path()})")
    if values["steps"] < 1:
        raise app.UsageError(f"--steps={values['steps']}: at least 1")
    recipe = dataclasses.replace(
        DEFAULT_RECIPE, kl_weight=values["kl_weight"], reconstruction=values["reconstruction"]
    )
    vae, metrics = train_autoencoder(values["steps"], values["seed"], recipe)
    with cli_inputs.errors_as_one_line(OSError):  # an output that cannot be written: status 1
        vae_lib.save_vae(values["out"], vae)
        if values["metrics_out"]:
            atomic_files.write_json(values["metrics_out"], metrics, indent=1)
    arch, out = vae.arch, values["out"]
    print(
        f"Wrote {out}: {metrics['num_params']:,} parameters, latents "
        f"{tuple(metrics['latent_shape'])}, checksum {vae.checksum[:12]}...\n"
        f"  trained {metrics['steps']} steps in {metrics['train_seconds']:.0f} s; held-out MSE "
        f"{metrics['held_out_mse']:.5f} (per pixel in [-1, 1]), L1 {metrics['held_out_l1']:.4f}\n"
        f"  scaling factor {vae.scaling_factor} (latent std {metrics['latent_std']:.4f}; "
        f"posterior std / latent std {metrics['posterior_std_over_latent_std']:.3f})\n"
        f"Config fields for this file: --config.vae.path={out} "
        f"--config.vae.scaling_factor={vae.scaling_factor} "
        f"--config.vae.latent_channels={arch.latent_channels} "
        f"--config.vae.downsample_factor={arch.downsample_factor}"
    )


if __name__ == "__main__":
    _flag_values = _define_flags()
    cli_inputs.run(lambda argv: main(argv, _flag_values))
