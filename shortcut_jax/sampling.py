"""Pure sampler for shortcut models: any step count, classifier-free guidance, `lax.fori_loop`.

Sampling integrates dx/dt = s(x, t, d, y) from noise (t = 0) to data (t = 1) with Euler steps
x <- x + d * s(x, t, d_level, y). With M = 2**k steps every step has size d = 1/M and level k. Any
other count N in [1, denoise_timesteps] is split into power-of-two shortcut steps (see
`step_schedule`), so every step is one the network was trained on.

The model is passed as ``apply_fn(params, x, t, d_level, labels) -> velocity`` with
x: (B, ...) any trailing shape, t: (B,) float32, d_level: (B,) int32, labels: (B,) int32; the
output has x's shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax import sharding

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _check_denoise_timesteps(denoise_timesteps: int) -> int:
    """Returns log2(denoise_timesteps) or raises a ValueError naming the argument."""
    if (
        isinstance(denoise_timesteps, bool)
        or not isinstance(denoise_timesteps, (int, np.integer))
        or denoise_timesteps < 1
        or (int(denoise_timesteps) & (int(denoise_timesteps) - 1)) != 0
    ):
        raise ValueError(
            f"denoise_timesteps must be a power of two >= 1 (1, 2, 4, ..., 128, ...), "
            f"got {denoise_timesteps!r}"
        )
    return int(denoise_timesteps).bit_length() - 1


def step_schedule(
    num_steps: int, denoise_timesteps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Euler steps used to sample with `num_steps` network evaluations.

    Powers of two give uniform steps: d = 1/N at level log2(N), t = 0, 1/N, 2/N, ... Any other count
    is built by starting from one step of size 1 and repeatedly halving a largest step until there
    are N steps, larger steps first. For 2**k < N < 2**(k+1) that is 2**(k+1) - N steps of size
    2**-k followed by 2 (N - 2**k) steps of size 2**-(k+1); e.g. 3 -> (1/2, 1/4, 1/4) and
    5 -> (1/4, 1/4, 1/4, 1/8, 1/8). All sizes and start times are dyadic, so they are exact in
    float32 and the sizes sum to exactly 1.

    Args:
      num_steps: N, the number of steps, in [1, denoise_timesteps].
      denoise_timesteps: T, a power of two; the smallest step is 1/T (level log2 T).

    Returns:
      t_start: (N,) float32, start time of each step (running sum of the sizes, starting at 0).
      step_size: (N,) float32, d = 2**-d_level.
      d_level: (N,) int32 in [0, log2 T].

    Raises:
      ValueError: if denoise_timesteps is not a power of two or num_steps is outside [1, T].
    """
    _check_denoise_timesteps(denoise_timesteps)
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, (int, np.integer))
        or not 1 <= num_steps <= denoise_timesteps
    ):
        raise ValueError(
            f"num_steps must be an integer in [1, denoise_timesteps={denoise_timesteps}], "
            f"got {num_steps!r}"
        )
    num_steps = int(num_steps)
    coarse_level = num_steps.bit_length() - 1  # k with 2**k <= N < 2**(k+1)
    num_split = num_steps - (1 << coarse_level)  # coarse steps halved beyond 2**k
    num_coarse = (1 << coarse_level) - num_split
    d_level = np.array(
        [coarse_level] * num_coarse + [coarse_level + 1] * (2 * num_split), dtype=np.int32
    )
    step_size = np.exp2(-d_level.astype(np.float64))
    t_start = np.concatenate([[0.0], np.cumsum(step_size)[:-1]])
    return t_start.astype(np.float32), step_size.astype(np.float32), d_level


def _velocity(
    apply_fn: ApplyFn,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    d_level: jax.Array,
    labels: jax.Array,
    cfg_scale: float,
    num_classes: int,
) -> jax.Array:
    """Model velocity, with classifier-free guidance in one batched call when it applies.

    x: (B, ...), t: (B,) float32, d_level: (B,) int32, labels: (B,) int32. Returns (B, ...).
    """
    if cfg_scale == 1.0 or num_classes <= 0:
        return apply_fn(params, x, t, d_level, labels)
    batch = x.shape[0]
    null_labels = jnp.full_like(labels, num_classes)
    velocity = apply_fn(
        params,
        jnp.concatenate([x, x], axis=0),
        jnp.concatenate([t, t], axis=0),
        jnp.concatenate([d_level, d_level], axis=0),
        jnp.concatenate([labels, null_labels], axis=0),
    )
    v_cond, v_null = velocity[:batch], velocity[batch:]
    return v_null + cfg_scale * (v_cond - v_null)


