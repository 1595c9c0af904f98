"""Sampling, pixels and features of an evaluation fused into one device program per chunk.

For each chunk of `batch_size` examples one jitted program (sharded over the mesh's batch axes
when a mesh is given) draws the chunk's noise on the device (`sampling.noise_at`: the numbers of
`sampling.example_noise`), runs the sampler, decodes to pixels (`latent_space.PixelDecoder`, in
passes of `decode_batch_size` images per device so the decoder's activations stay bounded),
counts the non-finite pixel and feature values, quantizes to 8 bits (`features.quantize`) and
applies every feature network. Only the (chunk, D) features and the counts leave the device.

`sample_statistics` turns them into float64 running moments (`fid.RunningStatistics`) as the
chunks arrive: each process adds the rows its own devices computed and the moments of the
processes are merged once at the end, so neither host memory nor cross-host traffic grows with
the sample count (only the first `keep_features` features are gathered, for precision/recall).

The result equals the composition ``sampling.sample_batch`` -> decoder ->
``features.compute_features`` for the same seed (up to float32 round-off of the fused program).
On a mesh the sampler runs inside `sharding.activation_context`, so the model's activations stay
split over the batch axes (as in the train step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax import latent_space, objectives, preemption, sampling, sharding
from shortcut_jax.evaluators import features, fid


def _evaluate_chunk(
    params: Any,
    pixel_params: Any,
    net_params: tuple[Any, ...],
    rng: jax.Array,
    start: jax.Array,
    num: jax.Array,
    *,
    apply_fn: sampling.ApplyFn,
    sample_settings: tuple[tuple[str, Any], ...],
    shape: tuple[int, ...],
    chunk: int,
    num_classes: int,
    pixels: latent_space.PixelFn,
    feature_fns: tuple[features.FeatureFn, ...],
    feature_passes: tuple[int, ...],
    keep: bool,
    batch: jax.sharding.NamedSharding | None,
    rules: tuple[tuple[str, Any], ...] | None = None,
    decode_passes: int = 1,
) -> tuple[Any, ...]:
    """Examples start .. start + chunk - 1 of `num`: features of every net and non-finite counts.

    The decoder runs over the chunk in `decode_passes` sequential slices (`_in_passes`), so its
    activations are those of chunk / decode_passes images, not of the whole chunk.

    Returns:
      (features, counts) or, with `keep`, (features, counts, images): a tuple of (chunk, D_k)
      float32 features, (2 + K,) int32 [non-finite pixel values, images holding one, non-finite
      feature values of each of the K nets] over the examples below `num`, and the
      (chunk, H, W, C) pixel images. Rows from `num` on are padding.
    """
    indices = start.astype(jnp.uint32) + jnp.arange(chunk, dtype=jnp.uint32)
    if batch is not None:
        indices = jax.lax.with_sharding_constraint(indices, batch)
    noise = sampling.noise_at(rng, indices, shape)
    if num_classes > 0:  # `sampling.default_labels`
        labels = (indices % num_classes).astype(jnp.int32)
    else:
        labels = jnp.zeros((chunk,), jnp.int32)
    with sharding.activation_context(None if batch is None else batch.mesh, rules):
        samples = sampling.sample(apply_fn, params, noise, labels, **dict(sample_settings))
    images = _in_passes(pixels, pixel_params, samples, decode_passes)
    valid = indices < num.astype(jnp.uint32)
    not_finite = ~jnp.isfinite(images).reshape(chunk, -1) & valid[:, None]
    quantized = features.quantize(images)
    feats = tuple(
        _in_passes(fn, p, quantized, passes).astype(jnp.float32)
        for fn, p, passes in zip(feature_fns, net_params, feature_passes, strict=True)
    )
    bad_features = [jnp.sum(~jnp.isfinite(f) & valid[:, None], dtype=jnp.int32) for f in feats]
    counts = jnp.stack(
        [
            jnp.sum(not_finite, dtype=jnp.int32),
            jnp.sum(not_finite.any(axis=1), dtype=jnp.int32),
            *bad_features,
        ]
    )
    return (feats, counts, images) if keep else (feats, counts)


def _in_passes(fn: features.FeatureFn, params: Any, images: jax.Array, passes: int) -> jax.Array:
    """fn(params, images) computed over `passes` sequential slices (`lax.map`) to bound memory.

    Slice k holds rows k, k + passes, k + 2 * passes, ...: viewed as (chunk / passes, passes),
    the batch axis keeps its sharding over the leading axis, so no rows move between devices.
    """
    if passes <= 1:
        return fn(params, images)
    rows = images.shape[0]
    grouped = images.reshape((rows // passes, passes) + images.shape[1:]).swapaxes(0, 1)
    out = jax.lax.map(lambda block: fn(params, block), grouped)
    return out.swapaxes(0, 1).reshape((rows,) + out.shape[2:])


def feature_passes(chunk: int, shards: int, per_device_batch: int) -> int:
    """Passes of a feature net over a chunk: the fewest that keep each at most
    `per_device_batch` images per device (`FeatureNet.batch_size`), dividing chunk / shards."""
    per_device = chunk // shards
    least = -(-per_device // max(int(per_device_batch), 1))
    return next(n for n in range(least, per_device + 1) if per_device % n == 0)


@functools.lru_cache(maxsize=32)
def _program(
    static: tuple[tuple[str, Any], ...],
    mesh: jax.sharding.Mesh | None,
    param_treedef: Any,
    param_shardings: tuple[jax.sharding.Sharding, ...] | None,
) -> Callable[..., tuple[Any, ...]]:
    """`_evaluate_chunk` jitted once per (settings, mesh, parameter layout)."""
    settings = dict(static)
    if mesh is None:
        return jax.jit(functools.partial(_evaluate_chunk, batch=None, **settings))
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    outputs = (tuple(batch for _ in settings["feature_fns"]), replicated)
    return jax.jit(
        functools.partial(_evaluate_chunk, batch=batch, **settings),
        in_shardings=(
            jax.tree.unflatten(param_treedef, param_shardings),
            replicated,
            replicated,
            replicated,
            replicated,
            replicated,
        ),
        out_shardings=(*outputs, batch) if settings["keep"] else outputs,
    )


def _global(mesh: jax.sharding.Mesh | None, value: np.ndarray) -> Any:
    """A small host value every process holds, replicated over the mesh (as given without one)."""
    if mesh is None:
        return value
    return jax.make_array_from_callback(
        value.shape, sharding.replicated(mesh), lambda index: value[index]
    )


def _pixel_shape(pixels: latent_space.PixelFn, pixel_params: Any, shape: Any) -> tuple[int, ...]:
    """Per-example shape of the decoder's output for samples of per-example `shape`."""
    samples = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return tuple(jax.eval_shape(pixels, pixel_params, samples).shape[1:])


