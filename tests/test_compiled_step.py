"""The one compiled train step: it sums the metrics on the device and leaves the state alone."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import numpy as np
from tiny import tiny_mnist_config

from shortcut_jax import compiled_step, data, models, optim, sharding, steps
from shortcut_jax.state import init_state, sharded_abstract_state


def _setup():
    config = tiny_mnist_config(3)
    mesh = sharding.make_mesh(config)
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    abstract, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    make_state = jax.jit(
        functools.partial(init_state, config, model, optimizer), out_shardings=state_sharding
    )
    host = data.get_source(config).iterate(0)
    batches = [sharding.global_batch(mesh, next(host)) for _ in range(3)]
    step = compiled_step.build(config, mesh, model, optimizer, state_sharding)
    plain = jax.jit(steps.make_train_step(config, model, optimizer))
    return SimpleNamespace(
        step=step, plain=plain, make_state=make_state, abstract=abstract, batches=batches
    )


def test_sums_are_the_per_step_metrics_added_and_the_state_is_the_plain_steps():
    run = _setup()
    step, plain, make_state, batches = run.step, run.plain, run.make_state, run.batches

    state = make_state()
    sums = step.zero_sums(state, batches[0])
    for batch in batches:
        state, sums, loss = step(state, sums, batch)

    reference, per_step = make_state(), []
    for batch in batches:
        reference, metrics = plain(reference, batch)
        per_step.append(metrics)
    expected = jax.tree.map(lambda *values: sum(np.asarray(v) for v in values), *per_step)

    assert jax.tree.structure(sums) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(sums), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert float(np.asarray(sums["loss"][1])) == 3 * 16  # one count per example
    for name in ("grad_norm", "learning_rate"):
        assert float(np.asarray(sums[name][1])) == 3.0, name  # one count per step
    np.testing.assert_array_equal(np.asarray(loss[0]), np.asarray(per_step[-1]["loss"][0]))
    # The sums never touch the state: it is the plain step's, bit for bit.
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_zero_sums_restart_the_sums_and_the_program_compiles_once():
    run = _setup()
    step, make_state, batches = run.step, run.make_state, run.batches
    state = make_state()
    sums = step.zero_sums(state, batches[0])
    state, sums, _ = step(state, sums, batches[0])
    sums = step.zero_sums(state, batches[1])
    assert all(float(np.asarray(leaf)) == 0.0 for leaf in jax.tree.leaves(sums))
    state, sums, loss = step(state, sums, batches[1])
    assert float(np.asarray(sums["loss"][1])) == float(np.asarray(loss[1])) > 0
    np.testing.assert_array_equal(np.asarray(sums["loss"][0]), np.asarray(loss[0]))
    assert step.program._cache_size() == 1


def test_an_ahead_of_time_compiled_program_runs_the_same_step():
    run = _setup()
    step, make_state, batches = run.step, run.make_state, run.batches
    compiled = step.with_program(step.lower(run.abstract, batches[0]).compile())

    state_a, state_b = make_state(), make_state()
    sums_a, sums_b = step.zero_sums(state_a, batches[0]), compiled.zero_sums(state_b, batches[0])
    state_a, sums_a, _ = step(state_a, sums_a, batches[0])
    state_b, sums_b, _ = compiled(state_b, sums_b, batches[0])
    for got, want in zip(jax.tree.leaves(sums_b), jax.tree.leaves(sums_a), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(state_b.step), np.asarray(state_a.step))
