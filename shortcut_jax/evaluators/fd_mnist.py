"""FD-MNIST: a Frechet distance on the features of a small MNIST classifier trained here.

FID needs InceptionV3 weights, which cannot be downloaded offline. For the embedded MNIST default
(`shortcut_jax.data.mnist`, 5,000 real digits) this module provides an offline stand-in: a small
CNN classifier that the project trains itself, deterministically, on 4,000 of those digits (400
per class; the other 1,000 are held out to report its accuracy). Its 128-d penultimate layer is
the feature space, and the score goes through the same code path as FID (`features.FeatureNet`,
`fid.feature_statistics`, `fid.frechet_distance`).

The network (426 k parameters, 2.3 M multiply-adds per image)::

    28x28x1 -> conv3x3(16) relu -> maxpool2 -> conv3x3(32) relu -> maxpool2
            -> conv3x3(64) relu -> flatten (7*7*64) -> dense(128) = features -> relu -> dense(10)

Three convolutions with two poolings see whole strokes at 7x7, plenty for 28x28 digits. Widths
(16, 32, 64) train about 4x faster than (32, 64, 128) at the same held-out accuracy (~98.5 %,
measured over 4 seeds), so the default recipe (8 epochs of 4,000 digits, batch 64, Adam 2e-3
with cosine decay, random shifts of up to 1 pixel) trains in under 10 s on 2 CPU cores. There is
no batch norm or dropout, so `apply` is a pure function without state or randomness. The
features are the dense(128) *pre-activations*: no dead (always-zero) ReLU dimensions, and closer
to Gaussian than rectified values, which suits a Frechet distance.

The classifier that defines the score ships with the package (`PINNED_PATH`, 1.7 MB: the default
recipe and seed, trained once by `train_classifier`). Training is bitwise deterministic on one
machine, but CPUs of this kind differ in their float rounding, and a classifier trained on
another machine moved FD-MNIST readings by 1-2 % (floor 3.318 vs 3.352): a metric has to be one
fixed function, so every FD-MNIST number, on every machine, comes from the shipped weights.
Other recipes or seeds (studies of the metric itself) train on demand and are cached as an
``.npz`` in ``cache_dir`` (default ``$SHORTCUT_JAX_CACHE`` or ``~/.cache/shortcut_jax``) under a
name that contains a hash of the recipe, so versions never collide. Nothing is ever downloaded.

Samples are scored against real digits loaded at the generator's size (`sweep.reference_features`
reads them as the run's data serves them), which pass through the same resize to 28x28 as the
samples: real 32x32 digits against 28x28 ones read about 130 from the resize blur alone, against
32x32 ones about 2.

Typical use (the evaluation reaches it as the 'fd_mnist' entry of `evaluators.registry`; its
reference, floor and ceiling are those of every metric, see `evaluators.sweep`)::

    net = fd_mnist.feature_net()
    feats = features.compute_features(net, images)        # (N, 128)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from shortcut_jax import atomic_files
from shortcut_jax.data.mnist import NUM_CLASSES, load_mnist
from shortcut_jax.evaluators import features

FORMAT_VERSION = 1
IMAGE_SIZE = 28
FEATURE_DIM = 128
_CACHE_ENV = "SHORTCUT_JAX_CACHE"
_FILE_PREFIX = "fd_mnist_classifier"
_PARAM_PREFIX = "param/"
_META_KEY = "metadata_json"
PINNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fd_mnist_classifier.npz")
# Last entries of numpy seed sequences, keeping the streams of this module apart.
_SPLIT_TAG = 0x46D1
_EPOCH_TAG = 0x46D2

Params = Any


# --------------------------------------------------------------------------------------------
# Network.
# --------------------------------------------------------------------------------------------


class MnistClassifier(nn.Module):
    """Small CNN on (B, 28, 28, 1) images in [-1, 1] (see the module docstring).

    Attributes:
      widths: channels of the three 3x3 convolutions.
      feature_dim: width D of the penultimate dense layer (the FD-MNIST features).
    """

    widths: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = FEATURE_DIM

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Classifies digits.

        Args:
          images: (B, 28, 28, 1) float32 in [-1, 1].

        Returns:
          features: (B, feature_dim) float32 penultimate pre-activations.
          logits: (B, 10) float32.
        """
        x = images
        for index, width in enumerate(self.widths):
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{index}")(x))
            if index < 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        feats = nn.Dense(self.feature_dim, name="features")(x)
        logits = nn.Dense(NUM_CLASSES, name="logits")(nn.relu(feats))
        return feats, logits


