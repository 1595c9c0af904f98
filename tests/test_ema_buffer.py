"""One EMA buffer when the EMA teacher's rate is the sampling EMA's: same training, a copy less."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tiny import tiny_mnist_config

from shortcut_jax import checkpoint, compiled_step, models, objectives, optim, sharding, steps
from shortcut_jax.run_guard import state_bytes
from shortcut_jax.state import TrainState, init_state, sharded_abstract_state


def ema_teacher_config(teacher_rate: float = 0.9, ema_rate: float = 0.9):
    config = tiny_mnist_config(3)
    config.bootstrap_teacher = "ema"
    config.bootstrap_every = 2  # half the batch bootstraps, so the teacher weighs in the loss
    config.teacher_ema_rate = teacher_rate
    config.ema_rate = ema_rate  # fast EMAs: the teacher is far from params after a few steps
    config.mesh = sharding.single_device_config().mesh
    return config


def parts(config):
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    return model, optimizer


def batches(config, count: int) -> list[dict]:
    x, _, _, _ = models.example_inputs(config, batch_size=config.batch_size)
    keys = jax.random.split(jax.random.PRNGKey(7), count)
    return [
        {
            "image": np.asarray(jax.random.uniform(key, x.shape, minval=-1.0, maxval=1.0)),
            "label": np.asarray(
                jax.random.randint(key, (config.batch_size,), 0, config.data.num_classes)
            ),
        }
        for key in keys
    ]


def assert_trees_equal(a, b) -> None:
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))


def test_only_a_constant_teacher_rate_equal_to_ema_rate_shares_the_buffer():
    shortcut = objectives.get("shortcut")
    assert objectives.shares_ema_buffer(shortcut, ema_teacher_config(0.9, 0.9))
    assert not objectives.shares_ema_buffer(shortcut, ema_teacher_config(0.5, 0.9))
    params_teacher = ema_teacher_config(0.9, 0.9)
    params_teacher.bootstrap_teacher = "params"
    assert not objectives.shares_ema_buffer(shortcut, params_teacher)
    assert not objectives.keeps_teacher_buffer(shortcut, params_teacher)
    # A target network with a rate schedule keeps its own buffer even at equal config rates.
    scheduled = objectives.get("consistency_training")
    assert scheduled.teacher_ema_rate is not None
    assert not objectives.shares_ema_buffer(scheduled, ema_teacher_config(0.9, 0.9))
    assert objectives.keeps_teacher_buffer(scheduled, ema_teacher_config(0.9, 0.9))
    assert not objectives.shares_ema_buffer(objectives.get("flow_matching"), ema_teacher_config())


def test_shared_state_holds_one_parameter_copy_less():
    def abstract(config):
        model, optimizer = parts(config)
        return jax.eval_shape(functools.partial(init_state, config, model, optimizer))

    shared = abstract(ema_teacher_config(0.9, 0.9))
    separate = abstract(ema_teacher_config(0.5, 0.9))
    assert shared.teacher_params is None and separate.teacher_params is not None
    assert state_bytes(separate) - state_bytes(shared) == state_bytes(shared.params) > 0


def two_buffer_reference_step(config, model, optimizer):
    """The step of the two-buffer layout written out: a teacher EMA of its own, beside the EMA.

    Both EMAs take the update of `ema_params` (the pre-change teacher took its step size
    1 - rate in float32, a rounding-level difference the shared buffer does not reproduce).
    """
    objective = objectives.get(config.objective)
    settings = objectives.ObjectiveConfig.from_config(config)
    apply_fn = steps.make_apply_fn(model)
    loss_fn = steps.make_loss_fn(config, model)
    step_size = 1.0 - float(config.ema_rate)

    def step(state: TrainState, batch: dict) -> TrainState:
        rng = jax.random.fold_in(state.rng, state.step)
        regression, _ = objective.build_targets(
            apply_fn, state.teacher_params, batch, rng, settings, state.step
        )
        grads = jax.grad(lambda p: loss_fn(p, regression)[0])(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=optax.incremental_update(params, state.ema_params, step_size),
            teacher_params=optax.incremental_update(params, state.teacher_params, step_size),
        )

    return jax.jit(step)


def test_shared_buffer_trains_exactly_like_two_buffers():
    config = ema_teacher_config(0.9, 0.9)
    model, optimizer = parts(config)
    mesh = sharding.make_mesh(config)
    _, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    state = jax.jit(
        functools.partial(init_state, config, model, optimizer), out_shardings=state_sharding
    )()
    assert state.teacher_params is None
    reference = state.replace(teacher_params=jax.tree.map(jnp.copy, state.ema_params))
    reference = jax.tree.map(jnp.copy, reference)  # the train step donates the state's buffers
    train_step = compiled_step.build(config, mesh, model, optimizer, state_sharding)
    reference_step = two_buffer_reference_step(config, model, optimizer)
    sums = None
    for batch in batches(config, 3):
        if sums is None:
            sums = train_step.zero_sums(state, batch)
        state, sums, _ = train_step(state, sums, sharding.global_batch(mesh, batch))
        reference = reference_step(reference, batch)
    assert state.teacher_params is None and int(state.step) == 3
    assert_trees_equal(reference.teacher_params, reference.ema_params)
    assert_trees_equal(state.params, reference.params)
    assert_trees_equal(state.ema_params, reference.ema_params)
    assert_trees_equal(state.opt_state, reference.opt_state)
    # The teacher is no copy of params, so a step that took params as teacher would differ.
    difference = optax.global_norm(jax.tree.map(jnp.subtract, state.ema_params, state.params))
    assert float(difference) > 1e-3


def saved_and_restored(tmp_path, saved_config, restore_config, tweak):
    """Saves a fresh state of `saved_config` (changed by `tweak`) and restores it per the other."""
    model, optimizer = parts(saved_config)
    state = tweak(jax.jit(functools.partial(init_state, saved_config, model, optimizer))())
    manager = checkpoint.make_manager(str(tmp_path))
    checkpoint.save(manager, state, saved_config, 5)
    manager.close()
    manager = checkpoint.make_manager(str(tmp_path))  # a fresh one, as a resumed run has
    mesh = sharding.make_mesh(restore_config, jax.local_devices())
    model, optimizer = parts(restore_config)
    abstract, _ = sharded_abstract_state(restore_config, model, optimizer, mesh)
    restored = checkpoint.restore_state(manager, abstract, 5)
    manager.close()
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    return state, restored


def distinct_ema_and_teacher(state: TrainState) -> TrainState:
    return state.replace(
        step=state.step + 5,
        ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params),
        teacher_params=jax.tree.map(lambda x: x + 2.0, state.teacher_params),
    )


def test_a_two_buffer_checkpoint_restores_into_the_shared_layout(tmp_path):
    old, restored = saved_and_restored(
        tmp_path,
        ema_teacher_config(0.5, 0.9),
        ema_teacher_config(0.9, 0.9),
        distinct_ema_and_teacher,
    )
    assert old.teacher_params is not None and restored.teacher_params is None
    assert int(restored.step) == 5
    for field in ("params", "ema_params", "opt_state", "rng"):
        assert_trees_equal(getattr(restored, field), getattr(old, field))


def test_a_shared_checkpoint_gives_a_two_buffer_state_its_teacher_from_ema(tmp_path):
    def distinct_ema(state: TrainState) -> TrainState:
        return state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params))

    old, restored = saved_and_restored(
        tmp_path, ema_teacher_config(0.9, 0.9), ema_teacher_config(0.5, 0.9), distinct_ema
    )
    assert old.teacher_params is None
    assert_trees_equal(restored.teacher_params, old.ema_params)
    assert_trees_equal(restored.ema_params, old.ema_params)
    assert_trees_equal(restored.params, old.params)
    # Its own buffers: a donated step must not see the same buffer twice.
    for teacher, ema in zip(
        jax.tree.leaves(restored.teacher_params), jax.tree.leaves(restored.ema_params), strict=True
    ):
        assert teacher.unsafe_buffer_pointer() != ema.unsafe_buffer_pointer()


def test_a_scheduled_target_network_keeps_two_buffers():
    config = ema_teacher_config(0.9, 0.9)
    config.objective = "consistency_training"
    model, optimizer = parts(config)
    state = jax.eval_shape(functools.partial(init_state, config, model, optimizer))
    assert state.teacher_params is not None
