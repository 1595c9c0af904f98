"""The train state: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from shortcut_jax import models, objectives, sharding


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, optimizer state, EMA copies and the base PRNG key.

    Attributes:
      step: () int32, number of optimizer updates applied.
      params: model parameters.
      opt_state: optax state.
      ema_params: EMA of params at `config.ema_rate`, used for sampling and evaluation.
      teacher_params: EMA used as the teacher when `config.bootstrap_teacher == 'ema'`, or as the
        target network of an objective that always has one (its rate is
        `config.teacher_ema_rate` or the objective's schedule); None otherwise. It is also None
        when the teacher rate is the constant `config.ema_rate` (`objectives.shares_ema_buffer`,
        the paper configs): `ema_params` is then the teacher, one parameter copy less.
      rng: base key; the key of step s is fold_in(rng, s), so resuming is exact.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    ema_params: Any
    teacher_params: Any
    rng: jax.Array


def init_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    boxed: bool = False,
) -> TrainState:
    """Initialises a fresh state from `config.seed` (pure: jit it, or eval_shape it).

    With `boxed=True` the parameter leaves, and the optimizer moments and EMA copies built from
    them, stay flax `Partitioned` boxes that carry logical axis names: eval_shape that to derive
    shardings (`sharding.state_shardings`). The state used for training is unboxed.
    """
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    x, t, d, labels = models.example_inputs(config, batch_size=1)
    params = model.init(init_rng, x, t, d, labels)["params"]
    if not boxed:
        params = nn.unbox(params)
    keeps_teacher = objectives.keeps_teacher_buffer(objectives.get(config.objective), config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        # Separate buffers: donating a state whose EMA aliases params fails.
        ema_params=jax.tree.map(jnp.copy, params),
        teacher_params=jax.tree.map(jnp.copy, params) if keeps_teacher else None,
        rng=train_rng,
    )


def sharded_abstract_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, TrainState]:
    """The state's shapes with their shardings on `mesh`, and the shardings alone.

    Checks first that the mesh divides every parameter dimension it shards.

    Returns:
      (abstract_state of ShapeDtypeStructs carrying shardings, tree of NamedShardings).
    """
    rules = sharding.logical_rules(config)
    boxed = jax.eval_shape(functools.partial(init_state, config, model, optimizer, boxed=True))
    sharding.check_divisibility(boxed, dict(mesh.shape), rules)
    shardings = sharding.state_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda leaf, leaf_sharding: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=leaf_sharding
        ),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings
