"""Orbax checkpoints of the train state plus the run config, with automatic resume.

The data position needs no entry of its own: every data source is addressed by step
(`source.iterate(start_step)`), so the restored `state.step` is the data position.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from shortcut_jax import config_lib, sharding


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored."""


class NonFiniteStateError(FloatingPointError):
    """The train state holds NaN or inf: it was not saved; the newest checkpoint is untouched."""


def workdir_path(workdir: str) -> epath.Path:
    """The run directory: a local path (made absolute) or a bucket path such as gs://b/run.

    Raises:
      ValueError: for an empty `workdir` (which would otherwise mean the current directory).
    """
    if not str(workdir).strip():
        raise ValueError(
            f"the workdir is empty ({workdir!r}): pass the run's directory, e.g. runs/mnist"
        )
    return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def checkpoint_dir(workdir: str) -> epath.Path:
    """Where the checkpoints of a run live."""
    return workdir_path(workdir) / "checkpoints"


def make_manager(
    workdir: str, max_to_keep: int = 3, *, for_training: bool = False
) -> ocp.CheckpointManager:
    """An async CheckpointManager over workdir/checkpoints holding 'state' and 'config'.

    Args:
      for_training: the manager of the run that saves. It removes the temporary directories
        (`STEP.orbax-checkpoint-tmp`) a killed save left behind. Readers (sampling, evaluation)
        must not: while the run is saving, that would delete the save in flight.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=for_training
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "config")
    )


def is_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is free of NaN and inf (reduced on device)."""
    return bool(sharding.to_host(_all_finite(tree)))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def save(
    manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict, step: int
) -> None:
    """Starts an async save of `state` and `config` at `step`, if the state is finite.

    Raises:
      NonFiniteStateError: a parameter, EMA or optimizer value is NaN or inf. Nothing is saved;
        saves in flight are finished first, so the newest checkpoint it names is complete (and
        finite: every save passes this check and a resumed state is checked on restore).
    """
    if not is_finite(state):
        manager.wait_until_finished()
        newest = manager.latest_step()
        where = (
            f"the newest checkpoint, step {newest} in {manager.directory}, is finite and a rerun "
            "resumes from it"
            if newest is not None
            else f"no checkpoint was saved yet in {manager.directory}; a rerun starts afresh"
        )
        raise NonFiniteStateError(
            f"The train state at step {step} holds NaN or inf (parameters, EMA or optimizer "
            f"state). Nothing was saved at this step; {where}. "
            "Lower config.optim.learning_rate, set config.optim.grad_clip_norm > 0 or check the "
            "data for extreme values."
        )
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
    )


def restore_state(
    manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> Any:
    """Restores the state at `step` (default: newest) into the shardings of `abstract_state`.

    The EMA teacher's layout may differ between the checkpoint and `abstract_state`
    (`objectives.shares_ema_buffer`): a saved `teacher_params` is not read when the state shares
    `ema_params` as its teacher (a checkpoint of the two-buffer layout: the shared update
    continues the saved `ema_params`, which was the teacher too when the rates were equal). A
    state that needs `teacher_params` restored from a checkpoint without one (a shared-buffer run
    resumed with another `teacher_ema_rate` or `ema_rate`) gets a copy of the saved `ema_params`:
    that buffer was the teacher EMA up to the saved step.

    Raises:
      CheckpointError: naming the checkpoint directory when it is unreadable or does not match.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}")
    try:
        return _restore_with_teacher_layout(manager, step, abstract_state)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - orbax raises many kinds; `why` tells them apart
        path = os.path.join(str(manager.directory), str(step))
        steps = sorted(manager.all_steps())
        raise CheckpointError(
            f"cannot restore the checkpoint {path}: {why(error)} ({type(error).__name__}: "
            f"{error}). Saved steps: {steps}. Rerun with --config.restore_fallback=true to "
            "resume from the newest older checkpoint that restores (this one is moved aside, "
            "not deleted)."
        ) from error


def why(error: BaseException) -> str:
    """What a failed restore means, in words: the kind of failure behind `error`."""
    text = f"{type(error).__name__} {error}".lower()
    if isinstance(error, PermissionError) or any(
        mark in text for mark in ("permission", "forbidden", "403", "access denied")
    ):
        return (
            "permission denied (the files exist but this user or service account cannot read them)"
        )
    if any(mark in text for mark in ("shape", "rank", "incompatible dims", "broadcast")):
        return "shape mismatch (saved by another model or config)"
    if any(mark in text for mark in ("version", "unsupported", "unknown type", "handler")):
        return "incompatible version (saved by another Orbax or shortcut_jax version)"
    if isinstance(error, (FileNotFoundError, KeyError)) or any(
        mark in text for mark in ("not found", "no such file", "missing", "does not exist")
    ):
        return "missing item (a file or array of the checkpoint is gone)"
    return "corrupt or unreadable"


_TEACHER = "teacher_params"


def _restore_with_teacher_layout(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> Any:
    """`restore_state`'s restore, adapting a saved EMA teacher layout to the wanted one."""
    layout = _teacher_layout(manager, step, abstract_state)
    if layout == "drop":
        names = [f.name for f in dataclasses.fields(abstract_state) if f.name != _TEACHER]
        fields = {name: getattr(abstract_state, name) for name in names}
        return abstract_state.replace(**restore_fields(manager, step, fields))
    target = abstract_state.replace(teacher_params=None) if layout == "fill" else abstract_state
    state = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    ).state
    if layout == "fill":
        teacher = jax.tree.map(
            lambda saved, wanted: jax.device_put(jnp.copy(saved), wanted.sharding),
            state.ema_params,
            abstract_state.teacher_params,
        )
        state = state.replace(teacher_params=teacher)
    return state


