"""benchmarks/official_comparison.py without the official code: cases, flags, parsing, report.

One test runs our worker in a fresh process (2 timed steps of the MNIST default step).
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "official_comparison.py"


def _load():
    spec = importlib.util.spec_from_file_location("official_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


oc = _load()

TRAIN_PY = textwrap.dedent(
    """
    import ml_collections

    model_config = ml_collections.ConfigDict({'lr': 0.1, 'depth': 2, 'cfg_scale': 4.0})

    def main(_):
        offset = 1

        @decorate
        def update(x, scale=2):
            return x * scale + offset

        return update
    """
)


def test_default_cases_are_conditional_32_and_unconditional_32_and_64():
    names = [case.name for case in oc.parse_cases(None, False, False)]
    assert names == ["conditional_b32", "unconditional_b32", "unconditional_b64"]


def test_kinds_and_batch_sizes_choose_the_cases():
    assert [c.name for c in oc.parse_cases("32,64", False, True)] == [
        "unconditional_b32",
        "unconditional_b64",
    ]
    assert [c.name for c in oc.parse_cases(None, True, False)] == ["conditional_b32"]
    assert len(oc.parse_cases("64", False, False)) == 2  # both kinds at batch 64


@pytest.mark.parametrize("sizes", ["30", "32,x", "0", "-8"])
def test_a_batch_size_that_is_not_a_multiple_of_8_is_one_error(sizes):
    with pytest.raises(ValueError, match="--batch_sizes"):
        oc.parse_cases(sizes, True, False)


def test_official_flags_build_our_mnist_default():
    case = oc.Case(True, 32)
    config = oc.our_config(case)
    flags = oc.official_flags(config, case)
    model = flags["model"]
    assert flags["batch_size"] == 32 and flags["image_shape"] == [28, 28, 1]
    assert (model["hidden_size"], model["depth"], model["num_heads"]) == (128, 4, 4)
    assert (model["patch_size"], model["mlp_ratio"]) == (4, 4.0)
    assert (model["lr"], model["weight_decay"]) == (config.optim.learning_rate, 0.1) == (2e-3, 0.1)
    assert (model["bootstrap_every"], model["denoise_timesteps"]) == (4, 128)
    assert model["num_classes"] == 10 and model["cfg_scale"] != 0  # cfg_scale 0 = unconditional
    assert model["use_stable_vae"] == 0 and model["train_type"] == "shortcut"


def test_unconditional_follows_their_readme_recipe():
    case = oc.Case(False, 64)
    config = oc.our_config(case)
    assert config.data.num_classes == 0 and config.batch_size == 64
    model = oc.official_flags(config, case)["model"]
    assert (model["num_classes"], model["class_dropout_prob"], model["cfg_scale"]) == (1, 1.0, 0.0)


def test_update_and_model_config_are_read_from_train_py():
    assert oc.extract_model_config(TRAIN_PY) == {"lr": 0.1, "depth": 2, "cfg_scale": 4.0}
    source = oc.extract_update_source(TRAIN_PY)
    assert source.startswith("@decorate\ndef update(x, scale=2):")
    namespace = {"decorate": lambda fn: fn, "offset": 10}
    exec(source, namespace)
    assert namespace["update"](3) == 16


def test_a_train_py_without_update_or_model_config_is_one_error():
    with pytest.raises(ValueError, match="update"):
        oc.extract_update_source("def main(_):\n    return 1\n")
    with pytest.raises(ValueError, match="model_config"):
        oc.extract_model_config("x = 1\n")


def test_a_flag_their_model_config_lacks_is_refused():
    assert oc.merged_model_config({"lr": 0.1, "depth": 2}, {"lr": 0.5}) == {"lr": 0.5, "depth": 2}
    with pytest.raises(ValueError, match="hidden"):
        oc.merged_model_config({"lr": 0.1}, {"hidden": 3})


def test_official_dir_without_a_file_names_it(tmp_path):
    (tmp_path / "model.py").write_text("")
    with pytest.raises(ValueError, match=r"--official_dir=.*math_utils\.py"):
        oc.check_official_dir(str(tmp_path))
    for name in oc.OFFICIAL_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert oc.check_official_dir(str(tmp_path)) == tmp_path.resolve()


def test_cli_needs_official_dir_and_positive_counts(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        oc.parse_args(["--rounds", "1"])
    assert error.value.code == 2 and "--official_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        oc.parse_args(["--official_dir", str(tmp_path), "--steps", "0"])
    assert "--steps=0" in capsys.readouterr().err


def test_worker_output_is_the_last_marker_line():
    stdout = (
        f'DiT: Input of shape\n{oc.RESULT_MARKER}{{"a": 1}}\nnoise\n{oc.RESULT_MARKER}{{"a": 2}}'
    )
    assert oc.parse_worker_output(stdout) == {"a": 2}
    with pytest.raises(ValueError, match="no result line"):
        oc.parse_worker_output("DiT: Input of shape (1, 28, 28, 1)\n")


def test_throughput_of_chunks():
    result = oc.chunk_throughput([(10, 1.0), (10, 2.0), (5, 0.5)], batch_size=32)
    assert result["chunk_images_per_second"] == [320.0, 160.0, 320.0]
    assert result["images_per_second_median"] == 320.0
    assert result["images_per_second_overall"] == pytest.approx(25 * 32 / 3.5)
    assert result["timed_steps"] == 25


def test_timed_steps_wait_every_block_and_at_the_end():
    import jax
    import numpy as np

    step = jax.jit(lambda state, batch: (state + batch.sum(), batch.mean()))
    chunks, first = oc.time_train_steps(
        step, np.float32(0), [np.ones(4, np.float32)], lambda b: b, 2, 7, 3
    )
    assert [steps for steps, _ in chunks] == [3, 3, 1]
    assert first > 0 and all(seconds > 0 for _, seconds in chunks)


def test_sides_alternate_between_rounds():
    assert oc.side_order(0) == ("ours", "official")
    assert oc.side_order(1) == ("official", "ours")


def _entry(round_index, side, rate, case="conditional_b32"):
    return {"round": round_index, "case": case, "side": side, "images_per_second_median": rate}


def test_ratios_are_per_round_and_the_report_shows_them():
    rounds = [
        _entry(0, "ours", 200.0),
        _entry(0, "official", 100.0),
        _entry(1, "official", 100.0),
        _entry(1, "ours", 300.0),
        _entry(2, "ours", 999.0),  # a round without its official side is left out
    ]
    summary = oc.summarize_case(rounds, "conditional_b32")
    assert summary["ratio_per_round"] == [2.0, 3.0] and summary["ratio_median"] == 2.5
    assert summary["ours_images_per_second_median"] == 250.0
    assert oc.summarize_case(rounds, "unconditional_b64") == {"rounds": 0}
    side = {"params": 1_324_816, "flops_per_step": 8.9e9}
    results = {
        "cases": {"conditional_b32": {"ours": side, "official": side, "summary": summary}},
        "matmul": {"start": {"gflops_median": 50.0}, "end": {"gflops_median": 48.0}},
        "meta": {
            "date": "today",
            "cpu": "cpu",
            "cores": 2,
            "versions": {"jax": "0.10.2"},
            "load_average_1_5_15_min_at_start": [0.1, 0.1, 0.1],
        },
        "settings": {
            "rounds": 2,
            "steps": 300,
            "warmup": 10,
            "block_every": 10,
            "official_dtype": "ours",
            "official_malloc_tuning": False,
        },
    }
    table = oc.report(results)
    assert "| conditional_b32 | 250 | 100 | 2.00, 3.00 | **2.50x** |" in table
    assert (
        "1,324,816 / 1,324,816" in table and "50.0 GFLOP/s at the start, 48.0 at the end" in table
    )


def test_our_worker_times_the_real_train_step():
    spec = {"warmup": 1, "steps": 2, "block_every": 1, "conditional": False, "batch_size": 16}
    result = oc.run_worker("ours", spec)
    assert result["timed_steps"] == 2 and len(result["chunk_images_per_second"]) == 2
    assert result["images_per_second_median"] > 0 and result["flops_per_step"] > 0
    assert 1_000_000 < result["params"] < 1_500_000  # the MNIST default DiT (~1.3 M)
    assert isinstance(result["malloc_tuned"], bool)
