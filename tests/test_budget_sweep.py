"""The budget sweep's parsing of variants and of a run's logged throughput (no training here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import budget_sweep  # noqa: E402


def test_a_variant_is_a_name_and_config_overrides():
    name, overrides = budget_sweep.parse_variant("b64:batch_size=64, optim.learning_rate=1e-3")
    assert name == "b64"
    assert overrides == {"batch_size": "64", "optim.learning_rate": "1e-3"}


@pytest.mark.parametrize("text", ["no_overrides", ":total_steps=10", "x:total_steps"])
def test_a_malformed_variant_is_refused_with_its_text(text):
    with pytest.raises(ValueError, match="--variant"):
        budget_sweep.parse_variant(text)


def test_images_per_second_is_the_median_of_the_logged_intervals(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "[100] loss=0.3, perf/images_per_second=240.5, perf/steps_per_second=7.5\n"
        "unrelated line\n"
        "[200] loss=0.2, perf/images_per_second=260.5\n"
        "[300] perf/images_per_second=1e3\n"
    )
    assert budget_sweep.images_per_second(log) == 260.5
    (tmp_path / "empty.log").write_text("no metrics\n")
    assert budget_sweep.images_per_second(tmp_path / "empty.log") is None