def _teacher_layout(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> str:
    """'same', 'drop' (teacher_params saved, none wanted) or 'fill' (wanted, none saved)."""
    if not dataclasses.is_dataclass(abstract_state) or not hasattr(abstract_state, _TEACHER):
        return "same"
    # The manager's item_metadata knows no handler before its first save: read the tree directly.
    with ocp.PyTreeCheckpointer() as checkpointer:
        saved = checkpointer.metadata(_state_path(manager, step)).item_metadata
    if saved is None or _TEACHER not in saved:
        return "same"
    has_saved = saved[_TEACHER] is not None
    wants = getattr(abstract_state, _TEACHER) is not None
    if has_saved == wants:
        return "same"
    return "drop" if has_saved else "fill"


def _state_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step) / "state"


def restore_fields(
    manager: ocp.CheckpointManager, step: int, abstract: dict[str, Any]
) -> dict[str, Any]:
    """Restores only some fields of the saved state (e.g. params and ema_params of a teacher).

    The other fields (optimizer moments, a teacher EMA) are not read at all, so loading a frozen
    model costs its own memory, not the whole train state's (at DiT-B/2 scale 2 instead of 4 or
    5 copies of the parameters).

    Args:
      manager: the run's manager. step: a saved step.
      abstract: {field: abstract pytree with shardings} of the fields to restore.

    Raises:
      CheckpointError: naming the checkpoint when it is unreadable or does not hold the fields.
    """
    path = _state_path(manager, step)
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        abstract,
    )
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True
                ),
            )
    except Exception as error:  # noqa: BLE001 - orbax raises many kinds; all mean "unreadable"
        raise CheckpointError(
            f"cannot restore {sorted(abstract)} from the checkpoint {path} "
            f"({type(error).__name__}: {error}). Saved steps: {sorted(manager.all_steps())}."
        ) from error
    missing = [
        name
        for name in abstract
        if name not in restored
        or not all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored[name]))
    ]
    if missing:
        raise CheckpointError(
            f"the checkpoint {path} holds no {missing} (a state saved by another version or "
            "objective?). Give the --workdir of a finished training run."
        )
    return {name: restored[name] for name in abstract}