def sample(
    apply_fn: ApplyFn,
    params: Any,
    noise: jax.Array,
    labels: jax.Array,
    *,
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float = 1.0,
    num_classes: int = 0,
) -> jax.Array:
    """Integrates from noise (t = 0) to data (t = 1) with `num_steps` shortcut Euler steps.

    Pure and jit-compatible (`num_steps`, `denoise_timesteps`, `cfg_scale` and `num_classes` must be
    static). Each step is x <- x + d * v(x, t, d_level, y) over `step_schedule`. With
    ``cfg_scale != 1`` and ``num_classes > 0`` the conditional and null-class (label num_classes)
    velocities come from one call on a 2B batch and are mixed as
    v = v_null + cfg_scale * (v_cond - v_null); otherwise the model is called once on B examples.

    Args:
      apply_fn: ``apply_fn(params, x, t, d_level, labels) -> velocity`` (see module docstring).
      params: the model parameters (any pytree), passed through to apply_fn.
      noise: (B, ...) x0 ~ N(0, I), any trailing shape ((B, H, W, C) images, (B, D) points).
      labels: (B,) int32 class labels in [0, num_classes] (num_classes = null class; all 0 when
        unconditional).
      num_steps: number of steps (network evaluations without CFG), in [1, denoise_timesteps].
      denoise_timesteps: power of two; the smallest step is 1/denoise_timesteps.
      cfg_scale: guidance scale w; 1.0 means no guidance.
      num_classes: number of classes; 0 = unconditional (no guidance possible).

    Returns:
      x1: (B, ...) samples with noise's shape and dtype.
    """
    t_start, step_size, d_level = step_schedule(num_steps, denoise_timesteps)
    if noise.ndim < 1:
        raise ValueError(f"noise must have a batch axis, got shape {noise.shape}")
    batch = noise.shape[0]
    labels = jnp.asarray(labels, dtype=jnp.int32)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape (B,) = ({batch},), got {labels.shape}")
    t_start = jnp.asarray(t_start)
    d_level = jnp.asarray(d_level)
    step_size = jnp.asarray(step_size)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.full((batch,), t_start[i], dtype=jnp.float32)
        level = jnp.full((batch,), d_level[i], dtype=jnp.int32)
        velocity = _velocity(apply_fn, params, x, t, level, labels, cfg_scale, num_classes)
        return (x + step_size[i] * velocity).astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, body, noise)


@functools.partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("num_steps", "denoise_timesteps", "cfg_scale", "num_classes"),
)
def _jitted_sample(
    apply_fn: ApplyFn,
    params: Any,
    noise: jax.Array,
    labels: jax.Array,
    *,
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float,
    num_classes: int,
) -> jax.Array:
    """`sample` under jit; compiled once per (apply_fn, settings, input shapes)."""
    return sample(
        apply_fn,
        params,
        noise,
        labels,
        num_steps=num_steps,
        denoise_timesteps=denoise_timesteps,
        cfg_scale=cfg_scale,
        num_classes=num_classes,
    )


@functools.lru_cache(maxsize=32)
def _sharded_sampler(
    apply_fn: ApplyFn,
    settings: tuple[tuple[str, Any], ...],
    mesh: jax.sharding.Mesh,
    param_treedef: Any,
    param_shardings: tuple[jax.sharding.Sharding, ...],
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """`sample` jitted with explicit shardings: params as they are, noise/labels/output by batch."""
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        functools.partial(sample, apply_fn, **dict(settings)),
        in_shardings=(jax.tree.unflatten(param_treedef, param_shardings), batch, batch),
        out_shardings=batch,
    )


def make_sampler(
    apply_fn: ApplyFn,
    *,
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float = 1.0,
    num_classes: int = 0,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """A jitted ``sampler(params, noise, labels) -> x1`` for fixed settings.

    The settings are validated here (a bad `num_steps` fails before any compile). The settings and
    `apply_fn` are static arguments of one shared jitted function, so two samplers built from the
    same (hashable, equal) apply_fn and settings reuse the compiled program; a fresh closure or
    `functools.partial` per call compiles again, so build the sampler once and keep it. An
    unhashable apply_fn gets its own jitted function (compiled once per sampler).

    Args:
      apply_fn: ``apply_fn(params, x, t, d_level, labels) -> velocity``.
      num_steps: number of steps, in [1, denoise_timesteps].
      denoise_timesteps: power of two.
      cfg_scale: guidance scale (1.0 = none).
      num_classes: 0 = unconditional; otherwise label num_classes is the null class.

    Returns:
      sampler(params, noise: (B, ...), labels: (B,) int32) -> (B, ...).
    """
    step_schedule(num_steps, denoise_timesteps)  # validate eagerly
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes!r}")
    settings = {
        "num_steps": int(num_steps),
        "denoise_timesteps": int(denoise_timesteps),
        "cfg_scale": float(cfg_scale),
        "num_classes": int(num_classes),
    }
    try:
        hash(apply_fn)
    except TypeError:  # e.g. a bound method of a module holding unhashable fields
        return jax.jit(functools.partial(sample, apply_fn, **settings))
    return functools.partial(_jitted_sample, apply_fn, **settings)