def chunk_program(
    apply_fn: sampling.ApplyFn,
    params: Any,
    nets: Sequence[features.FeatureNet],
    *,
    sampler_settings: dict[str, Any],
    shape: tuple[int, ...],
    chunk: int,
    pixels: latent_space.PixelFn,
    mesh: jax.sharding.Mesh | None,
    sharding_rules: Sequence[Sequence[Any]] | None = None,
    keep: bool = False,
    decode_batch_size: int | None = None,
) -> Callable[..., tuple[Any, ...]]:
    """The jitted program that evaluates one chunk, as `sample_features` runs it.

    ``program(params, pixel_params, net_params, rng, start, num)`` -> (features, counts) (and the
    images with `keep`); `params` (real or abstract) only give their shardings here, so
    `shortcut_jax.aot` compiles the same program ahead of time.

    Args:
      sampler_settings: num_steps, denoise_timesteps, cfg_scale, num_classes, objective.
      shape: per-example sample shape. chunk: examples per call (a multiple of the shards).
      pixels: the decoder's pure function (`PixelDecoder.device_fn`).
      decode_batch_size: images per device per decoder pass (`config.vae.decode_batch_size`);
        None or 0 = the whole chunk in one pass.
    """
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    static = dict(
        apply_fn=apply_fn,
        sample_settings=tuple(sorted(sampler_settings.items())),
        shape=tuple(int(s) for s in shape),
        chunk=int(chunk),
        num_classes=int(sampler_settings["num_classes"]),
        pixels=pixels,
        feature_fns=tuple(net.apply for net in nets),
        feature_passes=tuple(feature_passes(chunk, shards, net.batch_size) for net in nets),
        decode_passes=feature_passes(chunk, shards, decode_batch_size) if decode_batch_size else 1,
        rules=None if sharding_rules is None else sharding.with_activation_defaults(sharding_rules),
        keep=bool(keep),
    )
    treedef, param_shardings = None, None
    if mesh is not None:
        param_shardings, treedef = jax.tree.flatten(jax.tree.map(lambda p: p.sharding, params))
        param_shardings = tuple(param_shardings)
    return _program(tuple(sorted(static.items())), mesh, treedef, param_shardings)


@dataclasses.dataclass
class SampleStatistics:
    """What `sample_statistics` returns; every process holds all of it.

    Attributes:
      statistics: per net, the running mean and covariance of the features of all `num`
        samples (summed over the chunks and over the processes).
      features: per net, the (min(keep_features, num), D) float32 features of the first samples.
      images: (min(keep_samples, num), H, W, C) float32 pixel images of the first samples.
    """

    statistics: list[fid.RunningStatistics]
    features: list[np.ndarray]
    images: np.ndarray


