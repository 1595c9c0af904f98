"""Pure sampler for every objective: any step count, classifier-free guidance, `lax.fori_loop`.

Sampling walks from noise (t = 0) to data (t = 1) in N steps, one network evaluation per step
(two batched into one call with guidance). With M = 2**k steps every step has size d = 1/M and
level k. Any other count N in [1, denoise_timesteps] is split into power-of-two steps (see
`step_schedule`), so every step is one a shortcut model was trained on.

What a step does is the objective's (`objectives.Sampler`, chosen by passing the run's
`objectives.ObjectiveConfig` as `objective`): Euler shortcut steps x <- x + d * s(x, t, d, y) for
shortcut, flow matching, live reflow and MeanFlow (also the default, `objective=None`); DDIM steps
for diffusion; consistency multistep sampling for consistency training.

The model is passed as ``apply_fn(params, x, t, d, labels) -> output`` with x: (B, ...) any
trailing shape, t: (B,) float32, d: (B,) float32 step sizes, labels: (B,) int32; the output has
x's shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax import objectives, preemption, sharding

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


def _guided_network(
    apply_fn: ApplyFn,
    params: Any,
    labels: jax.Array,
    cfg_scale: float | jax.Array,
    num_classes: int,
) -> objectives.Network:
    """network(x, t, d) -> output, with classifier-free guidance in one batched call if it applies.

    Guided: out_null + cfg_scale * (out_cond - out_null), the null class being label num_classes.
    A Python scale of 1 skips the null branch; a traced scale (an exported sampler's input) always
    guides. x: (B, ...), t: (B,) float32, d: (B,) float32. Returns (B, ...).
    """
    unguided = num_classes <= 0 or (isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0)

    def network(x: jax.Array, t: jax.Array, d: jax.Array) -> jax.Array:
        if unguided:
            return apply_fn(params, x, t, d, labels)
        batch = x.shape[0]
        null_labels = jnp.full_like(labels, num_classes)
        out = apply_fn(
            params,
            jnp.concatenate([x, x], axis=0),
            jnp.concatenate([t, t], axis=0),
            jnp.concatenate([d, d], axis=0),
            jnp.concatenate([labels, null_labels], axis=0),
        )
        out_cond, out_null = out[:batch], out[batch:]
        return out_null + cfg_scale * (out_cond - out_null)

    return network


def step_noise(noise: jax.Array, step: jax.Array) -> jax.Array:
    """Fresh standard normal noise for step `step` of stochastic samplers, per example.

    Each example's key comes from the bits of its own starting noise, so a sample stays
    independent of how the batch is chunked or sharded. noise: (B, ...). Returns (B, ...).
    """
    flat = noise.reshape(noise.shape[0], -1)
    seeds = jax.lax.bitcast_convert_type(flat[:, 0].astype(jnp.float32), jnp.uint32)

    def one(seed: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), seed), step)
        return jax.random.normal(key, noise.shape[1:], noise.dtype)

    return jax.vmap(one)(seeds)


def sample(
    apply_fn: ApplyFn,
    params: Any,
    noise: jax.Array,
    labels: jax.Array,
    *,
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float | jax.Array = 1.0,
    num_classes: int = 0,
    objective: objectives.ObjectiveConfig | None = None,
) -> jax.Array:
    """Walks from noise (t = 0) to data (t = 1) in `num_steps` steps of the objective's sampler.

    Pure and jit-compatible (`num_steps`, `denoise_timesteps`, `cfg_scale`, `num_classes` and
    `objective` must be static). The steps follow `step_schedule`; by default each is the Euler
    shortcut step x <- x + d * v(x, t, d, y). With ``cfg_scale != 1`` and ``num_classes > 0`` the
    conditional and null-class (label num_classes) outputs come from one call on a 2B batch and are
    mixed as out_null + cfg_scale * (out_cond - out_null); otherwise the model is called once on B
    examples.

    Args:
      apply_fn: ``apply_fn(params, x, t, d, labels) -> output`` (see module docstring).
      params: the model parameters (any pytree), passed through to apply_fn.
      noise: (B, ...) x0 ~ N(0, I), any trailing shape ((B, H, W, C) images, (B, D) points).
      labels: (B,) int32 class labels in [0, num_classes] (num_classes = null class; all 0 when
        unconditional).
      num_steps: number of steps (network evaluations without CFG), in [1, denoise_timesteps].
      denoise_timesteps: power of two; the smallest step is 1/denoise_timesteps.
      cfg_scale: guidance scale w; 1.0 means no guidance.
      num_classes: number of classes; 0 = unconditional (no guidance possible).
      objective: the run's `objectives.ObjectiveConfig.from_config(config)`: its objective's
        sampler and settings; None = Euler shortcut steps.

    Returns:
      x1: (B, ...) samples with noise's shape and dtype.
    """
    t_start, step_size, _ = step_schedule(num_steps, denoise_timesteps)
    if noise.ndim < 1:
        raise ValueError(f"noise must have a batch axis, got shape {noise.shape}")
    batch = noise.shape[0]
    labels = jnp.asarray(labels, dtype=jnp.int32)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape (B,) = ({batch},), got {labels.shape}")
    t_start = jnp.asarray(t_start)
    step_size = jnp.asarray(step_size)
    sampler = objectives.EULER if objective is None else objectives.get(objective.name).sampler
    network = _guided_network(apply_fn, params, labels, cfg_scale, num_classes)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.full((batch,), t_start[i], dtype=jnp.float32)
        d = jnp.full((batch,), step_size[i], dtype=jnp.float32)
        return sampler.step(network, x, t, d, step_noise(noise, i), objective).astype(x.dtype)

    return jax.lax.fori_loop(
        0, num_steps, body, sampler.start(noise, objective).astype(noise.dtype)
    )


@functools.partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("num_steps", "denoise_timesteps", "cfg_scale", "num_classes", "objective"),
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
    objective: objectives.ObjectiveConfig | None,
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
        objective=objective,
    )


def _sample_in_layout(
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...] | None,
    apply_fn: ApplyFn,
    *args: Any,
    **settings: Any,
) -> jax.Array:
    """`sample` traced inside `sharding.activation_context(mesh, rules)`."""
    with sharding.activation_context(mesh, rules):
        return sample(apply_fn, *args, **settings)


@functools.lru_cache(maxsize=32)
def _sharded_sampler(
    apply_fn: ApplyFn,
    settings: tuple[tuple[str, Any], ...],
    mesh: jax.sharding.Mesh,
    param_treedef: Any,
    param_shardings: tuple[jax.sharding.Sharding, ...],
    rules: tuple[tuple[str, Any], ...] | None = None,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """`sample` jitted with explicit shardings: params as they are, noise/labels/output by batch;
    the model's activations laid out by `rules` (see `sharding.activation_context`)."""
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        functools.partial(_sample_in_layout, mesh, rules, apply_fn, **dict(settings)),
        in_shardings=(jax.tree.unflatten(param_treedef, param_shardings), batch, batch),
        out_shardings=batch,
    )


