"""Training FLOPs of every method, from the compiled programs' cost analysis (not a script).

`train_step_flops(config)` compiles the run's train step for one CPU device from abstract inputs
(nothing runs) and counts its FLOPs with XLA's cost analysis, every while loop counted once per
trip (`hlo_loops.loop_corrected_flops`; XLA counts a loop body once, and live reflow integrates
its own flow in a loop). A conditional counts its costliest branch (XLA's rule; progressive
distillation's two branches, teacher run or previous student, cost the same). So the count holds
what a method really spends per step: the student's forward and backward passes, teacher
evaluations (bootstrap targets, distillation teachers, live reflow's flow), JVPs and guidance
branches, plus the optimizer and EMA updates.

`forward_flops(config, batch)` is one network forward pass on a batch: what a reflow pair costs per
teacher step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from shortcut_jax import (
    compiled_step,
    hlo_loops,
    models,
    objectives,
    optim,
    sharding,
    steps,
)
from shortcut_jax.state import sharded_abstract_state

EVERY_LOOP = r"."


def _one_device(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh = sharding.single_device_config().mesh
    return config


def _compiled_flops(compiled: Any) -> float:
    flops, _ = hlo_loops.loop_corrected_flops(compiled, compiled.cost_analysis(), EVERY_LOOP)
    return flops


def train_step_flops(config: ml_collections.ConfigDict) -> float:
    """FLOPs of one train step of `config` (its whole global batch), from the compiled program.

    A method with a teacher run gets an abstract teacher of the run's own model (the comparison's
    teachers are flow-matching runs of the same network).
    """
    config = _one_device(config)
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    abstract_state, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    objective = objectives.get(config.objective)
    teacher_run = None
    if objective.needs_teacher_run:
        teacher_run = objectives.TeacherRun(
            params=abstract_state.params,
            student=None,
            apply_fn=steps.make_apply_fn(model),
            denoise_timesteps=int(config.denoise_timesteps),
        )
    step = compiled_step.build(config, mesh, model, optimizer, state_sharding, teacher_run)
    example, _, _, _ = models.example_inputs(config, batch_size=int(config.batch_size))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    image = jax.ShapeDtypeStruct(example.shape, jnp.float32, sharding=replicated)
    batch = {
        "image": image,
        "label": jax.ShapeDtypeStruct((example.shape[0],), jnp.int32, sharding=replicated),
    }
    if objective.uses_pairs:
        batch["noise"] = image
    return _compiled_flops(step.lower(abstract_state, batch).compile())


def forward_flops(config: ml_collections.ConfigDict, batch_size: int) -> float:
    """FLOPs of one forward pass of the run's network on `batch_size` examples."""
    config = _one_device(config)
    model = models.get_model(config)
    x, t, d, labels = models.example_inputs(config, batch_size=batch_size)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, d, labels))["params"]
    apply_fn = steps.make_apply_fn(model)
    compiled = jax.jit(apply_fn).lower(params, x, t, d, labels).compile()
    return _compiled_flops(compiled)