def _to_classifier_input(images: jax.Array) -> jax.Array:
    """(B, H, W, C) in [-1, 1], C in {1, 3} -> (B, 28, 28, 1): channel mean, antialiased resize."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (B, H, W, 1 or 3), got {images.shape}")
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 3:
        x = jnp.mean(x, axis=-1, keepdims=True)
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), method="linear")
    return x


def _apply_features(params: Params, images: jax.Array) -> jax.Array:
    """The `FeatureNet.apply` of FD-MNIST: (B, H, W, C) in [-1, 1] -> (B, 128) float32."""
    feats, _ = MnistClassifier().apply({"params": params}, _to_classifier_input(images))
    return feats


def _apply_logits(params: Params, images: jax.Array) -> jax.Array:
    """(B, H, W, C) in [-1, 1] -> (B, 10) logits."""
    _, logits = MnistClassifier().apply({"params": params}, _to_classifier_input(images))
    return logits


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained classifier (hashed into the cache file name).

    Attributes:
      train_per_class: training digits per class (the rest of the 500 per class are held out).
      epochs: passes over the training digits.
      batch_size: examples per Adam step (the last partial batch of an epoch is dropped).
      learning_rate: peak Adam learning rate (cosine decay to 0 over all steps).
      max_shift: training augmentation: each image is shifted by an integer number of pixels
        in [-max_shift, max_shift] along each axis (a fresh seeded draw every epoch).
      split_seed: seed of the fixed train/held-out split (independent of the training seed, so
        every seed is scored on the same held-out digits).
    """

    train_per_class: int = 400
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    max_shift: int = 1
    split_seed: int = 1234


DEFAULT_RECIPE = Recipe()
DEFAULT_SEED = 0


def recipe_hash(recipe: Recipe = DEFAULT_RECIPE, seed: int = DEFAULT_SEED) -> str:
    """A 16-hex-digit hash of the recipe, the seed, the architecture and the cache format.

    Args:
      recipe: the training recipe.
      seed: the training seed.

    Returns:
      Lowercase hex string; equal inputs give equal hashes across processes and machines.
    """
    model = MnistClassifier()
    description = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "recipe": dataclasses.asdict(recipe),
        "architecture": {"widths": list(model.widths), "feature_dim": model.feature_dim},
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_indices(recipe: Recipe = DEFAULT_RECIPE) -> tuple[np.ndarray, np.ndarray]:
    """The fixed, class-stratified split of the 5,000 digits.

    Args:
      recipe: uses `train_per_class` and `split_seed`.

    Returns:
      train: (10 * train_per_class,) int64 sorted indices into `load_mnist()`.
      held_out: (5000 - 10 * train_per_class,) int64 sorted indices, disjoint from train.
    """
    _, labels = load_mnist()
    rng = np.random.default_rng([recipe.split_seed, _SPLIT_TAG])
    train, held_out = [], []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        if not 0 < recipe.train_per_class < len(members):
            raise ValueError(
                f"train_per_class={recipe.train_per_class} must be in [1, {len(members) - 1}]"
            )
        train.append(members[: recipe.train_per_class])
        held_out.append(members[recipe.train_per_class :])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def _shift_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shifts each (H, W, 1) image by integer (dy, dx), filling with background -1.

    Args:
      images: (N, H, W, 1) float32.
      shifts: (N, 2) int, each entry in [-pad, pad] with pad = max |shift|.

    Returns:
      (N, H, W, 1) float32.
    """
    pad = int(np.abs(shifts).max(initial=0))
    if pad == 0:
        return images
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
    rows = pad - shifts[:, 0, None] + np.arange(height)[None, :]  # (N, H)
    cols = pad - shifts[:, 1, None] + np.arange(width)[None, :]  # (N, W)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@jax.jit
def _predict(params: Params, images: jax.Array) -> jax.Array:
    """(B, H, W, C) in [-1, 1] -> (B,) int32 predicted classes."""
    return jnp.argmax(_apply_logits(params, images), axis=-1)


def _accuracy(params: Params, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Share of `images` (N, 28, 28, 1) classified as `labels` (N,)."""
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        correct += int(
            np.sum(np.asarray(_predict(params, batch)) == labels[start : start + batch_size])
        )
    return correct / len(images)