def restore_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a checkpoint (default: newest), or workdir/config.json.

    Fields added to the library since the run was saved get their defaults.
    """
    manager = make_manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is not None:
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return _with_defaults(ml_collections.ConfigDict(restored.config))
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(workdir)} and no {path}: "
            "is --workdir the directory a training run wrote to?"
        )
    return _with_defaults(config_lib.from_json(path.read_text()))


def _with_defaults(
    saved: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    from shortcut_jax import configs

    defaults = configs.base_config() if defaults is None else defaults
    for key, value in defaults.items():
        if key not in saved:
            saved[key] = value
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(
            saved[key], ml_collections.ConfigDict
        ):
            _with_defaults(saved[key], value)
    return saved


def restore_or_init(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    init_fn: Callable[[], Any],
    fallback: bool = False,
) -> tuple[Any, bool]:
    """Resumes from the newest checkpoint if there is one, else calls `init_fn`.

    With `fallback`, a checkpoint that fails to restore (or holds NaN/inf) is moved aside to
    WORKDIR/failed_checkpoints/STEP (kept, never deleted) and the next older one is tried, down to
    a fresh start only if none restores; every failure is logged with its reason.

    Returns:
      (state, resumed).

    Raises:
      CheckpointError: without `fallback`, naming the checkpoint and why it failed.
    """
    while (step := manager.latest_step()) is not None:
        try:
            return _restore_finite(manager, abstract_state, step), True
        except CheckpointError as error:
            if not fallback:
                raise
            moved = set_aside(manager, step)
            logging.warning("%s\nMoved it to %s; trying the previous checkpoint.", error, moved)
            manager.reload()
    return init_fn(), False


def _restore_finite(manager: ocp.CheckpointManager, abstract_state: Any, step: int) -> Any:
    state = restore_state(manager, abstract_state, step)
    if not is_finite(state):  # saved before saves were checked: do not train on from it
        path = os.path.join(str(manager.directory), str(step))
        raise CheckpointError(
            f"the checkpoint {path} holds NaN or inf values (saved steps: "
            f"{sorted(manager.all_steps())}). Rerun with --config.restore_fallback=true to "
            "resume from the newest older checkpoint that restores (this one is moved aside)."
        )
    return state


FAILED_DIR = "failed_checkpoints"


def set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves checkpoint `step` out of the manager's directory into ../failed_checkpoints/STEP.

    Kept for inspection, out of the way of the steps the resumed run will save. Process 0 moves
    it; every process waits for the move.
    """
    source = epath.Path(manager.directory) / str(step)
    target = epath.Path(manager.directory).parent / FAILED_DIR / str(step)
    if jax.process_index() == 0:
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.parent / f"{step}.{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    return target


def load_run(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any]:
    """Loads a run's config and train state (newest checkpoint by default) onto this process.

    The state is restored into the shardings of a data-parallel mesh over this process's devices
    (parameters replicated), whatever mesh it was saved from. Used by the sampling and evaluation
    CLIs and notebooks.
    """
    manager = make_manager(workdir)
    try:
        step = _step_to_load(manager, workdir, step)
        config = restore_config(workdir, step)
        config.mesh = sharding.single_device_config().mesh
        mesh = sharding.make_mesh(config, jax.local_devices())
        state = restore_state(manager, _abstract_state(config, mesh), step)
    finally:
        manager.close()
    return config, state


def _step_to_load(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
    """`step`, or the newest saved one; FileNotFoundError when there is none."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(workdir)}: train first "
            "(python -m shortcut_jax.main --config ... --workdir ...)"
        )
    return step


def _abstract_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
    """The run's train state as abstract arrays sharded over `mesh`."""
    from shortcut_jax import models, optim
    from shortcut_jax.state import sharded_abstract_state

    model = models.get_model(config)
    return sharded_abstract_state(config, model, optim.make_optimizer(config), mesh)[0]


def load_params(
    workdir: str,
    step: int | None = None,
    raw: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ml_collections.ConfigDict, Any, int]:
    """Loads a run's config and one parameter set (EMA, or raw with `raw=True`), nothing else.

    Only that field of the saved state is read (Orbax partial restore): the optimizer moments,
    the other parameter copy and a teacher EMA stay on disk, so sampling a checkpoint costs one
    copy of the parameters, not the train state's four or five.

    Args:
      workdir: the run directory (local or gs://...).
      step: the checkpoint step; None = the newest.
      raw: restore `params` instead of `ema_params`.
      mesh: where to place the parameters (laid out by the run's sharding rules); None = a
        data-parallel mesh over this process's devices (parameters replicated). Any mesh works,
        whatever mesh the run was saved from.

    Returns:
      (config saved with the checkpoint, its `mesh` field set to the mesh the parameters are on;
      the parameters; the step).

    Raises:
      FileNotFoundError: when the workdir holds no checkpoint.
      CheckpointError: when the checkpoint cannot be read or lacks the field.
    """
    manager = make_manager(workdir)
    try:
        step = _step_to_load(manager, workdir, step)
        config = restore_config(workdir, step)
        if mesh is None:
            config.mesh = sharding.single_device_config().mesh
            mesh = sharding.make_mesh(config, jax.local_devices())
        for axis, size in mesh.shape.items():
            config.mesh[axis] = int(size)
        abstract_state = _abstract_state(config, mesh)
        field = "params" if raw else "ema_params"
        params = restore_fields(manager, step, {field: getattr(abstract_state, field)})[field]
    finally:
        manager.close()
    return config, params, int(step)
