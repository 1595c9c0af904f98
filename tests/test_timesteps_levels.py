"""How bootstrap levels and flow-part times are drawn: each scheme's distribution, and the
defaults drawing exactly what every run drew before the schemes existed."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from shortcut_jax import timesteps
from shortcut_jax.timesteps import TimeSampling

T = 128  # 7 student levels, 0 (one step) .. 6
LEVELS = timesteps.num_levels(T)


def level_histogram(sampling: TimeSampling, progress: float, count: int = 20_000, finest=0):
    log_weights = timesteps.level_log_weights(sampling, T, progress)
    d_level, t = timesteps.sample_bootstrap_levels_and_times(
        jax.random.PRNGKey(0), count, T, finest_count=finest, log_weights=log_weights
    )
    return np.bincount(np.asarray(d_level), minlength=LEVELS) / count, d_level, t


def test_uniform_is_todays_randint_draw_bit_for_bit():
    assert timesteps.level_log_weights(TimeSampling(), T) is None
    rng = jax.random.PRNGKey(7)
    d_level, t = timesteps.sample_bootstrap_levels_and_times(rng, 64, T)
    level_rng, time_rng = jax.random.split(rng)
    expected = jax.random.randint(level_rng, (64,), 0, LEVELS)
    np.testing.assert_array_equal(d_level, expected)
    sections = 2 ** np.asarray(expected)
    index = np.minimum(
        np.floor(np.asarray(jax.random.uniform(time_rng, (64,))) * sections), sections - 1
    )
    np.testing.assert_array_equal(t, (index / sections).astype(np.float32))


def test_coarse_halves_the_share_of_each_finer_level():
    share, _, _ = level_histogram(TimeSampling(levels="coarse"), 0.0)
    expected = 2.0 ** -np.arange(LEVELS)
    expected /= expected.sum()
    np.testing.assert_allclose(share, expected, atol=0.01)
    assert share[0] > 0.45  # about half of the examples train the one-step level


@pytest.mark.parametrize(
    "progress, coarsest",
    [(0.0, LEVELS - 1), (0.25, 3), (0.5, 0), (0.9, 0)],  # fraction 0.5: level k opens at (6-k)/12
)
def test_the_curriculum_opens_levels_from_fine_to_coarse(progress, coarsest):
    sampling = TimeSampling(levels="curriculum", curriculum_fraction=0.5)
    share, _, _ = level_histogram(sampling, progress)
    assert share[:coarsest].sum() == 0.0
    open_levels = LEVELS - coarsest
    np.testing.assert_allclose(share[coarsest:], 1.0 / open_levels, atol=0.015)


def test_times_stay_on_the_grid_of_each_drawn_level():
    _, d_level, t = level_histogram(TimeSampling(levels="coarse"), 0.0, count=4096)
    sections = 2.0 ** np.asarray(d_level)
    np.testing.assert_array_equal(np.asarray(t) * sections, np.floor(np.asarray(t) * sections))
    assert np.all((np.asarray(t) >= 0) & (np.asarray(t) < 1))


def test_guided_examples_stay_finest_and_the_rest_follow_the_scheme():
    sampling = TimeSampling(levels="curriculum", curriculum_fraction=0.5)
    _, d_level, _ = level_histogram(sampling, 0.0, count=64, finest=8)
    assert np.all(np.asarray(d_level) == LEVELS - 1)  # no coarser level open yet
    share, d_level, _ = level_histogram(TimeSampling(levels="coarse"), 0.0, count=8000, finest=1000)
    assert np.all(np.asarray(d_level[:1000]) == LEVELS - 1)
    rest = np.bincount(np.asarray(d_level[1000:]), minlength=LEVELS) / 7000
    expected = 2.0 ** -np.arange(LEVELS - 1)
    np.testing.assert_allclose(rest[:-1], expected / expected.sum(), atol=0.015)


def test_flow_times_default_to_the_grid_and_logit_normal_has_its_median_and_spread():
    rng = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(
        timesteps.flow_times(rng, 256, T, TimeSampling()), timesteps.sample_flow_times(rng, 256, T)
    )
    sampling = TimeSampling(flow_time="logit_normal", flow_time_mean=0.5, flow_time_std=1.2)
    t = np.asarray(timesteps.flow_times(rng, 50_000, T, sampling))
    assert np.all((t > 0) & (t < 1))
    logit = np.log(t / (1 - t))
    assert abs(np.mean(logit) - 0.5) < 0.03 and abs(np.std(logit) - 1.2) < 0.03
    # Continuous: not on the 1/T grid (a grid time would have t * T integral).
    assert np.mean(np.isclose(t * T, np.round(t * T))) < 0.01


def test_unknown_schemes_are_refused_with_their_field():
    with pytest.raises(ValueError, match="bootstrap_levels"):
        timesteps.level_log_weights(TimeSampling(levels="fine"), T)
    with pytest.raises(ValueError, match="flow_time"):
        timesteps.flow_times(jax.random.PRNGKey(0), 4, T, TimeSampling(flow_time="beta"))


def test_the_sampling_is_read_from_the_objective_settings():
    from shortcut_jax import configs
    from shortcut_jax.objectives import ObjectiveConfig

    config = configs.base_config()
    assert TimeSampling.from_settings(ObjectiveConfig.from_config(config)) == TimeSampling()
    config.bootstrap_levels, config.bootstrap_curriculum_fraction = "curriculum", 0.3
    config.flow_time, config.flow_time_mean, config.flow_time_std = "logit_normal", 0.4, 2.0
    assert TimeSampling.from_settings(ObjectiveConfig.from_config(config)) == TimeSampling(
        "curriculum", 0.3, "logit_normal", 0.4, 2.0
    )
