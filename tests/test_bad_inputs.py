"""Bad inputs give one clear error, and every output appears whole, locally and on buckets.

The CLI cases run `python -m shortcut_jax.sample/evaluate/tools.fid_stats` against a tiny run;
the bucket cases write to a real GCS API (the fake-gcs-server emulator of tests/conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from tiny import run_module, tiny_mnist_config

from shortcut_jax import atomic_files, cli_inputs, config_lib, train
from shortcut_jax.evaluators import features, fid, report, sweep


def toy_net(dim: int = 4) -> features.FeatureNet:
    """Features = a fixed projection of 2x2 average-pooled pixels."""

    def apply(params, images):
        pooled = jax.image.resize(images.mean(-1), (images.shape[0], 2, 2), "linear")
        return pooled.reshape(images.shape[0], -1) @ params

    return features.FeatureNet("toy", dim, jnp.eye(4, dim), apply, batch_size=8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 3-step tiny MNIST run with one checkpoint, at step 3."""
    config = tiny_mnist_config(3)
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture
def bucket(gcs_bucket) -> epath.Path:
    """A fresh bucket on the GCS emulator (tests/conftest.py), as an epath."""
    return epath.Path(gcs_bucket)


def _error_line(result, status: int) -> str:
    """The CLI's one error line; asserts the exit status (2 usage, 1 run-time failure) and no
    traceback."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ the CLIs


def test_sample_and_evaluate_refuse_bad_flags_and_missing_steps_in_one_line(tiny_run, tmp_path):
    sample = run_module(
        "shortcut_jax.sample", f"--workdir={tiny_run}", "--num=0", f"--out={tmp_path}/s.npz"
    )
    assert (
        _error_line(sample, 2)
        == "error: --num=0: must be a positive integer (at most 2,147,483,647)"
    )
    evaluate = run_module("shortcut_jax.evaluate", f"--workdir={tiny_run}", "--checkpoint_step=7")
    line = _error_line(evaluate, 1)  # the flag is well formed; that checkpoint is missing
    assert "--checkpoint_step=7" in line and "saved steps: [3]" in line
    assert not (tiny_run / "eval").exists()


def test_sample_cli_writes_the_npz_and_the_grid_and_no_temporary(tiny_run, tmp_path):
    out = tmp_path / "samples" / "s.npz"
    result = run_module(
        "shortcut_jax.sample", f"--workdir={tiny_run}", "--num=4", "--steps=2", f"--out={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as stored:  # the ADM evaluator's layout: uint8 NHWC in arr_0
        assert stored["arr_0"].shape == (4, 28, 28, 1) and stored["arr_0"].dtype == np.uint8
    assert sorted(os.listdir(out.parent)) == ["s.npz", "s.png"]


def test_evaluate_names_a_broken_feature_weights_file_in_one_line(tiny_run, tmp_path):
    broken = tmp_path / "inception_fid.npz"
    broken.write_bytes(b"")
    result = run_module(
        "shortcut_jax.evaluate",
        f"--workdir={tiny_run}",
        "--metrics=fid",
        f"--inception={broken}",
        "--num=2",
    )
    line = _error_line(result, 1)
    assert str(broken) in line and "cannot read FID Inception weights" in line


def test_fid_stats_names_a_truncated_images_file(tmp_path):
    images = tmp_path / "images.npz"
    np.savez(images, images=np.zeros((8, 28, 28, 1), np.float32))
    images.write_bytes(images.read_bytes()[:100])
    out = tmp_path / "stats.npz"
    result = run_module(
        "shortcut_jax.tools.fid_stats", f"--images={images}", "--network=fd_mnist", f"--out={out}"
    )
    assert f"--images={images}: not a readable .npz" in _error_line(result, 1)
    assert not out.exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1.0, "finite number >= 0"), (float("nan"), "finite"), (float("inf"), "finite")],
)
def test_guidance_scale_must_be_finite_and_not_negative(value, message):
    with pytest.raises(cli_inputs.InputError, match=message):
        cli_inputs.check_guidance_scale("--cfg", value)
    assert cli_inputs.check_guidance_scale("--cfg", 0.0) == 0.0
    assert cli_inputs.check_guidance_scale("--cfg", None) is None
    with pytest.raises(cli_inputs.InputError, match="--num=-3"):
        cli_inputs.check_positive("--num", -3)


def test_a_workdir_that_is_not_a_run_is_reported_and_left_untouched(tmp_path, tiny_run):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(cli_inputs.InputFileError, match="is not a training run"):
        cli_inputs.checkpoint_step(str(tmp_path), None)
    assert os.listdir(tmp_path) == ["notes.txt"]
    with pytest.raises(cli_inputs.InputFileError, match="no such directory"):
        cli_inputs.checkpoint_step(str(tmp_path / "missing"), None)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(cli_inputs.InputError, match="--workdir is empty") as empty:
        cli_inputs.checkpoint_step("", None)
    assert cli_inputs.exit_code(empty.value) == 2  # malformed, where the others are missing (1)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(cli_inputs.InputFileError, match="no finished checkpoint"):
        cli_inputs.checkpoint_step(str(tmp_path), None)
    assert cli_inputs.checkpoint_step(str(tiny_run), None) == 3
    assert cli_inputs.checkpoint_step(str(tiny_run), 3) == 3


def test_an_unwritable_or_full_output_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(cli_inputs.InputFileError, match=r"--out: cannot write to .*a_file/eval"):
        cli_inputs.check_output_directory("--out", str(blocker / "eval"), 1)
    cli_inputs.check_output_directory("--out", str(tmp_path / "new"), 1)
    assert os.listdir(tmp_path / "new") == []  # the probe is gone
    free = mock.Mock(free=5 * 2**20)
    monkeypatch.setattr(cli_inputs.shutil, "disk_usage", lambda path: free)
    with pytest.raises(
        cli_inputs.InputFileError, match="has 5 MiB free, the output needs about 40"
    ):
        cli_inputs.check_output_directory("--out", str(tmp_path), 40 * 2**20)


def test_errors_as_one_line_exits_2_for_usage_1_for_failures_and_lets_bugs_through(capsys):
    with pytest.raises(SystemExit) as exit_info, cli_inputs.errors_as_one_line(KeyError):
        raise cli_inputs.InputError("--num=0: must be a positive integer")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --num=0: must be a positive integer\n"
    failures = [
        cli_inputs.InputFileError("--workdir=/x: no such directory"),
        KeyError("a named run-time failure"),
    ]
    for error in failures:
        with pytest.raises(SystemExit) as exit_info, cli_inputs.errors_as_one_line(KeyError):
            raise error
        assert exit_info.value.code == 1, error
    usage = cli_inputs.errors_as_one_line(KeyError, usage=(SyntaxError,))
    with pytest.raises(SystemExit) as exit_info, usage:
        raise SyntaxError("--config is not Python")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("error: ") == 3
    with pytest.raises(RuntimeError), cli_inputs.errors_as_one_line(KeyError):
        raise RuntimeError("a bug keeps its traceback")


# ------------------------------------------------------------------ evaluators and config


def test_nan_images_reaching_an_evaluator_are_an_error_naming_the_count():
    images = np.zeros((6, 8, 8, 1), np.float32)
    images[1, 0, 0] = np.nan
    images[4, 2, :2] = np.inf
    with pytest.raises(features.NonFiniteImagesError, match=r"3 of 384 values .*in 2 of 6 images"):
        features.compute_features(toy_net(), images)
    many = np.zeros((600, 2, 2, 1), np.float32)  # counted across the check's chunks
    many[0, 0, 0], many[599, 1, 1] = np.nan, -np.inf
    with pytest.raises(features.NonFiniteImagesError, match=r"2 of 2,400 values .*in 2 of 600"):
        features.check_finite_images(many)


@pytest.mark.parametrize("damage", ["empty", "truncated", "wrong_shape", "other_keys"])
def test_a_broken_feature_cache_is_recomputed_with_a_warning(tmp_path, caplog, damage):
    net = toy_net()
    first = sweep.noise_features(net, 10, (8, 8, 1), cache_dir=str(tmp_path))
    (cache,) = tmp_path.glob("noise_toy_*.npz")
    if damage == "empty":
        cache.write_bytes(b"")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:200])
    elif damage == "wrong_shape":
        np.savez(cache, features=np.zeros((10, 3)), description=np.asarray("wrong"))
    else:
        np.savez(cache, mu=np.zeros(3))
    with caplog.at_level(logging.WARNING):
        again = sweep.noise_features(net, 10, (8, 8, 1), cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again, first)
    assert any(str(cache) in record.getMessage() for record in caplog.records)
    assert os.listdir(tmp_path) == [cache.name]  # repaired in place, no temporary left
    np.testing.assert_array_equal(np.load(cache)["features"], first)


def test_fid_in_eval_metrics_needs_the_weights_file_at_validation(tmp_path):
    config = tiny_mnist_config(6)
    config.eval_every_steps = 6
    config.eval_metrics = "fd_mnist,fid"
    config.eval_inception_path = str(tmp_path / "inception_fid.npz")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    assert "config.eval_inception_path" in str(error.value)
    assert "convert_inception" in str(error.value)
    (tmp_path / "inception_fid.npz").write_bytes(b"weights")
    config_lib.validate(config)
    config.eval_inception_path = str(tmp_path / "gone.npz")
    config.eval_every_steps = 0  # no periodic evaluation: the field is not used in training
    config_lib.validate(config)


# ------------------------------------------------------------------ outputs on gs://


def test_sample_npz_and_grid_go_to_the_bucket_not_to_a_local_gs_directory(
    bucket, tmp_path, monkeypatch
):
    from shortcut_jax import sample

    monkeypatch.chdir(tmp_path)
    images = np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1).astype(np.float32)
    png = sample.write_samples(
        f"{bucket}/run/samples.npz",
        images,
        np.arange(4),
        title="1 step",
        grid=4,
        num_classes=10,
    )
    assert png == f"{bucket}/run/samples.png"
    assert not (tmp_path / "gs:").exists()
    with (bucket / "run" / "samples.npz").open("rb") as file, np.load(file) as stored:
        np.testing.assert_array_equal(stored["images"], images)
        assert stored["labels"].dtype == np.int32
    assert (bucket / "run" / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_fid_statistics_and_reports_round_trip_through_the_bucket(bucket):
    mu, sigma = np.arange(3.0), np.eye(3)
    fid.save_statistics(f"{bucket}/stats/ref", mu, sigma)  # exactly this name
    loaded = fid.load_statistics(f"{bucket}/stats/ref")
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)
    result = report.make_report(
        rows=[{"steps": 1, "nfe": 1, "cfg": 1.0, "seconds": 0.1, "fid": 9.0}],
        metrics={"fid": {"network": "toy", "feature_dim": 3, "floor": 1.0, "ceiling": 90.0}},
        settings={"num": 2},
    )
    paths = report.write(result, f"{bucket}/eval")
    assert paths["json"] == f"{bucket}/eval/results.json"
    assert json.loads((bucket / "eval" / "results.json").read_text())["rows"][0]["fid"] == 9.0
    assert sorted(path.name for path in (bucket / "eval").iterdir()) == [
        "results.json",
        "results.md",
        "scores_vs_nfe.png",
    ]


def test_feature_caches_on_a_bucket_are_written_once_and_read_back(bucket):
    net = toy_net()
    first = sweep.noise_features(net, 6, (8, 8, 1), cache_dir=f"{bucket}/cache")
    (cache,) = (bucket / "cache").glob("noise_toy_*.npz")
    with mock.patch.object(features, "compute_features", side_effect=AssertionError("recomputed")):
        again = sweep.noise_features(net, 6, (8, 8, 1), cache_dir=f"{bucket}/cache")
    np.testing.assert_array_equal(again, first)
    assert (bucket / "cache" / cache.name).is_file()


def test_write_npz_writes_exactly_the_given_name(tmp_path):
    atomic_files.write_npz(tmp_path / "stats", mu=np.ones(2))
    assert os.listdir(tmp_path) == ["stats"]
    with np.load(tmp_path / "stats") as stored:
        np.testing.assert_array_equal(stored["mu"], np.ones(2))
