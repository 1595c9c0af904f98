"""The shortcut objective's recipe knobs: level draws, per-level loss weights and flow-part times
reach its regression batch; the defaults build today's targets; the config checker names each
field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax import config_lib, configs, objectives, timesteps
from shortcut_jax.objectives import ObjectiveConfig
from shortcut_jax.objectives.shortcut import level_loss_weights, shortcut_targets


def settings(**overrides) -> ObjectiveConfig:
    fields = dict(
        name="shortcut",
        denoise_timesteps=8,  # student levels 0, 1, 2
        bootstrap_every=2,
        bootstrap_cfg=False,
        cfg_scale=1.5,
        class_dropout_prob=0.0,
        target_clip=0.0,
        num_classes=10,
        total_steps=100,
    )
    fields.update(overrides)
    return ObjectiveConfig(**fields)


def linear_teacher(params, x, t, d, labels):
    return params * x + (t + d + 0.1 * labels)[:, None]


BATCH = {"image": jnp.linspace(-1, 1, 64 * 3).reshape(64, 3), "label": jnp.arange(64) % 10}


def build(step=0, **overrides):
    regression, _ = shortcut_targets(
        linear_teacher, 0.5, BATCH, jax.random.PRNGKey(4), settings(**overrides), step
    )
    return regression


def test_default_targets_draw_levels_and_times_exactly_as_before():
    regression = build()
    _, _, boot_rng, flow_rng = jax.random.split(jax.random.PRNGKey(4), 4)
    level_rng, _ = jax.random.split(boot_rng)
    expected_levels = jax.random.randint(level_rng, (32,), 0, 3)
    np.testing.assert_array_equal(regression.d[:32], timesteps.step_size(expected_levels))
    np.testing.assert_array_equal(regression.t[32:], timesteps.sample_flow_times(flow_rng, 32, 8))
    np.testing.assert_array_equal(regression.weight, np.ones(64, np.float32))


def test_level_weights_weigh_each_bootstrap_example_by_its_level():
    regression = build(bootstrap_level_weights=(3.0, 2.0, 0.5))
    levels = -np.log2(np.asarray(regression.d[:32])).astype(int)
    np.testing.assert_array_equal(regression.weight[:32], np.array([3.0, 2.0, 0.5])[levels])
    np.testing.assert_array_equal(regression.weight[32:], 1.0)  # the flow part is unweighted
    np.testing.assert_array_equal(
        level_loss_weights(jnp.array([2, 0]), settings()), np.ones(2, np.float32)
    )


def test_the_curriculum_follows_the_step_and_coarse_favours_one_step():
    early = build(step=0, bootstrap_levels="curriculum", bootstrap_curriculum_fraction=0.5)
    np.testing.assert_array_equal(early.d[:32], 0.25)  # only the finest student level (2)
    late = build(step=60, bootstrap_levels="curriculum", bootstrap_curriculum_fraction=0.5)
    assert set(np.asarray(late.d[:32]).tolist()) == {1.0, 0.5, 0.25}
    coarse = build(bootstrap_levels="coarse")
    assert np.sum(np.asarray(coarse.d[:32]) == 1.0) > np.sum(np.asarray(coarse.d[:32]) == 0.25)


def test_logit_normal_flow_times_leave_the_bootstrap_part_on_its_grid():
    regression = build(flow_time="logit_normal", flow_time_mean=1.0)
    flow_t = np.asarray(regression.t[32:])
    assert np.all((flow_t > 0) & (flow_t < 1)) and np.mean(flow_t) > 0.6
    np.testing.assert_array_equal(regression.d[32:], 1.0 / 8)
    np.testing.assert_array_equal(regression.t[:32], build().t[:32])


# ----------------------------------------------------------------------------- config


def check(**fields):
    config = configs.base_config()
    for name, value in fields.items():
        with config.ignore_type():
            config[name] = value
    config_lib.validate(config, device_count=1, check_files=False)


@pytest.mark.parametrize(
    "field, value",
    [
        ("bootstrap_levels", "fine"),
        ("bootstrap_curriculum_fraction", 0.0),
        ("bootstrap_curriculum_fraction", 1.5),
        ("bootstrap_level_weights", (1.0, 2.0)),  # 7 levels for 128 steps
        ("bootstrap_level_weights", (0.0,) * 7),
        ("bootstrap_level_weights", (1.0,) * 6 + (-1.0,)),
        ("bootstrap_level_weights", (True,) * 7),
        ("flow_time", "uniform"),
        ("flow_time_mean", "0"),
        ("flow_time_std", 0.0),
    ],
)
def test_bad_recipe_values_are_refused_naming_the_field(field, value):
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{field} = "):
        check(**{field: value})


def test_the_defaults_and_good_values_pass():
    check()
    good = {
        "bootstrap_levels": "curriculum",
        "bootstrap_curriculum_fraction": 1.0,
        "bootstrap_level_weights": (2, 1.5, 1, 1, 1, 1, 1),
        "flow_time": "logit_normal",
        "flow_time_mean": -0.4,
        "flow_time_std": 0.8,
    }
    for field, value in good.items():
        check(**{field: value})


def test_the_run_config_reaches_the_objective():
    config = configs.base_config()
    config.bootstrap_levels = "coarse"
    config.bootstrap_level_weights = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    config.flow_time = "logit_normal"
    config.flow_time_std = 0.8
    objective_config = ObjectiveConfig.from_config(config)
    sampling = timesteps.TimeSampling.from_settings(objective_config)
    assert sampling.levels == "coarse" and sampling.flow_time == "logit_normal"
    assert sampling.flow_time_std == 0.8
    weights = level_loss_weights(jnp.array([0, 1]), objective_config)
    np.testing.assert_array_equal(weights, [2.0, 1.0])
    assert objectives.get("shortcut").build_targets is shortcut_targets
