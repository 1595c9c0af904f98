"""Device mesh and shardings: sharding is data, not code.

The mesh has three axes, ('data', 'fsdp', 'tensor'), sized by `config.mesh` (one entry may be -1:
"the rest of the devices"). Model parameters carry logical axis names (see shortcut_jax.models);
`config.sharding_rules` maps them to mesh axes, so data parallelism, FSDP (parameters, EMA and
optimizer state sharded over 'fsdp'), hybrid data x FSDP and tensor parallelism of attention and
MLP are config changes. The batch is split over ('data', 'fsdp').

Activations carry logical names too ('activation_batch', 'activation_length', 'activation_embed',
'activation_heads', 'activation_kv', 'activation_mlp'), mapped by the same table; configs saved
before these names existed get `ACTIVATION_RULES` (`logical_rules` fills in what is missing). The
models constrain their activations with `constrain`, which does nothing unless a traced program
entered `activation_context(mesh, rules)`: without it (single-device code, tests) the models are
unchanged, and with it XLA keeps activations split over the batch axes instead of following the
FSDP-sharded kernels (which would replicate the batch and multiply the per-chip compute).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Defaults for the activations' logical axes (config.sharding_rules may override each): the batch
# over the batch axes, attention heads and the MLP's inner width over 'tensor' (like the kernels'
# 'heads' and 'mlp'), everything else whole on every device.
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
)

# (mesh, rules) while a program that constrains activations is traced; see activation_context.
_ACTIVATION_LAYOUT: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "activation_layout", default=None
)


class ShardingError(ValueError):
    """The mesh or the sharding rules do not fit the devices, the batch or the parameters."""


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
    """Resolves `config.mesh` (with at most one -1) to sizes whose product is `device_count`."""
    sizes = [int(config.mesh[axis]) for axis in MESH_AXES]
    described = ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ShardingError(
            f"config.mesh = ({described}): each size must be a positive integer, and at most one "
            "may be -1 (the rest of the devices)"
        )
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if device_count % known:
            raise ShardingError(
                f"config.mesh = ({described}): {device_count} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ShardingError(
            f"config.mesh = ({described}): the product {math.prod(sizes)} must equal the number "
            f"of devices ({device_count}); use -1 for one axis to take the rest"
        )
    return tuple(sizes)


def make_mesh(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(mesh_shape(config, len(devices)), devices), MESH_AXES)


def device_grid(shape: Sequence[int], devices: Sequence[Any], **options: Any) -> np.ndarray:
    """`devices` as an array of `shape`, in the interconnect's order where JAX knows it.

    `mesh_utils.create_device_mesh` (with `options`), or the devices in order for topologies it
    refuses (unusual slices, subsets of CPU devices).
    """
    try:
        return mesh_utils.create_device_mesh(tuple(shape), devices=list(devices), **options)
    except (AssertionError, NotImplementedError, ValueError):
        return np.asarray(list(devices), dtype=object).reshape(tuple(shape))


def single_device_config() -> ml_collections.ConfigDict:
    """A mesh config that puts every device on the data axis (inference, tools)."""
    return ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "tensor": 1}})


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """`config.sharding_rules` as flax logical-axis rules ((logical_name, mesh_axes), ...).

    Activation names the config does not map (configs saved before they existed) get their
    `ACTIVATION_RULES` default, after the config's own rules.
    """
    return with_activation_defaults(config.sharding_rules)


def with_activation_defaults(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """`rules` (lists turned into tuples) plus the `ACTIVATION_RULES` of names it lacks."""
    result = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        result.append((logical, mesh_axes))
    named = {logical for logical, _ in result}
    result.extend(rule for rule in ACTIVATION_RULES if rule[0] not in named)
    return tuple(result)


@contextlib.contextmanager
def activation_context(
    mesh: Mesh | None, rules: Sequence[Sequence[Any]] | None = None
) -> Iterator[None]:
    """Lets the models' `constrain` calls lay activations out over `mesh` by `rules`.

    Enter it inside a function that jax traces for `mesh` (the constraints are recorded while
    tracing). Without a mesh it does nothing.

    Args:
      mesh: the program's mesh, or None.
      rules: logical axis rules (`logical_rules(config)`); None = `ACTIVATION_RULES` only.
    """
    if mesh is None:
        yield
        return
    token = _ACTIVATION_LAYOUT.set((mesh, with_activation_defaults(rules or ())))
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the layout of its logical axis `names` (one per dimension).

    The identity outside `activation_context`. A dimension that its mesh axes do not divide (e.g.
    a batch of 4 bootstrap examples over 8 devices) is left to XLA rather than failing.
    """
    layout = _ACTIVATION_LAYOUT.get()
    if layout is None:
        return x
    mesh, rules = layout
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for shape {x.shape}")
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    dims = []
    for size, axes in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec)), strict=True):
        axes_tuple = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
        ways = math.prod(mesh.shape[axis] for axis in axes_tuple)
        dims.append(axes if size % ways == 0 else PartitionSpec.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*dims)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp')."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def round_up_to_shards(size: int, mesh: Mesh | None) -> int:
    """`size` rounded up to a multiple of the batch shards (unchanged without a mesh)."""
    shards = 1 if mesh is None else batch_shards(mesh)
    return -(-int(size) // shards) * shards


def mesh_specs(abstract_boxed_state: Any, rules: Any) -> Any:
    """Mesh PartitionSpecs for every leaf of a boxed state (unboxed leaves: replicated)."""
    return nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed_state), rules)


