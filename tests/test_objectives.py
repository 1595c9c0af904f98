"""The targets of the objectives equal their definitions, computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax import objectives, timesteps
from shortcut_jax.objectives import ObjectiveConfig
from shortcut_jax.objectives.shortcut import bootstrap_targets, teacher_velocity


def make_settings(**overrides) -> ObjectiveConfig:
    fields = dict(
        name="shortcut",
        denoise_timesteps=8,
        bootstrap_every=4,
        bootstrap_cfg=False,
        cfg_scale=1.5,
        class_dropout_prob=0.0,
        target_clip=0.0,
        num_classes=10,
    )
    fields.update(overrides)
    return ObjectiveConfig(**fields)


def linear_teacher(params, x, t, d, labels):
    """A teacher whose velocity depends on x, t, d and y, so every input is exercised."""
    expand = (slice(None),) + (None,) * (x.ndim - 1)
    return params["a"] * x + (t + d + 0.1 * labels)[expand]


# ----------------------------------------------------------------------------- time grids


def test_levels_of_128_denoise_timesteps():
    assert timesteps.num_levels(128) == 7
    assert timesteps.flow_level(128) == 7
    np.testing.assert_allclose(
        timesteps.step_size(jnp.arange(8)),
        [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128],
    )


@pytest.mark.parametrize("bad", [0, 3, 100, 6.0])
def test_num_levels_rejects_non_powers_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        timesteps.num_levels(bad)


def test_flow_times_lie_on_the_finest_grid():
    t = np.asarray(timesteps.sample_flow_times(jax.random.PRNGKey(0), 4096, 128))
    assert t.min() >= 0 and t.max() <= 127 / 128
    np.testing.assert_allclose(t * 128, np.round(t * 128), atol=1e-6)
    assert len(np.unique(t)) == 128


def test_bootstrap_times_lie_on_the_grid_of_their_step_and_all_levels_appear():
    d_level, t = timesteps.sample_bootstrap_levels_and_times(jax.random.PRNGKey(1), 20_000, 128)
    d_level, t = np.asarray(d_level), np.asarray(t)
    assert set(np.unique(d_level)) == set(range(7))
    sections = 2.0**d_level
    np.testing.assert_allclose(t * sections, np.round(t * sections), atol=1e-5)
    assert np.all(t + 1 / sections <= 1 + 1e-6)  # the student step 2d ends inside [0, 1]
    # Level 0 (one step of size 1) can only start at t = 0; level 6 uses all 64 start points.
    assert np.all(t[d_level == 0] == 0)
    assert len(np.unique(t[d_level == 6])) == 64


def test_every_level_is_drawn_even_with_a_tiny_bootstrap_part():
    """A bootstrap part of 4 examples (batch 32 / 8) still trains all 7 levels over steps."""
    seen = set()
    for step in range(40):
        d_level, _ = timesteps.sample_bootstrap_levels_and_times(jax.random.PRNGKey(step), 4, 128)
        seen.update(np.asarray(d_level).tolist())
    assert seen == set(range(7))


def test_interpolate_is_noise_at_zero_and_data_at_one():
    x0, x1 = jnp.zeros((3, 2, 2, 1)), jnp.ones((3, 2, 2, 1))
    x_t = timesteps.interpolate(x0, x1, jnp.array([0.0, 0.25, 1.0]))
    np.testing.assert_allclose(x_t[:, 0, 0, 0], [0.0, 0.25, 1.0])


# ----------------------------------------------------------------------------- flow matching


def test_flow_matching_regresses_x1_minus_x0_at_x_t():
    settings = make_settings()
    batch = {
        "image": jax.random.normal(jax.random.PRNGKey(2), (16, 4, 4, 1)),
        "label": jnp.arange(16) % 10,
    }
    rng = jax.random.PRNGKey(3)
    regression, _ = objectives.get("flow_matching").build_targets(None, None, batch, rng, settings)
    noise_rng = jax.random.split(rng, 4)[0]
    x0 = jax.random.normal(noise_rng, batch["image"].shape)
    np.testing.assert_allclose(regression.target, batch["image"] - x0, rtol=1e-6)
    t = regression.t[:, None, None, None]
    np.testing.assert_allclose(
        regression.x_t, (1 - t) * x0 + t * batch["image"], rtol=1e-5, atol=1e-6
    )
    assert not regression.is_bootstrap.any()
    np.testing.assert_array_equal(regression.labels, batch["label"])


def test_label_dropout_uses_the_null_class():
    settings = make_settings(class_dropout_prob=0.5)
    labels = jnp.zeros((4000,), jnp.int32)
    dropped = objectives.flow_matching.drop_labels(jax.random.PRNGKey(0), labels, settings)
    assert set(np.unique(np.asarray(dropped))) == {0, 10}
    assert 0.45 < float(jnp.mean(dropped == 10)) < 0.55
    unconditional = objectives.flow_matching.drop_labels(
        jax.random.PRNGKey(0), labels + 3, make_settings(num_classes=0)
    )
    assert np.all(np.asarray(unconditional) == 0)


# ----------------------------------------------------------------------------- shortcut


def test_bootstrap_target_is_mean_of_two_half_steps():
    params = {"a": 0.5}
    settings = make_settings()
    x_t = jnp.array([[1.0, -2.0], [0.5, 0.0]])
    t = jnp.array([0.0, 0.5])
    d_level = jnp.array([0, 1])  # student steps 1 and 1/2; teacher half steps 1/2 and 1/4
    labels = jnp.array([3, 10])
    target = bootstrap_targets(linear_teacher, params, x_t, t, d_level, labels, settings)

    expected = []
    for i in range(2):
        d = 2.0 ** -(int(d_level[i]) + 1)
        v1 = 0.5 * np.asarray(x_t[i]) + (float(t[i]) + d + 0.1 * int(labels[i]))
        x_mid = np.asarray(x_t[i]) + d * v1
        v2 = 0.5 * x_mid + (float(t[i]) + d + d + 0.1 * int(labels[i]))
        expected.append((v1 + v2) / 2)
    np.testing.assert_allclose(target, np.stack(expected), rtol=1e-6)


def test_bootstrap_target_is_exact_for_a_constant_velocity_field():
    settings = make_settings()
    constant = jnp.array([0.3, -0.7])

    def teacher(params, x, t, d, labels):
        return jnp.broadcast_to(constant, x.shape)

    x_t = jax.random.normal(jax.random.PRNGKey(0), (5, 2))
    target = bootstrap_targets(
        teacher, None, x_t, jnp.zeros(5), jnp.arange(5) % 3, jnp.zeros(5, int), settings
    )
    np.testing.assert_allclose(target, jnp.broadcast_to(constant, (5, 2)), rtol=1e-6)


def test_target_clipping_bounds_targets_and_the_intermediate_point():
    def teacher(params, x, t, d, labels):
        return 10.0 * jnp.ones_like(x) + x

    x_t = jnp.zeros((2, 3))
    args = (teacher, None, x_t, jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32))
    clipped = bootstrap_targets(*args, make_settings(target_clip=4.0))
    unclipped = bootstrap_targets(*args, make_settings(target_clip=0.0))
    np.testing.assert_allclose(clipped, 4.0)
    # Unclipped: v1 = 10, x_mid = 0 + 0.5 * 10 = 5, v2 = 15, mean 12.5.
    np.testing.assert_allclose(unclipped, 12.5)
    partly = bootstrap_targets(*args, make_settings(target_clip=4.5))
    np.testing.assert_allclose(partly, 4.5)


def test_guidance_inside_targets_guides_only_the_level_next_to_the_flow_level():
    def teacher(params, x, t, d, labels):
        label_term = jnp.where(labels == 10, 0.0, 1.0)  # null class -> 0, any class -> 1
        return jnp.zeros_like(x) + label_term[:, None]

    settings = make_settings(bootstrap_cfg=True, cfg_scale=3.0)  # denoise_timesteps 8: flow level 3
    x = jnp.zeros((3, 2))
    teacher_d = timesteps.step_size(jnp.array([3, 2, 3]))
    labels = jnp.array([4, 4, 10])
    v = teacher_velocity(teacher, None, x, jnp.zeros(3), teacher_d, labels, settings)
    # Level 3 (flow level), class 4: v_null + 3 (v_cond - v_null) = 0 + 3 * 1 = 3.
    # Level 2: already-guided level, no extra guidance: v_cond = 1. Null label: 0.
    np.testing.assert_allclose(v[:, 0], [3.0, 1.0, 0.0])
    unguided = teacher_velocity(teacher, None, x, jnp.zeros(3), teacher_d, labels, make_settings())
    np.testing.assert_allclose(unguided[:, 0], [1.0, 1.0, 0.0])


def test_a_fixed_count_of_bootstrap_examples_sits_at_the_guided_level():
    assert timesteps.guided_count(32, 128) == 5  # the paper's batch 256: 32 + 5 teacher rows
    assert timesteps.guided_count(4, 128) == 1
    assert timesteps.guided_count(14, 128) == 2
    d_level, t = timesteps.sample_bootstrap_levels_and_times(
        jax.random.PRNGKey(3), 20_000, 128, finest_count=2_900
    )
    d_level, t = np.asarray(d_level), np.asarray(t)
    np.testing.assert_array_equal(d_level[:2_900], 6)
    rest = d_level[2_900:]
    assert set(np.unique(rest)) == set(range(6))  # the coarser levels, each about 1/6 of the rest
    np.testing.assert_allclose(np.bincount(rest) / len(rest), 1 / 6, atol=0.015)
    sections = 2.0**d_level
    np.testing.assert_allclose(t * sections, np.round(t * sections), atol=1e-5)
    with pytest.raises(ValueError, match="finest_count"):
        timesteps.sample_bootstrap_levels_and_times(jax.random.PRNGKey(0), 4, 128, finest_count=5)


def test_the_null_branch_runs_only_for_the_guided_examples_and_gives_the_same_targets():
    rows = []

    def teacher(params, x, t, d, labels):
        rows.append(x.shape[0])
        return linear_teacher(params, x, t, d, labels) * jnp.where(labels == 10, 0.5, 1.0)[:, None]

    settings = make_settings(bootstrap_cfg=True, cfg_scale=2.0)  # 8 timesteps: 3 levels
    num_bootstrap = 7
    guided = timesteps.guided_count(num_bootstrap, 8)  # 3
    d_level, t = timesteps.sample_bootstrap_levels_and_times(
        jax.random.PRNGKey(5), num_bootstrap, 8, finest_count=guided
    )
    x_t = jax.random.normal(jax.random.PRNGKey(6), (num_bootstrap, 2))
    labels = jnp.array([1, 2, 10, 3, 4, 5, 6])
    args = (teacher, {"a": 0.3}, x_t, t, d_level, labels, settings)
    fast = bootstrap_targets(*args, guided)
    assert rows == [num_bootstrap + guided] * 2
    full = bootstrap_targets(*args)  # the null branch for every example, guidance by level
    assert rows[2:] == [2 * num_bootstrap] * 2
    np.testing.assert_allclose(fast, full, rtol=1e-6)
    unguided = bootstrap_targets(teacher, {"a": 0.3}, x_t, t, d_level, labels, make_settings())
    assert not np.allclose(fast[:guided], unguided[:guided])  # guidance did apply to them
    np.testing.assert_allclose(fast[guided:], unguided[guided:], rtol=1e-6)


@pytest.mark.parametrize("batch_size,bootstrap_every", [(32, 8), (8, 8), (24, 4), (6, 2)])
def test_every_example_reaches_the_loss(batch_size, bootstrap_every):
    settings = make_settings(bootstrap_every=bootstrap_every, denoise_timesteps=128)
    batch = {"image": jnp.ones((batch_size, 4, 4, 1)), "label": jnp.arange(batch_size) % 10}
    regression, metrics = objectives.get("shortcut").build_targets(
        linear_teacher, {"a": 0.1}, batch, jax.random.PRNGKey(0), settings
    )
    num_bootstrap = batch_size // bootstrap_every
    assert regression.x_t.shape[0] == batch_size == regression.target.shape[0]
    assert int(regression.is_bootstrap.sum()) == num_bootstrap
    assert bool(regression.is_bootstrap[:num_bootstrap].all())
    np.testing.assert_array_equal(regression.d[num_bootstrap:], 1 / 128)
    assert np.all(np.asarray(regression.d[:num_bootstrap]) >= 1 / 64)
    np.testing.assert_array_equal(regression.weight, 1.0)
    assert np.isfinite(float(metrics["bootstrap_target_rms"]))


def test_shortcut_flow_part_matches_flow_matching_definition():
    settings = make_settings(denoise_timesteps=128)
    batch = {
        "image": jax.random.normal(jax.random.PRNGKey(5), (16, 2)),
        "label": jnp.zeros(16, jnp.int32),
    }
    rng = jax.random.PRNGKey(6)
    regression, _ = objectives.get("shortcut").build_targets(
        linear_teacher, {"a": 0.0}, batch, rng, settings
    )
    x0 = jax.random.normal(jax.random.split(rng, 4)[0], (16, 2))
    flow = slice(4, None)
    np.testing.assert_allclose(regression.target[flow], (batch["image"] - x0)[flow], rtol=1e-6)
    t = regression.t[flow, None]
    np.testing.assert_allclose(
        regression.x_t[flow], (1 - t) * x0[flow] + t * batch["image"][flow], rtol=1e-5, atol=1e-6
    )
    # The bootstrap part starts from the same interpolation.
    t_b = regression.t[:4, None]
    np.testing.assert_allclose(
        regression.x_t[:4], (1 - t_b) * x0[:4] + t_b * batch["image"][:4], rtol=1e-5, atol=1e-6
    )


def test_shortcut_targets_carry_no_gradient_to_the_teacher():
    settings = make_settings(denoise_timesteps=8)
    batch = {"image": jnp.ones((8, 2)), "label": jnp.zeros(8, jnp.int32)}

    def bootstrap_target_sum(a):
        regression, _ = objectives.get("shortcut").build_targets(
            linear_teacher, {"a": a}, batch, jax.random.PRNGKey(0), settings
        )
        return jnp.sum(regression.target * regression.is_bootstrap[:, None])

    assert float(jax.grad(bootstrap_target_sum)(0.7)) == 0.0


def test_unknown_objective_names_the_field():
    with pytest.raises(ValueError, match="config.objective"):
        objectives.get("consistency_typo")


# ----------------------------------------------------------------------------- old runs


def test_a_run_saved_before_the_new_objectives_loads_with_their_defaults(tmp_path):
    from shortcut_jax import checkpoint, config_lib, configs

    old = configs.base_config()
    for section in ("meanflow", "diffusion", "consistency", "live_reflow"):
        del old[section]
    (tmp_path / "config.json").write_text(config_lib.to_json(old))
    restored = checkpoint.restore_config(str(tmp_path))
    settings = ObjectiveConfig.from_config(restored)
    assert settings.name == "shortcut" and settings.diffusion_schedule == "cosine"
    config_lib.validate(restored, device_count=1)


def test_registry_metadata_of_every_objective():
    euler = {"shortcut", "flow_matching", "live_reflow", "meanflow"}
    for name in euler:
        assert objectives.get(name).sampler is objectives.EULER
    assert objectives.get("diffusion").sampler is not objectives.EULER
    assert objectives.get("consistency_training").target_network
    assert not objectives.uses_ema_teacher(objectives.get("shortcut"), "params")
    assert objectives.uses_ema_teacher(objectives.get("shortcut"), "ema")
    assert not objectives.uses_ema_teacher(objectives.get("diffusion"), "ema")
