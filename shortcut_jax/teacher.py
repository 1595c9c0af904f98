"""Parameters from another finished run: the frozen teacher (`config.teacher.workdir`) and the
start point of a new run (`config.init_from`).

A run's "model" is what it samples with: its EMA parameters when its config says
`sample_use_ema`, else its raw parameters. They are restored with the other run's OWN config
(model, denoise_timesteps) onto the CURRENT mesh with the current run's sharding rules.

The teacher is frozen: it is not part of the train state and is not checkpointed with the student;
every start (and resume) reloads it from its workdir. Its step and a mesh-independent checksum are
recorded in WORKDIR/teacher.json at the first start, and a resume whose teacher differs is
refused. `init_from` only acts on a fresh run (step 0): params, EMA and target network start from
the other run's params and EMA (the optimizer state starts afresh).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from shortcut_jax import atomic_files, checkpoint, latent_space, models, objectives, optim, steps
from shortcut_jax.state import TrainState, sharded_abstract_state

RECORD_NAME = "teacher.json"


class TeacherError(ValueError):
    """Another run cannot be used as teacher or start point; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run's model restored onto the current mesh.

    Attributes:
      config: the run's own config. params: its model (EMA or raw, per its sample_use_ema).
      step: the checkpoint step loaded. checksum: `checksum(params)`. workdir: where it came from.
      raw_params, ema_params: its train state's parameters and their EMA.
    """

    config: ml_collections.ConfigDict
    params: Any
    step: int
    checksum: str
    workdir: str
    raw_params: Any = None
    ema_params: Any = None

    def as_teacher(self) -> objectives.TeacherRun:
        """The `objectives.TeacherRun` of this run (student slot empty; the step fills it)."""
        return objectives.TeacherRun(
            params=self.params,
            student=None,
            apply_fn=steps.make_apply_fn(models.get_model(self.config)),
            denoise_timesteps=int(self.config.denoise_timesteps),
        )


def load_model(
    workdir: str, step: int, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, field: str
) -> LoadedRun:
    """Restores the model of the run in `workdir` onto `mesh` with `config`'s sharding rules.

    Args:
      workdir: the other run's directory. step: its checkpoint step, 0 = newest.
      config: the current run's config (mesh and sharding rules). mesh: the current mesh.
      field: what named `workdir` in error messages, e.g. 'config.teacher.workdir', '--workdir'.

    Raises:
      TeacherError: the directory holds no checkpoint or it cannot be restored.
    """
    directory = checkpoint.checkpoint_dir(workdir)
    if not workdir or not directory.exists():
        raise TeacherError(
            f"{field} = {workdir!r} is not a training run: there is no {directory}. Give "
            "the --workdir of a finished run (python -m shortcut_jax.main ... --workdir DIR)."
        )
    manager = checkpoint.make_manager(workdir)
    try:
        saved = sorted(manager.all_steps())
        if not saved:
            raise TeacherError(f"{field} = {workdir!r} has no checkpoint in {directory}.")
        chosen = saved[-1] if not step else int(step)
        if chosen not in saved:
            raise TeacherError(
                f"{field} = {workdir!r} has no checkpoint at step {chosen}; saved: {saved}."
            )
        run_config = checkpoint.restore_config(workdir, chosen)
        layout = run_config.copy_and_resolve_references()
        layout.mesh = config.mesh
        layout.sharding_rules = config.get("sharding_rules", layout.sharding_rules)
        model = models.get_model(layout)
        abstract, _ = sharded_abstract_state(layout, model, optim.make_optimizer(layout), mesh)
        wanted = {"params": abstract.params, "ema_params": abstract.ema_params}
        try:
            state = checkpoint.restore_fields(manager, chosen, wanted)
        except checkpoint.CheckpointError as error:
            raise TeacherError(f"{field} = {workdir!r}: {error}") from error
    finally:
        manager.close()
    raw, ema = state["params"], state["ema_params"]
    params = ema if run_config.get("sample_use_ema", True) else raw
    return LoadedRun(run_config, params, chosen, checksum(params), str(workdir), raw, ema)


def checksum(params: Any) -> str:
    """A checksum of a parameter tree, the same on every mesh and process.

    Each leaf's float bits are reduced on device with wrap-around uint32 arithmetic (exact in any
    reduction order), then the per-leaf values and paths are hashed with SHA-256.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    digest = hashlib.sha256()
    for path, leaf in leaves:
        value = np.asarray(jax.device_get(_fingerprint(leaf)))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(leaf.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


@jax.jit
def _fingerprint(leaf: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(leaf.astype(jnp.float32), jnp.uint32).reshape(-1)
    position = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits * position), jnp.sum(bits ^ position)])


def check_fits(config: ml_collections.ConfigDict, run: LoadedRun, field: str) -> None:
    """Refuses a run whose data (shape, classes) does not fit the current run's."""
    ours, theirs = latent_space.model_shape(config), latent_space.model_shape(run.config)
    if tuple(ours) != tuple(theirs):
        raise TeacherError(
            f"{field} = {run.workdir!r} models examples of shape {tuple(theirs)}, this run "
            f"{tuple(ours)}: use a run trained on the same data (data.image_size, data.channels, "
            "data.dim, vae)."
        )
    if int(run.config.data.num_classes) != int(config.data.num_classes):
        raise TeacherError(
            f"{field} = {run.workdir!r} has data.num_classes = "
            f"{run.config.data.num_classes}, this run {config.data.num_classes}: they must match."
        )


