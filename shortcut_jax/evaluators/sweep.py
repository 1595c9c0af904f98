"""Scores of a model's samples at several step budgets: FD-MNIST, FID, precision and recall.

`build_metrics` sets up the feature networks and their reference statistics for a run's data;
`sweep` samples `num` images at each step budget and scores them against every metric. Both
are used by the evaluation CLI (`python -m shortcut_jax.evaluate`), by the train loop's periodic
evaluation and by the notebooks. Sampling, decoding and feature extraction run fused on the
devices of a mesh (`on_device`: every process takes part, each adds its own features to float64
running moments, merged across the processes; only `pr_num` features are gathered); the scores
are computed on the host of process 0, which holds the reference.

Every score is printed next to its *floor* (two disjoint halves of the real reference set: what
real data scores) and *ceiling* (N(0, I) noise clipped to the image range), so a reading can be
placed between "as good as real data" and "nothing learned".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from shortcut_jax import atomic_files, latent_space, objectives, sampling, sharding
from shortcut_jax.evaluators import features, fid, on_device, registry
from shortcut_jax.evaluators.registry import EvaluationError

# Reference features beyond this many examples only refine the mean/covariance; precision and
# recall use at most this many from each side (their cost grows with the square).
DEFAULT_PR_NUM = 5_000
_SPLIT_SEED = 0
_NOISE_SEED = 1


@dataclasses.dataclass
class Metric:
    """A feature network with the reference it is scored against.

    Attributes:
      name: a metric name of `registry.METRICS`, e.g. 'fd_mnist' or 'fid'.
      net: the feature network.
      mu: (D,) reference mean.
      sigma: (D, D) reference covariance.
      reference: what the reference statistics were computed from (for reports).
      reference_features: (N, D) real features when known (needed for precision/recall and the
        floor); None when the statistics came from a file.
      floor: FD between two disjoint halves of the real reference features (None without them).
      ceiling: FD of clipped N(0, I) noise images against the reference.
    """

    name: str
    net: features.FeatureNet
    mu: np.ndarray
    sigma: np.ndarray
    reference: str
    reference_features: np.ndarray | None = None
    floor: float | None = None
    ceiling: float | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready: network, weights digest, feature dimension, reference, floor, ceiling."""
        return {
            "network": self.net.name,
            "weights_digest": self.net.weights_digest,
            "feature_dim": int(self.net.dim),
            "reference": self.reference,
            "floor": self.floor,
            "ceiling": self.ceiling,
        }


def metric_names(config: ml_collections.ConfigDict, requested: str | None = None) -> list[str]:
    """The metrics to compute for a run: `requested` (or config.eval_metrics) resolved.

    'auto' means every metric of `registry.METRICS` that 'auto' may pick and that can score this
    run: FD-MNIST for the embedded MNIST data, FID for images when the Inception weights file
    exists. An explicit list is returned as given, after checking the names.
    """
    requested = config.eval_metrics if requested is None else requested
    if requested != "auto":
        names = registry.split(requested)
        unknown = registry.unknown(names)
        if not names or unknown:
            raise EvaluationError(
                f"unknown metric(s) {unknown or requested!r}: use 'auto' or a comma-separated "
                f"list of {list(registry.names())}"
            )
        return names
    names = registry.auto_names(config)
    if not names:
        raise EvaluationError(registry.why_none_available(config))
    return names


def load_feature_net(config: ml_collections.ConfigDict, name: str) -> features.FeatureNet:
    """The feature network of metric `name` (its `registry.MetricSpec.load`).

    'fd_mnist' loads the classifier that ships with the package; 'fid' loads the converted
    Inception weights from config.eval_inception_path or the default path.
    """
    return registry.get(name).load(config)


def _cache_file(cache_dir: str | None, prefix: str, *key: Any) -> epath.Path | None:
    if not cache_dir:
        return None
    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return epath.Path(cache_dir) / f"{prefix}_{digest}.npz"


def _read_cache(cache: epath.Path, dim: int, max_num: int) -> tuple[np.ndarray, str]:
    """(features, description) stored in `cache`; ValueError saying what is wrong with it."""
    wanted = ("features", "description")
    try:
        with cache.open("rb") as f, np.load(f, allow_pickle=False) as stored:
            keys = sorted(stored.files)
            if set(wanted) <= set(keys):
                feats = np.asarray(stored["features"])
                description = str(stored["description"])
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"unreadable: {type(error).__name__}: {error}") from error
    if not set(wanted) <= set(keys):
        raise ValueError(f"it holds {keys}, not {list(wanted)}")
    if feats.ndim != 2 or feats.shape[1] != dim or not 2 <= len(feats) <= max_num:
        raise ValueError(f"features of shape {feats.shape}, expected (N <= {max_num}, {dim})")
    if not np.all(np.isfinite(feats)):
        raise ValueError("its features hold NaN or inf")
    return feats, description


def _cached_features(
    cache: epath.Path | None,
    compute: Callable[[], tuple[np.ndarray, str]],
    dim: int,
    max_num: int,
) -> tuple[np.ndarray, str]:
    """(features, description) from `cache` if it holds a valid entry, else computed and stored.

    A cache file that is empty, truncated or of the wrong shape is recomputed with a warning
    naming it: its content is a pure function of the key in its name, so recomputing restores
    exactly what belongs there, and failing would only ask the user to delete it by hand. Writes
    are atomic with a unique temporary name, so runs sharing a cache directory never collide.
    """
    if cache is not None and cache.is_file():
        try:
            return _read_cache(cache, dim, max_num)
        except ValueError as problem:
            logging.warning("Recomputing the feature cache %s (%s)", cache, problem)
    feats, description = compute()
    if cache is not None:
        atomic_files.write_npz(cache, features=feats, description=np.asarray(description))
    return feats, description


def reference_features(
    config: ml_collections.ConfigDict,
    net: features.FeatureNet,
    num: int,
    *,
    cache_dir: str | None = None,
) -> tuple[np.ndarray, str]:
    """Features of up to `num` real examples of the run's data (cached in `cache_dir`).

    Returns:
      features: (N, D) float32, N <= num (N = all there are when the data is smaller).
      description: e.g. '5000 real examples of mnist_embedded'.
    """
    from shortcut_jax import data

    if config.data.get("latent_dir"):  # the reference is the real *images*, not their latents
        config = config.copy_and_resolve_references()
        config.data.latent_dir = ""

    def compute() -> tuple[np.ndarray, str]:
        real = data.get_source(config).real_examples(num)["image"]
        if len(real) < 4:
            raise EvaluationError(
                f"the data gave {len(real)} real examples; the reference needs at least 4 "
                "(check config.data and config.eval_ref_num)"
            )
        name = config.data.name if config.data.name != "tfds" else config.data.tfds_name
        return features.compute_features(net, real), f"{len(real)} real examples of {name}"

    data_fields = {key: config.data.get(key) for key in sorted(config.data.keys())}
    cache = _cache_file(
        cache_dir, f"reference_{net.name}", net.name, net.weights_digest, num, data_fields
    )
    return _cached_features(cache, compute, net.dim, num)


def noise_features(
    net: features.FeatureNet,
    num: int,
    shape: Sequence[int],
    *,
    cache_dir: str | None = None,
) -> np.ndarray:
    """Features of `noise_images(num, shape)` (cached in `cache_dir`): the ceiling's samples."""

    def compute() -> tuple[np.ndarray, str]:
        images = noise_images(num, shape)
        return features.compute_features(net, images), f"{num} noise images {tuple(shape)}"

    cache = _cache_file(
        cache_dir, f"noise_{net.name}", net.name, net.weights_digest, num, list(shape), _NOISE_SEED
    )
    return _cached_features(cache, compute, net.dim, num)[0]


def floor_from_features(real_features: np.ndarray) -> float:
    """FD between two disjoint random halves of the real features: the best possible reading."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(real_features))
    half = len(order) // 2
    return fid.frechet_distance_of_features(
        real_features[order[:half]], real_features[order[half : 2 * half]]
    )


def noise_images(num: int, shape: Sequence[int], seed: int = _NOISE_SEED) -> np.ndarray:
    """`num` images of N(0, I) noise clipped to [-1, 1]: what an untrained sampler returns."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.standard_normal((num, *shape)), -1.0, 1.0).astype(np.float32)