def mesh_sampler(
    apply_fn: ApplyFn,
    params: Any,
    mesh: jax.sharding.Mesh,
    *,
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float = 1.0,
    num_classes: int = 0,
    objective: objectives.ObjectiveConfig | None = None,
    sharding_rules: Sequence[Sequence[Any]] | None = None,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """The sampler jitted over `mesh`: ``sampler(params, noise, labels) -> samples``.

    `params` (real or abstract arrays) keep their shardings; noise, labels and samples are split
    over the mesh's batch axes; the activations follow `sharding_rules` (None = the defaults).
    One compiled program per settings, mesh and layout (cached).
    """
    settings = (
        ("cfg_scale", float(cfg_scale)),
        ("denoise_timesteps", int(denoise_timesteps)),
        ("num_classes", int(num_classes)),
        ("num_steps", int(num_steps)),
        ("objective", objective),
    )
    shardings, treedef = jax.tree.flatten(jax.tree.map(lambda p: p.sharding, params))
    rules = None if sharding_rules is None else sharding.with_activation_defaults(sharding_rules)
    return _sharded_sampler(apply_fn, settings, mesh, treedef, tuple(shardings), rules)


def make_sampler(
    apply_fn: ApplyFn,
    *,
    num_steps: int,
    denoise_timesteps: int,
    cfg_scale: float = 1.0,
    num_classes: int = 0,
    objective: objectives.ObjectiveConfig | None = None,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """A jitted ``sampler(params, noise, labels) -> x1`` for fixed settings.

    The settings are validated here (a bad `num_steps` fails before any compile). The settings and
    `apply_fn` are static arguments of one shared jitted function, so two samplers built from the
    same (hashable, equal) apply_fn and settings reuse the compiled program; a fresh closure or
    `functools.partial` per call compiles again, so build the sampler once and keep it. An
    unhashable apply_fn gets its own jitted function (compiled once per sampler).

    Args:
      apply_fn: ``apply_fn(params, x, t, d, labels) -> output``.
      num_steps: number of steps, in [1, denoise_timesteps].
      denoise_timesteps: power of two.
      cfg_scale: guidance scale (1.0 = none).
      num_classes: 0 = unconditional; otherwise label num_classes is the null class.
      objective: the run's `objectives.ObjectiveConfig` (its sampler); None = Euler steps.

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
        "objective": _check_objective(objective),
    }
    try:
        hash(apply_fn)
    except TypeError:  # e.g. a bound method of a module holding unhashable fields
        return jax.jit(functools.partial(sample, apply_fn, **settings))
    return functools.partial(_jitted_sample, apply_fn, **settings)


def _check_objective(
    objective: objectives.ObjectiveConfig | None,
) -> objectives.ObjectiveConfig | None:
    """Returns `objective` or raises a ValueError naming what to pass."""
    if objective is not None and not isinstance(objective, objectives.ObjectiveConfig):
        raise ValueError(
            "objective must be the run's objectives.ObjectiveConfig.from_config(config) or None, "
            f"got {type(objective).__name__}"
        )
    if objective is not None:
        objectives.get(objective.name)
    return objective


def example_noise(rng: jax.Array, num: int, shape: tuple[int, ...]) -> jax.Array:
    """Noise for examples 0..num-1, example i drawn from fold_in(rng, i).

    Drawing per example makes a sample independent of how the batch is chunked.

    Returns:
      (num, *shape) float32 standard normal.
    """
    return noise_at(rng, jnp.arange(num, dtype=jnp.uint32), shape)


def noise_at(rng: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The `example_noise` of the examples numbered `indices`, e.g. one chunk of a batch.

    Pure and jit-compatible (`shape` static), so a jitted program can draw its own chunk on the
    device: ``noise_at(rng, start + arange(chunk), shape)`` equals
    ``example_noise(rng, num, shape)[start : start + chunk]``.

    Args:
      rng: a PRNG key.
      indices: (B,) uint32 example numbers.
      shape: per-example shape.

    Returns:
      (B, *shape) float32 standard normal.
    """
    indices = jnp.asarray(indices, jnp.uint32)
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
    objective: objectives.ObjectiveConfig | None = None,
    sharding_rules: Sequence[Sequence[Any]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draws `num` samples from noise seeded by `rng`, in chunks of at most `batch_size`.

    Example i always starts from the noise of fold_in(rng, i) (see `example_noise`), so the result
    does not depend on `batch_size` (up to the model's own batch-size numerics). The last chunk is
    padded to `batch_size` so one compiled program serves every chunk.

    Args:
      apply_fn: ``apply_fn(params, x, t, d, labels) -> output``.
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
      objective: the run's `objectives.ObjectiveConfig.from_config(config)`, which picks the
        objective's sampler (DDIM for diffusion, multistep consistency sampling, Euler for the
        others); None = Euler shortcut steps.
      sharding_rules: with a mesh, the logical axis rules of the model's activations
        (`sharding.logical_rules(config)`); None = `sharding.ACTIVATION_RULES`.

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
        objective=objective,
    )
    shape = tuple(int(s) for s in shape)
    noise = example_noise(rng, num, shape)
    chunk = num if batch_size is None else min(int(batch_size), num)
    if mesh is not None:
        chunk = sharding.round_up_to_shards(chunk, mesh)
        sampler = mesh_sampler(
            apply_fn,
            params,
            mesh,
            num_steps=num_steps,
            denoise_timesteps=denoise_timesteps,
            cfg_scale=cfg_scale,
            num_classes=num_classes,
            objective=objective,
            sharding_rules=sharding_rules,
        )
    outputs = []
    for start in range(0, num, chunk):
        chunk_noise = noise[start : start + chunk]
        chunk_labels = labels[start : start + chunk]
        valid = chunk_noise.shape[0]
        if valid < chunk:  # pad the last chunk so it reuses the compiled program
            chunk_noise = jnp.pad(chunk_noise, [(0, chunk - valid)] + [(0, 0)] * len(shape))
            chunk_labels = np.pad(chunk_labels, (0, chunk - valid))
        if mesh is None:
            images = sampler(params, chunk_noise, jnp.asarray(chunk_labels))
            images = np.asarray(preemption.wait_until_ready(images))
        else:
            images = sampler(
                params,
                sharding.shard_batch(mesh, np.asarray(chunk_noise)),
                sharding.shard_batch(mesh, chunk_labels),
            )
            images = sharding.gather(preemption.wait_until_ready(images))
        outputs.append(images[:valid])
        if progress is not None:
            progress(valid)
    return np.concatenate(outputs, axis=0), labels