def load_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> LoadedRun:
    """The frozen teacher run `config.teacher.workdir` at `config.teacher.step` on `mesh`.

    Raises:
      TeacherError: naming config.teacher.workdir when it is missing, not a run, its data shape
        does not fit, or it is not sampled with velocity (Euler) steps.
    """
    run = load_model(
        str(config.teacher.workdir),
        int(config.teacher.step),
        config,
        mesh,
        "config.teacher.workdir",
    )
    check_fits(config, run, "config.teacher.workdir")
    if objectives.get(run.config.objective).sampler is not objectives.EULER:
        raise TeacherError(
            f"config.teacher.workdir = {run.workdir!r} was trained with objective "
            f"{run.config.objective!r}, whose network is not a velocity field; use a "
            "flow_matching, shortcut or reflow run."
        )
    return run


def init_source(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(workdir, field) the student starts from, or ('', '') for a fresh initialisation."""
    if config.get("init_from"):
        return str(config.init_from), "config.init_from"
    objective = objectives.get(config.objective)
    if objective.student_starts_as_teacher and config.teacher.init_student:
        return str(config.teacher.workdir), "config.teacher.workdir"
    return "", ""


def initialise_from(
    config: ml_collections.ConfigDict, state: TrainState, mesh: jax.sharding.Mesh
) -> TrainState:
    """`state` started from another run (see `init_source`); unchanged when there is none.

    From `config.init_from` the run continues as a fine-tune: params from its params, the EMA and
    an EMA teacher / target network from its EMA. From the teacher run (progressive distillation)
    the student is a copy of the teacher: all three from the teacher's model (what is distilled).

    Raises:
      TeacherError: naming the field when the run is missing or its parameters do not fit.
    """
    workdir, field = init_source(config)
    if not workdir:
        return state
    step = int(config.teacher.step) if field == "config.teacher.workdir" else 0
    run = load_model(workdir, step, config, mesh, field)
    check_fits(config, run, field)
    ours = jax.tree.map(lambda x: (x.shape, x.dtype), state.params)
    theirs = jax.tree.map(lambda x: (x.shape, x.dtype), run.params)
    if jax.tree.structure(ours) != jax.tree.structure(theirs) or ours != theirs:
        raise TeacherError(
            f"{field} = {workdir!r}: its parameters (model {dict(run.config.model)}) do not "
            f"have the shapes of this run's (model {dict(config.model)}); use the same "
            "config.model"
            + (
                ", or config.teacher.init_student = False for a fresh student."
                if field == "config.teacher.workdir"
                else "."
            )
        )

    def placed(tree: Any) -> Any:
        return jax.tree.map(
            lambda source, target: jax.device_put(jnp.copy(source), target.sharding),
            tree,
            state.params,
        )

    copy_teacher = field == "config.teacher.workdir"
    params = run.params if copy_teacher else run.raw_params
    averaged = run.params if copy_teacher else run.ema_params
    return state.replace(
        params=placed(params),
        ema_params=placed(averaged),
        teacher_params=None if state.teacher_params is None else placed(averaged),
    )


def record_or_check(config: ml_collections.ConfigDict, workdir: str, run: LoadedRun) -> None:
    """Writes WORKDIR/teacher.json at the first start; on a resume refuses a changed teacher."""
    path = checkpoint.workdir_path(workdir) / RECORD_NAME
    record = {"workdir": run.workdir, "step": run.step, "checksum": run.checksum}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("step") != run.step or saved.get("checksum") != run.checksum:
            raise TeacherError(
                f"config.teacher.workdir = {run.workdir!r} changed since this run started: "
                f"{path} records step {saved.get('step')} checksum {saved.get('checksum')}, it "
                f"now gives step {run.step} checksum {run.checksum}. Set config.teacher.step = "
                f"{saved.get('step')}, restore the teacher run, or train in a new workdir."
            )
        return
    if jax.process_index() == 0:
        atomic_files.write_json(path, record)


def prepare(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    resumed: bool,
) -> tuple[objectives.TeacherRun | None, TrainState]:
    """What the loop needs before training: the frozen teacher (None when the objective has none)
    and the state, initialised from `config.init_from` (or the teacher) on a fresh run."""
    teacher = None
    if objectives.get(config.objective).needs_teacher_run:
        run = load_teacher(config, mesh)
        record_or_check(config, workdir, run)
        teacher = run.as_teacher()
    if not resumed:
        state = initialise_from(config, state, mesh)
    return teacher, state


def shardings(teacher: objectives.TeacherRun | None) -> Any:
    """The in_shardings entry of the teacher's parameters (None without a teacher)."""
    if teacher is None:
        return None
    return jax.tree.map(lambda x: x.sharding, teacher.params)


def bind(train_step: Callable[..., Any], teacher: objectives.TeacherRun | None) -> Callable:
    """(state, batch) -> train_step(state, batch, teacher params or None)."""
    params = None if teacher is None else teacher.params

    def bound(state: TrainState, batch: Any) -> Any:
        return train_step(state, batch, params)

    return bound