def build_metrics(
    config: ml_collections.ConfigDict,
    *,
    names: Sequence[str] | None = None,
    cache_dir: str | None = None,
    ref_stats: str | None = None,
    ceiling_num: int | None = None,
    is_chief: bool = True,
) -> list[Metric]:
    """Feature networks and reference statistics for the run described by `config`.

    Args:
      config: the run's config (reads data.*, eval_ref_num, eval_ref_stats, eval_inception_path).
      names: metric names; default `metric_names(config)`.
      cache_dir: where reference features are cached (e.g. WORKDIR/eval); None = no cache.
      ref_stats: reference statistics file (.npz with mu and sigma) for the metrics whose
        registry entry takes one (FID); default config.eval_ref_stats; '' = computed from
        config.eval_ref_num real examples.
      ceiling_num: noise images behind the ceiling; default config.eval_ceiling_num.
      is_chief: only the chief (process 0) computes references; other processes get metrics
        with the network only (they take part in sampling and feature extraction).

    Returns:
      One `Metric` per name.
    """
    names = list(metric_names(config) if names is None else names)
    if ceiling_num is None:
        ceiling_num = int(config.get("eval_ceiling_num", 1_000))
    ref_stats = config.get("eval_ref_stats", "") if ref_stats is None else ref_stats
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    metrics = []
    for name in names:
        spec = registry.get(name)
        problem = spec.data_problem(config)
        if problem:
            raise EvaluationError(f"metric {name!r} cannot score this run: {problem}")
        net = spec.load(config)
        if jax.process_count() > 1:  # every process must use the chief's exact weights
            from jax.experimental import multihost_utils

            net = dataclasses.replace(net, params=multihost_utils.broadcast_one_to_all(net.params))
        empty = np.zeros((net.dim,)), np.zeros((net.dim, net.dim))
        if not is_chief:
            metrics.append(Metric(name, net, *empty, reference="(on process 0)"))
            continue
        if spec.uses_ref_stats and ref_stats:
            try:
                mu, sigma = fid.load_statistics(ref_stats)
            except (FileNotFoundError, ValueError) as error:
                raise EvaluationError(f"{spec.label} reference statistics: {error}") from error
            if mu.shape != (net.dim,):
                raise EvaluationError(
                    f"{ref_stats}: mu has shape {mu.shape} but the {net.name} features have "
                    f"dimension {net.dim}; use statistics of the same network"
                )
            metric = Metric(name, net, mu, sigma, reference=str(ref_stats))
        else:
            real, description = reference_features(
                config, net, int(config.eval_ref_num), cache_dir=cache_dir
            )
            mu, sigma = fid.feature_statistics(real)
            metric = Metric(name, net, mu, sigma, description, real, floor_from_features(real))
        noise = noise_features(net, ceiling_num, shape, cache_dir=cache_dir)
        metric.ceiling = fid.frechet_distance(*fid.feature_statistics(noise), mu, sigma)
        metrics.append(metric)
    return metrics


def score(
    metric: Metric, sample_features: np.ndarray, pr_num: int = DEFAULT_PR_NUM
) -> dict[str, float]:
    """FD of sample features against the metric's reference, with precision/recall if possible.

    Args:
      metric: a chief's `Metric` (with reference statistics).
      sample_features: (N, D) features of the samples.
      pr_num: at most this many features of each side enter precision/recall (0 = skip them).

    Returns:
      {name: FD} plus {name/precision, name/recall} when the reference features are known.
    """
    sample_features = np.asarray(sample_features)
    running = fid.RunningStatistics(sample_features.shape[-1])
    running.add(sample_features)
    return score_statistics(metric, running, sample_features[:pr_num], pr_num)


def score_statistics(
    metric: Metric,
    statistics: fid.RunningStatistics,
    first_features: np.ndarray,
    pr_num: int = DEFAULT_PR_NUM,
) -> dict[str, float]:
    """FD of streamed sample statistics against the reference, with precision/recall if possible.

    Args:
      metric: a chief's `Metric` (with reference statistics).
      statistics: the running moments of all the samples' features.
      first_features: (M, D) features of the first samples (M >= pr_num, or all there are).
      pr_num: at most this many features of each side enter precision/recall (0 = skip them).

    Returns:
      {name: FD} plus {name/precision, name/recall} when the reference features are known.
    """
    mu, sigma = statistics.statistics()
    result = {metric.name: fid.frechet_distance(mu, sigma, metric.mu, metric.sigma)}
    real = metric.reference_features
    if pr_num > 0 and real is not None:
        precision, recall = fid.precision_recall(real[:pr_num], first_features[:pr_num], k=3)
        result[f"{metric.name}/precision"] = precision
        result[f"{metric.name}/recall"] = recall
    return result


def _decode_batch_size(config: ml_collections.ConfigDict) -> int | None:
    """config.vae.decode_batch_size for runs with a VAE (None = the whole chunk at once)."""
    if not latent_space.uses_vae(config):
        return None
    return int(config.vae.get("decode_batch_size", 0)) or None


def uses_guidance(cfg_scale: float, num_classes: int) -> bool:
    """Whether sampling evaluates the null class too (one extra function evaluation a step)."""
    return num_classes > 0 and cfg_scale != 1.0