def _local_rows(array: jax.Array, start: int, num: int) -> np.ndarray:
    """The rows of a chunk's batch-sharded (chunk, D) array held by this process, below `num`.

    One copy of each row (replica 0 of every shard), so the rows of all processes together are
    the chunk's rows start .. num - 1, each exactly once; nothing crosses the process boundary.
    """
    parts = []
    for shard in sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0):
        if shard.replica_id != 0:
            continue
        first = start + (shard.index[0].start or 0)
        data = np.asarray(shard.data)
        parts.append(data[: max(0, min(len(data), num - first))])
    return np.concatenate(parts) if parts else np.zeros((0, array.shape[1]), np.float32)


def merge_across_processes(
    statistics: Sequence[fid.RunningStatistics],
) -> list[fid.RunningStatistics]:
    """Each accumulator merged over every process (in process order); a no-op in one process.

    The float64 moments travel bit-exact as uint32 words (`process_allgather` would round
    float64 to float32 without jax_enable_x64). Every process must call this together.
    """
    if jax.process_count() == 1:
        return list(statistics)
    from jax.experimental import multihost_utils

    merged = []
    for local in statistics:
        words = local.to_array().view(np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(words))  # (processes, words)
        total = fid.RunningStatistics(local.dim)
        for row in gathered:
            total.merge(
                fid.RunningStatistics.from_array(np.ascontiguousarray(row).view(np.float64))
            )
        merged.append(total)
    return merged


def sample_statistics(
    apply_fn: sampling.ApplyFn,
    params: Any,
    nets: Sequence[features.FeatureNet],
    *,
    seed: int,
    num: int,
    shape: tuple[int, ...],
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float = 1.0,
    num_classes: int = 0,
    objective: objectives.ObjectiveConfig | None = None,
    decoder: latent_space.PixelDecoder | None = None,
    batch_size: int = 256,
    mesh: jax.sharding.Mesh | None = None,
    keep_samples: int = 0,
    keep_features: int = 0,
    progress: Callable[[int], None] | None = None,
    sharding_rules: Sequence[Sequence[Any]] | None = None,
    decode_batch_size: int | None = None,
) -> SampleStatistics:
    """Feature statistics of `num` samples, sampled, decoded and featurized on the device.

    Example i starts from the noise of fold_in(PRNGKey(seed), i) with label i % num_classes (0
    when unconditional), as `sampling.sample_batch` with default labels draws it. Host memory
    is bounded whatever `num` is: each process adds the feature rows its own devices computed to
    float64 running moments (`fid.RunningStatistics`), and the moments of the processes are
    merged at the end; only the first `keep_features` features (for precision/recall) and
    `keep_samples` images are gathered.

    Args:
      apply_fn: ``apply_fn(params, x, t, d, labels) -> output``; pass the same one on every call
        so the compiled programs are reused.
      params: model parameters, placed for `mesh` if given.
      nets: the feature networks (may be empty: then only the samples are checked and kept).
      seed: sampling seed.
      num: number of samples (>= 1).
      shape: per-example shape as the model sees it (`latent_space.model_shape`).
      num_steps: number of steps, in [1, denoise_timesteps].
      denoise_timesteps: power of two.
      cfg_scale: guidance scale (1.0 = none).
      num_classes: 0 = unconditional.
      objective: the run's `objectives.ObjectiveConfig` (its sampler); None = Euler steps.
      decoder: samples -> pixels in [-1, 1] (`latent_space.PixelDecoder`); None = clip only.
      batch_size: examples per program call (rounded up to a multiple of the batch shards);
        each net runs over a chunk in passes of at most its own `batch_size` per device.
      mesh: when given (it may span processes), each chunk is split over the mesh's batch axes;
        every process must call this together.
      keep_samples: also return the pixel images of the first this many examples.
      keep_features: also return the features of the first this many examples.
      progress: called after each chunk with the chunk's examples times (1 + len(nets)), one
        count for the sampling and one per network, as the separate passes reported them.
      sharding_rules: with a mesh, the logical axis rules of the model's activations
        (`sharding.logical_rules(config)`); None = `sharding.ACTIVATION_RULES`.
      decode_batch_size: images per device per VAE-decode pass (`config.vae.decode_batch_size`);
        None or 0 = the whole chunk at once.

    Raises:
      NonFiniteImagesError: a decoded image holds NaN or inf (the counts cover all `num`).
      FloatingPointError: a network's features hold NaN or inf.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if decode_batch_size is not None and decode_batch_size < 0:
        raise ValueError(f"decode_batch_size must be >= 0, got {decode_batch_size!r}")
    sampler_settings = {
        "num_steps": int(num_steps),
        "denoise_timesteps": int(denoise_timesteps),
        "cfg_scale": float(cfg_scale),
        "num_classes": int(num_classes),
        "objective": objective,
    }
    sampling.make_sampler(apply_fn, **sampler_settings)  # validates the settings eagerly
    shape = tuple(int(s) for s in shape)
    nets = tuple(nets)
    decoder = decoder if decoder is not None else latent_space.PixelDecoder(None)
    pixels, pixel_params = decoder.device_fn()
    pixel_shape = _pixel_shape(pixels, pixel_params, shape)
    if nets and (len(pixel_shape) != 3 or pixel_shape[-1] not in (1, 3)):
        raise ValueError(
            f"the feature networks need (H, W, C) images with C in (1, 3); samples of shape "
            f"{shape} decode to {pixel_shape}: score an image run, or check config.vae"
        )
    chunk = sharding.round_up_to_shards(min(int(batch_size), num), mesh)
    keep_samples = min(max(int(keep_samples), 0), num)
    keep_features = min(max(int(keep_features), 0), num)
    programs = {
        keep: chunk_program(
            apply_fn,
            params,
            nets,
            sampler_settings=sampler_settings,
            shape=shape,
            chunk=chunk,
            pixels=pixels,
            mesh=mesh,
            sharding_rules=sharding_rules,
            keep=keep,
            decode_batch_size=decode_batch_size if pixel_params is not None else None,
        )
        for keep in (False, True)
    }
    placement = None if mesh is None else sharding.replicated(mesh)
    net_params = tuple(jax.device_put(net.params, placement) for net in nets)
    rng = _global(mesh, np.asarray(jax.random.PRNGKey(seed)))
    total = _global(mesh, np.asarray(num, np.int32))

    running = [fid.RunningStatistics(net.dim) for net in nets]
    firsts: list[list[np.ndarray]] = [[] for _ in nets]
    kept: list[np.ndarray] = []
    bad = np.zeros((2 + len(nets),), np.int64)

    def collect(start: int, result: tuple[Any, ...]) -> None:
        nonlocal bad
        preemption.wait_until_ready(result)
        valid = min(chunk, num - start)
        bad = bad + sharding.to_host(result[1])
        for stats, first, feats in zip(running, firsts, result[0], strict=True):
            stats.add(_local_rows(feats, start, num))
            if start < keep_features:
                first.append(sharding.gather(feats)[: min(valid, keep_features - start)])
        if len(result) > 2:
            kept.append(sharding.gather(result[2])[: min(valid, keep_samples - start)])
        if progress is not None:
            progress(valid * (1 + len(nets)))

    pending = None  # the previous chunk's result, fetched after the next chunk is dispatched
    for start in range(0, num, chunk):
        program = programs[start < keep_samples]
        result = program(
            params, pixel_params, net_params, rng, _global(mesh, np.asarray(start, np.int32)), total
        )
        if pending is not None:
            collect(*pending)
        pending = (start, result)
    collect(*pending)

    if bad[0]:
        raise features.NonFiniteImagesError(
            features.non_finite_message(
                "the sampled images", int(bad[0]), num * math.prod(pixel_shape), int(bad[1]), num
            )
        )
    for net, count in zip(nets, bad[2:], strict=True):
        if count:
            raise FloatingPointError(
                f"the {net.name} features contain NaN or inf; the images or the weights are broken"
            )
    images = np.concatenate(kept) if kept else np.zeros((0, *pixel_shape), np.float32)
    return SampleStatistics(
        statistics=merge_across_processes(running),
        features=[
            np.concatenate(first) if first else np.zeros((0, net.dim), np.float32)
            for net, first in zip(nets, firsts, strict=True)
        ],
        images=images,
    )


def sample_features(
    apply_fn: sampling.ApplyFn,
    params: Any,
    nets: Sequence[features.FeatureNet],
    *,
    num: int,
    keep_samples: int = 0,
    **settings: Any,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Features of all `num` samples under every net (`sample_statistics` keeping them all).

    Holds num x D features per net on the host: for scores use `sample_statistics`, whose
    memory does not grow with `num`. The other arguments are those of `sample_statistics`.

    Returns:
      features: one (num, D) float32 host array per net.
      kept: (min(keep_samples, num), H, W, C) float32 pixel images (empty without keep_samples).
    """
    result = sample_statistics(
        apply_fn, params, nets, num=num, keep_samples=keep_samples, keep_features=num, **settings
    )
    return result.features, result.images