def state_shardings(abstract_boxed_state: Any, mesh: Mesh, rules: Any) -> Any:
    """NamedShardings for a state whose parameter leaves are flax `Partitioned` boxes.

    Optimizer moments, EMA and teacher copies inherit the boxes of the parameters they were built
    from, so they are sharded like them; unboxed leaves (step, counters, PRNG key) are replicated.
    The result has the structure of the unboxed state.
    """
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        mesh_specs(abstract_boxed_state, rules),
        is_leaf=lambda leaf: isinstance(leaf, PartitionSpec),
    )


def check_divisibility(
    abstract_boxed_state: Any, axis_sizes: Mapping[str, int], rules: Any
) -> None:
    """Raises ShardingError naming every parameter dimension its mesh axes do not divide.

    Args:
      abstract_boxed_state: eval_shape of the boxed state.
      axis_sizes: mesh axis name -> size (e.g. `mesh.shape`).
      rules: logical axis rules.
    """
    specs = jax.tree.leaves(
        mesh_specs(abstract_boxed_state, rules),
        is_leaf=lambda leaf: isinstance(leaf, PartitionSpec),
    )
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_boxed_state))
    problems = []
    for (path, leaf), spec in zip(leaves, specs, strict=True):
        for dim, axes in enumerate(spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            ways = math.prod(axis_sizes[axis] for axis in axes)
            if leaf.shape[dim] % ways:
                problems.append(
                    f"{jax.tree_util.keystr(path)} dim {dim} of size {leaf.shape[dim]} over "
                    f"{'x'.join(axes)} = {ways}"
                )
    if problems:
        shown = "\n  ".join(sorted(set(problems))[:10])
        raise ShardingError(
            "config.mesh / config.sharding_rules shard parameter dimensions that the mesh does not "
            f"divide ({len(problems)} in all; change config.mesh or map the logical axis to "
            f"another mesh axis in config.sharding_rules):\n  {shown}"
        )


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles the global batch from this process's share of it."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }


def shard_batch(mesh: Mesh, global_values: np.ndarray) -> jax.Array:
    """A global array split over the batch axes from a host array every process holds in full."""
    global_values = np.asarray(global_values)
    return jax.make_array_from_callback(
        global_values.shape, batch_sharding(mesh), lambda index: global_values[index]
    )


def gather(array: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host, batch-sharded) array on every process."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def to_host(array: jax.Array) -> np.ndarray:
    """A replicated (e.g. a metric) or fully addressable array as numpy, on every process."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(array.addressable_data(0))