def sweep(
    config: ml_collections.ConfigDict,
    params: Any,
    metrics: Sequence[Metric],
    *,
    steps: Sequence[int],
    num: int,
    cfg_scale: float | None,
    seed: int = 0,
    batch_size: int = 256,
    mesh: jax.sharding.Mesh | None = None,
    pr_num: int = DEFAULT_PR_NUM,
    is_chief: bool = True,
    progress: Callable[[int], None] | None = None,
    keep_samples: int = 0,
    apply_fn: sampling.ApplyFn | None = None,
    decoder: latent_space.PixelDecoder | None = None,
) -> tuple[list[dict[str, float]], dict[int, np.ndarray]]:
    """Samples `num` images at each step budget and scores them with every metric.

    The same noise and labels (0..num_classes-1 cycled) are used at every budget, so the rows
    differ only by the number of steps.

    Args:
      config: the run's config (model, data, denoise_timesteps).
      params: model parameters (EMA or raw), placed for `mesh` if given.
      metrics: from `build_metrics`.
      steps: step budgets, each in [1, config.denoise_timesteps].
      num: samples per budget (>= 2).
      cfg_scale: guidance scale (1 = none), used at every budget; None = the run's policy
        (`latent_space.guidance_scale`: config.sample_cfg_scale where config.sample_guidance
        applies it, 1 elsewhere).
      seed: sampling seed.
      batch_size: samples per device program (sampling, decoding and the features of every
        metric in one call, `on_device.sample_statistics`).
      mesh: the mesh to sample and extract features on (every process must call this).
      pr_num: features per side for precision/recall (0 = skip).
      is_chief: whether this process computes the scores (only the chief holds references).
      progress: called after each chunk with its images counted once for the sampling and once
        per metric (num * (1 + len(metrics)) per budget in all).
      keep_samples: return the first this many samples of each budget (for grids).
      apply_fn: the model's ``apply_fn`` (`steps.make_apply_fn`); pass the same one (and the
        same decoder) on every call so the compiled programs are reused; default: built from
        `config`.
      decoder: the `latent_space.PixelDecoder` turning samples into pixel images in [-1, 1] (VAE
        decode for latent runs); default: built from `config` (loads its VAE, if any).

    Returns:
      rows: one dict per budget: steps, nfe, cfg, seconds (sampling, decoding and features),
        then the scores (chief only).
      samples: {steps: (keep_samples, H, W, C)} when keep_samples > 0.
    """
    from shortcut_jax import models
    from shortcut_jax import steps as train_steps

    if num < 2:
        raise EvaluationError(f"num must be >= 2 samples per budget, got {num}")
    bad = [s for s in steps if not 1 <= int(s) <= config.denoise_timesteps]
    if bad:
        raise EvaluationError(
            f"step budgets {bad} are outside [1, {config.denoise_timesteps}] (denoise_timesteps)"
        )
    num_classes = int(config.data.num_classes)
    if apply_fn is None:
        apply_fn = train_steps.make_apply_fn(models.get_model(config))
    if decoder is None:
        decoder = latent_space.PixelDecoder.for_config(config, mesh, batch_size)
    if not isinstance(decoder, latent_space.PixelDecoder):
        raise TypeError(
            f"decoder must be a latent_space.PixelDecoder (its device_fn runs inside the fused "
            f"evaluation), got {type(decoder).__name__}; build one with PixelDecoder.for_config"
        )
    shape = latent_space.model_shape(config)
    objective = objectives.ObjectiveConfig.from_config(config)  # its own sampler
    rows, kept = [], {}
    for num_steps in steps:
        scale = latent_space.guidance_scale(config, int(num_steps), cfg_scale)
        guided = uses_guidance(scale, num_classes)
        start = time.perf_counter()
        sampled = on_device.sample_statistics(
            apply_fn,
            params,
            [metric.net for metric in metrics],
            seed=seed,
            num=num,
            shape=shape,
            num_steps=int(num_steps),
            denoise_timesteps=config.denoise_timesteps,
            cfg_scale=scale,
            num_classes=num_classes,
            objective=objective,
            decoder=decoder,
            batch_size=batch_size,
            mesh=mesh,
            keep_samples=keep_samples,
            keep_features=pr_num,
            progress=progress,
            sharding_rules=sharding.logical_rules(config),
            decode_batch_size=_decode_batch_size(config),
        )
        row: dict[str, float] = {
            "steps": int(num_steps),
            "nfe": int(num_steps) * (2 if guided else 1),
            "cfg": scale,
            "seconds": time.perf_counter() - start,
        }
        if keep_samples:
            kept[int(num_steps)] = sampled.images
        if is_chief:
            for metric, stats, first in zip(
                metrics, sampled.statistics, sampled.features, strict=True
            ):
                row.update(score_statistics(metric, stats, first, pr_num))
        rows.append(row)
        logging.info("Scored %d samples at %d step(s): %s", num, num_steps, row)
    return rows, kept