def train_classifier(
    seed: int = DEFAULT_SEED, recipe: Recipe = DEFAULT_RECIPE
) -> tuple[Params, dict[str, Any]]:
    """Trains the FD-MNIST classifier; a pure function of (seed, recipe) apart from reading MNIST.

    Same (seed, recipe) on the same jax/XLA build gives bitwise-identical parameters: the split,
    the batch order and the shifts come from seeded numpy generators, the initialization from
    ``jax.random.key(seed)``, and XLA on CPU is deterministic.

    Args:
      seed: training seed (initialization, batch order, augmentation).
      recipe: the training recipe; `DEFAULT_RECIPE` is what `load_or_train` caches.

    Returns:
      params: the classifier's parameter pytree (float32 arrays).
      info: dict with 'held_out_accuracy' (float in [0, 1]), 'train_accuracy', 'num_train',
        'num_held_out', 'train_seconds' (loading, compiling and training, without the final
        evaluation), 'steps', 'feature_dim', 'recipe_hash', 'seed',
        'recipe' (dict).
    """
    start_time = time.perf_counter()
    images, labels = load_mnist()
    train_index, held_out_index = split_indices(recipe)
    train_images, train_labels = images[train_index], labels[train_index]
    num_train = len(train_index)
    steps_per_epoch = num_train // recipe.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={recipe.batch_size} exceeds the {num_train} training digits")
    total_steps = steps_per_epoch * recipe.epochs

    model = MnistClassifier()
    params = model.init(jax.random.key(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]
    schedule = optax.cosine_decay_schedule(recipe.learning_rate, max(total_steps, 1))
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)

    def loss_fn(params: Params, batch_images: jax.Array, batch_labels: jax.Array) -> jax.Array:
        _, logits = model.apply({"params": params}, batch_images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

    @jax.jit
    def train_step(params, opt_state, batch_images, batch_labels):
        grads = jax.grad(loss_fn)(params, batch_images, batch_labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for epoch in range(recipe.epochs):
        rng = np.random.default_rng([seed, epoch, _EPOCH_TAG])
        order = rng.permutation(num_train)
        shifts = rng.integers(-recipe.max_shift, recipe.max_shift + 1, size=(num_train, 2))
        epoch_images = _shift_images(train_images[order], shifts)
        epoch_labels = train_labels[order]
        for step in range(steps_per_epoch):
            batch = slice(step * recipe.batch_size, (step + 1) * recipe.batch_size)
            params, opt_state = train_step(
                params, opt_state, epoch_images[batch], epoch_labels[batch]
            )
    params = jax.block_until_ready(params)
    train_seconds = time.perf_counter() - start_time

    eval_batch = 500
    info = {
        "held_out_accuracy": _accuracy(
            params, images[held_out_index], labels[held_out_index], eval_batch
        ),
        "train_accuracy": _accuracy(params, train_images, train_labels, eval_batch),
        "num_train": int(num_train),
        "num_held_out": int(len(held_out_index)),
        "steps": int(total_steps),
        "feature_dim": FEATURE_DIM,
        "recipe_hash": recipe_hash(recipe, seed),
        "seed": int(seed),
        "recipe": dataclasses.asdict(recipe),
        "train_seconds": train_seconds,
    }
    return params, info


# --------------------------------------------------------------------------------------------
# Cache.
# --------------------------------------------------------------------------------------------


class CacheError(features.WeightsError, RuntimeError):
    """A cached classifier file exists but cannot be read or does not match its name."""


def default_cache_dir() -> str:
    """``$SHORTCUT_JAX_CACHE`` if set, else ``~/.cache/shortcut_jax``."""
    return os.environ.get(_CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "shortcut_jax"
    )


def cache_path(
    cache_dir: str | None = None, recipe: Recipe = DEFAULT_RECIPE, seed: int = DEFAULT_SEED
) -> str:
    """Path of the cached classifier for (recipe, seed): ``<dir>/fd_mnist_classifier_<hash>.npz``.

    Args:
      cache_dir: directory; `default_cache_dir()` if None.
      recipe: the training recipe.
      seed: the training seed.

    Returns:
      The file path (the file need not exist).
    """
    directory = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    return os.path.join(directory, f"{_FILE_PREFIX}_{recipe_hash(recipe, seed)}.npz")


def _save(path: str, params: Params, info: dict[str, Any]) -> None:
    """Writes params (flattened, keys 'param/<module>/<name>') and JSON metadata atomically."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    arrays = {_PARAM_PREFIX + key: np.asarray(value) for key, value in flat.items()}
    metadata = {"format_version": FORMAT_VERSION, **info}
    arrays[_META_KEY] = np.array(json.dumps(metadata, sort_keys=True))
    atomic_files.write_npz(path, **arrays)


def _load(path: str, expected_hash: str) -> tuple[Params, dict[str, Any]]:
    """Reads a classifier file; raises `CacheError` naming the file on any problem."""

    def fail(reason: str) -> CacheError:
        if path == PINNED_PATH:
            return CacheError(
                f"the FD-MNIST classifier shipped with shortcut_jax, {path!r}, is unusable "
                f"({reason}). Reinstall shortcut_jax (pip install --force-reinstall) or restore "
                "the file from the repository."
            )
        return CacheError(
            f"FD-MNIST classifier cache file {path!r} is unusable ({reason}). "
            f"Delete it and it will be retrained (a few seconds)."
        )

    try:
        with np.load(path, allow_pickle=False) as archive:
            metadata = json.loads(str(archive[_META_KEY]))
            flat = {
                key[len(_PARAM_PREFIX) :]: np.array(archive[key])
                for key in archive.files
                if key.startswith(_PARAM_PREFIX)
            }
    except Exception as error:
        raise fail(f"cannot read it: {type(error).__name__}: {error}") from error
    if not isinstance(metadata, dict):
        raise fail("its metadata is not a JSON object")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise fail(f"format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}")
    if metadata.get("recipe_hash") != expected_hash:
        raise fail(f"recipe hash {metadata.get('recipe_hash')!r}, expected {expected_hash!r}")
    expected = traverse_util.flatten_dict(
        jax.eval_shape(
            MnistClassifier().init,
            jax.random.key(0),
            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)),
        )["params"],
        sep="/",
    )
    shapes = {key: (value.shape, value.dtype) for key, value in flat.items()}
    wanted = {key: (value.shape, value.dtype) for key, value in expected.items()}
    if shapes != wanted:
        raise fail(f"its parameters {shapes} do not match the network's {wanted}")
    params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))
    info = {key: value for key, value in metadata.items() if key != "format_version"}
    return params, info


def load_or_train(
    cache_dir: str | None = None, recipe: Recipe = DEFAULT_RECIPE, seed: int = DEFAULT_SEED
) -> tuple[Params, dict[str, Any]]:
    """The classifier for (recipe, seed): the shipped one, a cached one, or trained and cached.

    Args:
      cache_dir: directory of the cache (created if needed). None with the default recipe and
        seed means the shipped classifier (`PINNED_PATH`), which is what every FD-MNIST score
        uses; None otherwise means `default_cache_dir()`. Given explicitly, the default recipe
        is trained into it too (to check the shipped weights against the training code).
      recipe: the training recipe.
      seed: the training seed.

    Returns:
      params: the classifier's parameter pytree.
      info: the dict of `train_classifier` (as recorded when the file was written) plus
        'cache_path' (the file read or written) and 'loaded_from_cache' (bool).

    Raises:
      CacheError: if the file exists but is unreadable or does not match; the message names
        the file and what to do (it is never overwritten silently).
    """
    expected_hash = recipe_hash(recipe, seed)
    if cache_dir is None and (recipe, seed) == (DEFAULT_RECIPE, DEFAULT_SEED):
        params, info = _load(PINNED_PATH, expected_hash)
        return params, {**info, "cache_path": PINNED_PATH, "loaded_from_cache": True}
    path = cache_path(cache_dir, recipe, seed)
    if os.path.exists(path):
        params, info = _load(path, expected_hash)
        return params, {**info, "cache_path": path, "loaded_from_cache": True}
    params, info = train_classifier(seed, recipe)
    _save(path, params, info)
    return params, {**info, "cache_path": path, "loaded_from_cache": False}


# --------------------------------------------------------------------------------------------
# Feature network.
# --------------------------------------------------------------------------------------------


def feature_net(cache_dir: str | None = None, batch_size: int = 256) -> features.FeatureNet:
    """The FD-MNIST feature network: the shipped classifier (another one with `cache_dir`).

    Args:
      cache_dir: see `load_or_train`.
      batch_size: images per device per call.

    Returns:
      `FeatureNet` with name 'fd_mnist', dim 128 and
      ``apply(params, images (B, H, W, C) float32 in [-1, 1], C in {1, 3}) -> (B, 128) float32``;
      other sizes than 28x28 are resized (antialiased bilinear), 3 channels are averaged.
    """
    params, _ = load_or_train(cache_dir)
    return features.FeatureNet(
        name="fd_mnist",
        dim=FEATURE_DIM,
        params=jax.device_put(params),
        apply=_apply_features,
        batch_size=int(batch_size),
        weights_digest=features.params_digest(params),
    )
