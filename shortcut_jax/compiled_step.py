"""The compiled, sharded train step: the one place the train loop and the benchmarks get it from.

`build` jits `steps.make_train_step` for a mesh with the state's shardings, the batch split over
the batch axes, donation, the run's frozen inputs (a teacher run's parameters, a VAE that encodes
images inside the step) and the metric sums carried beside the state:

    step = compiled_step.build(config, mesh, model, optimizer, state_sharding)
    sums = step.zero_sums(state, batch)
    state, sums, loss = step(state, sums, batch)   # repeat; read `sums` at log steps only

The sums are accumulated on the device inside the step (no per-step host work) and are never
part of the state, so checkpoints and resumes do not see them.

The step is traced inside `sharding.activation_context(mesh, sharding.logical_rules(config))`, so
the model's activations are laid out by the config's rules (split over the batch axes under FSDP).

For ahead-of-time compilation (no weights at hand) the frozen inputs may be abstract: a teacher
run or a VAE whose parameter leaves are `jax.ShapeDtypeStruct`s; `step.lower(...)` then works as
with real ones (the abstract step cannot be called, only lowered).

Of a VAE only the encoder half (`Vae.encoder_params`) goes into the step: the decoder is for
sampling and never occupies device memory on account of training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from shortcut_jax import latent_space, objectives, sharding, steps
from shortcut_jax.state import TrainState

# (total, count) of one step's loss, replicated.
Loss = tuple[jax.Array, jax.Array]


class CompiledStep:
    """`step(state, sums, batch) -> (state, sums, loss)`, jitted for one mesh.

    `state` and `sums` are donated: use the returned ones. `sums` holds, per metric of
    `steps.make_train_step`, the (total, count) summed over the steps since it was zeroed; `loss`
    is this step's (total, count) of the loss.

    Attributes:
      program: the jitted (or ahead-of-time compiled) (state, sums, batch, frozen) -> (state,
        sums, loss).
      frozen: the inputs that are not trained, on the device: {'teacher': params} for an objective
        with a teacher run, {'vae': the VAE's encoder half} when images are encoded in the step,
        else {}.
      state_sharding: NamedShardings of the state. mesh: the mesh. batch_sharding: of every
        batch array.
    """

    def __init__(
        self,
        program: Any,
        inner: Callable[..., Any],
        frozen: dict[str, Any],
        state_sharding: Any,
        mesh: jax.sharding.Mesh,
    ):
        self.program = program
        self.frozen = frozen
        self.state_sharding = state_sharding
        self.mesh = mesh
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._inner = inner
        self._replicated = sharding.replicated(mesh)
        self._zeros: Callable[[], steps.Metrics] | None = None

    def __call__(
        self, state: TrainState, sums: steps.Metrics, batch: dict[str, jax.Array]
    ) -> tuple[TrainState, steps.Metrics, Loss]:
        """One train step; `sums` gains this step's metrics."""
        return self.program(state, sums, batch, self.frozen)

    def metric_shapes(self, state: Any, batch: Any) -> steps.Metrics:
        """ShapeDtypeStructs (replicated) of the metric sums; `state`, `batch` may be abstract."""
        metrics = jax.eval_shape(self._inner, state, batch, self.frozen)[1]
        return jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self._replicated),
            metrics,
        )

    def zero_sums(self, state: Any, batch: Any) -> steps.Metrics:
        """Fresh zero metric sums on the device (one dispatch after the first call)."""
        if self._zeros is None:
            shapes = self.metric_shapes(state, batch)
            self._zeros = jax.jit(
                lambda: jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes),
                out_shardings=self._replicated,
            )
        return self._zeros()

    def lower(self, state: Any, batch: Any) -> jax.stages.Lowered:
        """The lowered program for this state and batch (real or abstract); `.compile()` it."""
        return self.program.lower(state, self.metric_shapes(state, batch), batch, self.frozen)

    def with_program(self, program: Any) -> CompiledStep:
        """The same step running `program` (e.g. `self.lower(...).compile()`)."""
        other = CompiledStep(program, self._inner, self.frozen, self.state_sharding, self.mesh)
        other._zeros = self._zeros
        return other


def build(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    state_sharding: Any,
    teacher_run: objectives.TeacherRun | None = None,
    vae: Any = None,
) -> CompiledStep:
    """The train step of `config` jitted for `mesh`, with donation and its frozen inputs.

    Args:
      config: the run's config. mesh: the ('data', 'fsdp', 'tensor') mesh.
      model, optimizer: as the state was built with. state_sharding: the state's NamedShardings
        (`state.sharded_abstract_state`).
      teacher_run: the frozen teacher (`teacher.prepare`) of an objective with a teacher run.
        Its params may be `jax.ShapeDtypeStruct`s (ahead-of-time compilation); leaves without a
        sharding are replicated.
      vae: the run's VAE (`latent_space.load_run_vae`) when images are encoded inside the step
        (`latent_space.is_online`); the batch then holds pixel images. Only its encoder half
        (`vae.encoder_params`) is put on the devices and passed to the step. Its params may be
        `jax.ShapeDtypeStruct`s (ahead-of-time compilation): they are then given the replicated
        sharding instead of being put on the devices.
    """
    train_step = steps.make_train_step(config, model, optimizer, teacher_run)
    rules = sharding.logical_rules(config)
    replicated = sharding.replicated(mesh)
    frozen: dict[str, Any] = {}
    frozen_sharding: dict[str, Any] = {}
    if teacher_run is not None:
        frozen["teacher"] = jax.tree.map(
            lambda leaf: (
                _abstract(leaf, leaf.sharding or replicated) if _is_abstract(leaf) else leaf
            ),
            teacher_run.params,
        )
        frozen_sharding["teacher"] = jax.tree.map(lambda leaf: leaf.sharding, frozen["teacher"])
    if vae is not None:
        encoder = vae.encoder_params
        frozen["vae"] = (
            jax.tree.map(lambda leaf: _abstract(leaf, replicated), encoder)
            if any(_is_abstract(leaf) for leaf in jax.tree.leaves(encoder))
            else jax.device_put(encoder, replicated)
        )
        frozen_sharding["vae"] = replicated

    def step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, steps.Metrics]:
        def train(state: TrainState, batch: dict) -> tuple[TrainState, steps.Metrics]:
            return train_step(state, batch, frozen.get("teacher"))

        with sharding.activation_context(mesh, rules):
            if "vae" in frozen:
                encode_and_train = latent_space.online_encode_step(config, train, vae)
                return encode_and_train(state, batch, frozen["vae"])
            return train(state, batch)

    # Jitted on its own too, so that `metric_shapes` and the program share one trace.
    inner = jax.jit(step)

    def accumulating_step(
        state: TrainState, sums: steps.Metrics, batch: dict, frozen: dict
    ) -> tuple[TrainState, steps.Metrics, Loss]:
        new_state, metrics = inner(state, batch, frozen)
        return new_state, jax.tree.map(jnp.add, sums, metrics), metrics["loss"]

    program = jax.jit(
        accumulating_step,
        in_shardings=(state_sharding, replicated, sharding.batch_sharding(mesh), frozen_sharding),
        out_shardings=(state_sharding, replicated, replicated),
        donate_argnums=(0, 1),
    )
    return CompiledStep(program, inner, frozen, state_sharding, mesh)


def _is_abstract(leaf: Any) -> bool:
    return isinstance(leaf, jax.ShapeDtypeStruct)


def _abstract(leaf: Any, leaf_sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct of `leaf`'s shape and dtype with `leaf_sharding`."""
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding)
