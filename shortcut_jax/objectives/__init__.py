"""Registry of training objectives.

An objective turns a data batch into a regression problem: the network inputs
(x_t, t, d_level, labels), the stop-gradient targets, and which examples are self-consistency
(bootstrap) examples. The train step owns the forward pass, the loss, the gradient and the
optimizer, so every objective shares one loop and the loop never branches on an objective's name.

    @register("name", uses_teacher=True)
    def build_targets(apply_fn, teacher_params, batch, rng, cfg) -> tuple[Regression, dict]: ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class Regression:
    """One regression batch: regress apply_fn(params, x_t, t, d_level, labels) onto target.

    Attributes:
      x_t: (B, ...) network input.
      t: (B,) float32 time in [0, 1].
      d_level: (B,) int32 step-size level, d = 2**-d_level.
      labels: (B,) int32 class labels, num_classes = null class.
      target: (B, ...) regression target (already stop-gradient).
      is_bootstrap: (B,) bool, True for self-consistency examples.
    """

    x_t: jax.Array
    t: jax.Array
    d_level: jax.Array
    labels: jax.Array
    target: jax.Array
    is_bootstrap: jax.Array


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The fields of the run config that objectives read (frozen: hashable, safe inside jit)."""

    denoise_timesteps: int
    bootstrap_every: int
    bootstrap_cfg: bool
    cfg_scale: float
    class_dropout_prob: float
    target_clip: float
    num_classes: int

    @classmethod
    def from_config(cls, config: Any) -> ObjectiveConfig:
        """Builds it from a run config (ml_collections.ConfigDict)."""
        return cls(
            denoise_timesteps=int(config.denoise_timesteps),
            bootstrap_every=int(config.bootstrap_every),
            bootstrap_cfg=bool(config.bootstrap_cfg),
            cfg_scale=float(config.cfg_scale),
            class_dropout_prob=float(config.class_dropout_prob),
            target_clip=float(config.target_clip),
            num_classes=int(config.data.num_classes),
        )


ApplyFn = Callable[..., jax.Array]
BuildTargets = Callable[
    [ApplyFn, Any, dict, jax.Array, ObjectiveConfig], tuple[Regression, dict[str, jax.Array]]
]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A registered objective and what the train loop must provide for it.

    Attributes:
      name: the value of `config.objective`.
      build_targets: the pure target builder.
      uses_teacher: the objective evaluates a teacher (the current parameters under
        stop-gradient or an EMA copy, per `config.bootstrap_teacher`).
      min_bootstrap_every: smallest valid `config.bootstrap_every` (0 = the field is unused).
    """

    name: str
    build_targets: BuildTargets
    uses_teacher: bool
    min_bootstrap_every: int


_REGISTRY: dict[str, Objective] = {}


def register(name: str, *, uses_teacher: bool, min_bootstrap_every: int = 0):
    """Decorator that registers a target builder under `name`."""

    def decorator(fn: BuildTargets) -> BuildTargets:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        _REGISTRY[name] = Objective(name, fn, uses_teacher, min_bootstrap_every)
        return fn

    return decorator


def get(name: str) -> Objective:
    """Returns the objective registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"config.objective = {name!r} is unknown; allowed: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Names of all registered objectives."""
    return sorted(_REGISTRY)


# Importing the modules registers them.
from shortcut_jax.objectives import flow_matching, shortcut  # noqa: E402, F401