def example_noise(rng: jax.Array, num: int, shape: tuple[int, ...]) -> jax.Array:
    """Noise for examples 0..num-1, example i drawn from fold_in(rng, i).

    Drawing per example makes a sample independent of how the batch is chunked.

    Returns:
      (num, *shape) float32 standard normal.
    """
    indices = jnp.arange(num, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), shape))(indices)


def default_labels(num: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... (all 0 when unconditional). Returns (num,)."""
    if num_classes <= 0:
        return np.zeros((num,), np.int32)
    return (np.arange(num) % num_classes).astype(np.int32)


def sample_batch(
    apply_fn: ApplyFn,
    params: Any,
    rng: jax.Array,
    *,
    num: int,
    shape: tuple[int, ...],
    labels: np.ndarray | jax.Array | None = None,
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float = 1.0,
    num_classes: int = 0,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draws `num` samples from noise seeded by `rng`, in chunks of at most `batch_size`.

    Example i always starts from the noise of fold_in(rng, i) (see `example_noise`), so the result
    does not depend on `batch_size` (up to the model's own batch-size numerics). The last chunk is
    padded to `batch_size` so one compiled program serves every chunk.

    Args:
      apply_fn: ``apply_fn(params, x, t, d_level, labels) -> velocity``.
      params: model parameters.
      rng: a PRNG key.
      num: number of samples.
      shape: per-example shape, e.g. (H, W, C) or (D,).
      labels: (num,) int labels; None = 0, 1, ..., num_classes - 1 cycled (all 0 if unconditional).
      num_steps: number of steps, in [1, denoise_timesteps].
      denoise_timesteps: power of two.
      cfg_scale: guidance scale (1.0 = none).
      num_classes: 0 = unconditional.
      batch_size: examples per model call chunk; None = all at once.
      mesh: when given (multi-device or multi-host training), each chunk is split over the mesh's
        batch axes ('data', 'fsdp') and the samples are gathered back to every process; the chunk
        is padded to a multiple of the batch shards. Every process must call this together.
      progress: called with the number of samples finished after each chunk (e.g. a progress
        bar's ``update``).

    Returns:
      images: (num, *shape) float32 numpy array, the samples.
      labels: (num,) int32 numpy array, the labels used.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size!r}")
    if labels is None:
        labels = default_labels(num, num_classes)
    labels = np.asarray(labels, dtype=np.int32)
    if labels.shape != (num,):
        raise ValueError(f"labels must have shape (num,) = ({num},), got {labels.shape}")
    sampler = make_sampler(
        apply_fn,
        num_steps=num_steps,
        denoise_timesteps=denoise_timesteps,
        cfg_scale=cfg_scale,
        num_classes=num_classes,
    )
    shape = tuple(int(s) for s in shape)
    noise = example_noise(rng, num, shape)
    chunk = num if batch_size is None else min(int(batch_size), num)
    if mesh is not None:
        shards = sharding.batch_shards(mesh)
        chunk = -(-chunk // shards) * shards
        shardings, treedef = jax.tree.flatten(jax.tree.map(lambda p: p.sharding, params))
        settings = (
            ("cfg_scale", float(cfg_scale)),
            ("denoise_timesteps", int(denoise_timesteps)),
            ("num_classes", int(num_classes)),
            ("num_steps", int(num_steps)),
        )
        sampler = _sharded_sampler(apply_fn, settings, mesh, treedef, tuple(shardings))
    outputs = []
    for start in range(0, num, chunk):
        chunk_noise = noise[start : start + chunk]
        chunk_labels = labels[start : start + chunk]
        valid = chunk_noise.shape[0]
        if valid < chunk:  # pad the last chunk so it reuses the compiled program
            chunk_noise = jnp.pad(chunk_noise, [(0, chunk - valid)] + [(0, 0)] * len(shape))
            chunk_labels = np.pad(chunk_labels, (0, chunk - valid))
        if mesh is None:
            images = np.asarray(sampler(params, chunk_noise, jnp.asarray(chunk_labels)))
        else:
            images = sharding.gather(
                sampler(
                    params,
                    sharding.shard_batch(mesh, np.asarray(chunk_noise)),
                    sharding.shard_batch(mesh, chunk_labels),
                )
            )
        outputs.append(images[:valid])
        if progress is not None:
            progress(valid)
    return np.concatenate(outputs, axis=0), labels
