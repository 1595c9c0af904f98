"""Evaluation: feature extraction on a mesh, the step-budget sweep, reports, the CLIs and the
periodic evaluation in the train loop (with the project's FD-MNIST classifier)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny import run_module, run_on_cpu_devices, tiny_mnist_config

from shortcut_jax import checkpoint, config_lib, train
from shortcut_jax.evaluators import fd_mnist, features, fid, report, sweep

REPO = Path(__file__).resolve().parents[1]


def toy_net(dim: int = 6) -> features.FeatureNet:
    """Features = a fixed random projection of 4x4 average-pooled pixels (plus their squares)."""

    def apply(params, images):
        pooled = jax.image.resize(images.mean(-1), (images.shape[0], 4, 4), "linear")
        flat = pooled.reshape(images.shape[0], -1)
        return jnp.concatenate([flat, flat**2], axis=1) @ params

    params = jax.random.normal(jax.random.PRNGKey(0), (32, dim))
    return features.FeatureNet("toy", dim, params, apply, batch_size=5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny MNIST run (6 steps) whose last step ran the periodic evaluation."""
    config = tiny_mnist_config(6)
    config.eval_every_steps = 6
    config.eval_steps = (1, 2)
    config.eval_num = 40
    config.eval_ref_num = 300
    config.eval_metrics = "fd_mnist"
    workdir = tmp_path_factory.mktemp("run")
    history = train.train_and_evaluate(config, str(workdir))
    return workdir, history


def test_quantize_rounds_to_the_eight_bit_grid_and_clips():
    x = jnp.array([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0, jnp.nan])
    q = np.asarray(features.quantize(x))
    levels = (q + 1.0) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert q.min() >= -1.0 and q.max() <= 1.0
    np.testing.assert_allclose(q[[0, 1, 5, 6]], [-1.0, -1.0, 1.0, 1.0])
    assert q[-1] == pytest.approx(128 / 127.5 - 1.0, abs=1e-6)  # NaN -> mid gray (level 128)


def test_features_do_not_depend_on_the_chunk_size_and_match_the_network():
    net = toy_net()
    images = np.random.default_rng(0).uniform(-1, 1, (13, 8, 8, 1)).astype(np.float32)
    expected = np.asarray(net.apply(net.params, features.quantize(images)))
    for batch_size in (None, 4, 13, 64):
        got = features.compute_features(net, images, batch_size=batch_size)
        assert got.shape == (13, 6)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_features_report_progress_and_reject_bad_images():
    net = toy_net()
    seen = []
    features.compute_features(net, np.zeros((7, 8, 8, 3), np.float32), progress=seen.append)
    assert sum(seen) == 7
    with pytest.raises(ValueError, match="C in"):
        features.compute_features(net, np.zeros((7, 8, 8, 2), np.float32))
    broken = features.FeatureNet("broken", 6, net.params, lambda p, x: net.apply(p, x) * jnp.nan)
    with pytest.raises(FloatingPointError, match="broken"):
        features.compute_features(broken, np.zeros((3, 8, 8, 1), np.float32))


def test_features_on_an_eight_device_mesh_equal_one_device():
    script = textwrap.dedent(
        """
        import sys, numpy as np, jax
        sys.path.insert(0, "tests")
        from test_evaluate import toy_net
        from shortcut_jax import sharding
        from shortcut_jax.evaluators import features
        assert jax.device_count() == 8
        net = toy_net()
        images = np.random.default_rng(1).uniform(-1, 1, (21, 8, 8, 3)).astype(np.float32)
        mesh = sharding.make_mesh(sharding.single_device_config())
        sharded = features.compute_features(net, images, mesh=mesh, batch_size=16)
        single = features.compute_features(net, images)
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
        print("OK", sharded.shape)
        """
    )
    stdout = run_on_cpu_devices(script)
    assert "OK (21, 6)" in stdout


def test_floor_is_small_for_real_halves_and_noise_is_far():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 5))
    floor = sweep.floor_from_features(real)
    shifted = fid.frechet_distance(
        *fid.feature_statistics(real + 3.0), *fid.feature_statistics(real)
    )
    assert 0 < floor < 0.5 < shifted


def test_params_digest_follows_the_values_not_the_container():
    params = {"dense": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)}}
    digest = features.params_digest(params)
    assert len(digest) == 16
    assert features.params_digest(jax.tree.map(jnp.asarray, params)) == digest
    kernel = params["dense"]["kernel"].copy()
    kernel[0, 0] = 1e-7
    changed = {"dense": {"kernel": kernel}}
    assert features.params_digest(changed) != digest
    renamed = {"proj": params["dense"]}
    assert features.params_digest(renamed) != digest


def test_cached_features_are_keyed_by_the_weights_digest(tmp_path):
    net = toy_net()
    first = dataclasses.replace(net, weights_digest=features.params_digest(net.params))
    other_params = net.params * 2.0
    second = dataclasses.replace(
        net, params=other_params, weights_digest=features.params_digest(other_params)
    )
    a = sweep.noise_features(first, 8, (8, 8, 1), cache_dir=str(tmp_path))
    b = sweep.noise_features(second, 8, (8, 8, 1), cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("noise_toy_*.npz"))) == 2
    np.testing.assert_allclose(b, 2.0 * a, rtol=1e-5)  # not the first network's cached features
    assert (
        sweep.Metric("toy", second, a.mean(0), np.eye(6), "r").describe()["weights_digest"]
        == second.weights_digest
    )


def test_metric_names_resolve_auto_and_reject_unknown(monkeypatch, tmp_path):
    monkeypatch.setenv("SHORTCUT_JAX_INCEPTION", str(tmp_path / "absent.npz"))
    config = tiny_mnist_config()
    assert sweep.metric_names(config) == ["fd_mnist"]
    assert sweep.metric_names(config, "fid,fd_mnist") == ["fid", "fd_mnist"]
    with pytest.raises(sweep.EvaluationError, match="unknown metric"):
        sweep.metric_names(config, "is")
    config.data.name = "toy2d"
    with pytest.raises(sweep.EvaluationError, match="absent.npz"):
        sweep.metric_names(config)


def test_fid_without_weights_names_the_file_and_the_conversion(monkeypatch, tmp_path):
    missing = tmp_path / "inception_fid.npz"
    config = tiny_mnist_config()
    config.eval_inception_path = str(missing)
    with pytest.raises(Exception, match="inception_fid.npz") as error:
        sweep.build_metrics(config, names=["fid"])
    assert "convert_inception" in str(error.value)


def test_eval_config_fields_are_validated():
    config = tiny_mnist_config()
    config.eval_every_steps = 0
    config.eval_steps = (1, 9)  # denoise_timesteps is 8, but periodic evaluation is off
    config_lib.validate(config)
    config.eval_every_steps = -1
    config.eval_num = 1
    config.eval_metrics = "fid,lpips"
    config.eval_ref_stats = "/no/such/stats.npz"
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    message = str(error.value)
    for field in ("eval_every_steps", "eval_steps", "eval_num", "eval_metrics", "eval_ref_stats"):
        assert f"config.{field}" in message


def test_periodic_evaluation_writes_scores_between_floor_and_ceiling(trained_run):
    workdir, history = trained_run
    scores = history[6]
    floor, ceiling = scores["eval/fd_mnist_floor"], scores["eval/fd_mnist_ceiling"]
    assert 0 < floor < ceiling
    for steps in (1, 2):
        value = scores[f"eval/fd_mnist/steps_{steps}"]
        assert np.isfinite(value) and value > floor
        assert 0.0 <= scores[f"eval/fd_mnist_precision/steps_{steps}"] <= 1.0
        assert 0.0 <= scores[f"eval/fd_mnist_recall/steps_{steps}"] <= 1.0
    # The reference features were cached in the workdir for the next evaluation.
    assert list((workdir / "eval").glob("reference_fd_mnist_*.npz"))


def test_periodic_evaluation_of_nan_samples_is_skipped_and_recorded_not_fatal(trained_run):
    from clu import metric_writers

    from shortcut_jax import sharding

    workdir, _ = trained_run
    config, state = checkpoint.load_run(str(workdir))
    mesh = sharding.make_mesh(config, jax.local_devices())

    def nan_velocity(params, x, t, d, labels):
        del params, t, d, labels
        return x * jnp.nan

    evaluator = train.PeriodicEvaluator(
        config, nan_velocity, str(workdir), metric_writers.MultiWriter([]), mesh
    )
    assert evaluator.run(state, 7) == {"eval/non_finite_samples": 1.0}


def test_sweep_uses_the_same_noise_at_every_budget_and_counts_guided_evaluations(trained_run):
    workdir, _ = trained_run
    config, state = checkpoint.load_run(str(workdir))
    metrics = sweep.build_metrics(config, names=["fd_mnist"], cache_dir=str(workdir / "eval"))
    rows, kept = sweep.sweep(
        config, state.ema_params, metrics, steps=[1, 8], num=12, cfg_scale=1.5, keep_samples=4
    )
    assert [row["steps"] for row in rows] == [1, 8]
    assert [row["nfe"] for row in rows] == [2, 16]  # guidance: conditional + null per step
    assert kept[1].shape == (4, 28, 28, 1)
    again, _ = sweep.sweep(config, state.ema_params, metrics, steps=[1], num=12, cfg_scale=1.5)
    assert again[0]["fd_mnist"] == pytest.approx(rows[0]["fd_mnist"], rel=1e-6)
    rows, _ = sweep.sweep(config, state.ema_params, metrics, steps=[2], num=12, cfg_scale=1.0)
    assert rows[0]["nfe"] == 2
    with pytest.raises(sweep.EvaluationError, match="outside"):
        sweep.sweep(config, state.ema_params, metrics, steps=[16], num=12, cfg_scale=1.0)


def test_report_table_and_plot_hold_every_run_and_budget(tmp_path):
    info = {"network": "fd_mnist", "feature_dim": 128, "reference": "real", "floor": 0.5}
    info["ceiling"] = 900.0
    runs = {
        label: report.make_report(
            rows=[
                {"steps": s, "nfe": s, "seconds": 1.0, "fd_mnist": scale * 100 / s}
                for s in (1, 2, 4)
            ],
            metrics={"fd_mnist": info},
            settings={"objective": label},
        )
        for label, scale in (("shortcut", 1.0), ("flow_matching", 5.0))
    }
    table = report.markdown_table(runs)
    assert table.count("| shortcut |") == 3 and table.count("| flow_matching |") == 3
    assert "floor 0.500" in table and "ceiling 900.00" in table
    report.plot(runs, tmp_path / "plot.png")
    with Image.open(tmp_path / "plot.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    paths = report.write(runs["shortcut"], tmp_path / "out")
    assert json.loads(Path(paths["json"]).read_text())["rows"][0]["fd_mnist"] == 100.0
    assert "| 1 | 1 |" in Path(paths["markdown"]).read_text()


def test_evaluate_cli_writes_json_table_and_plot(trained_run, tmp_path):
    workdir, _ = trained_run
    out = tmp_path / "eval"
    result = run_module(
        "shortcut_jax.evaluate",
        f"--workdir={workdir}",
        "--steps=1,2,8",
        "--num=24",
        "--metrics=fd_mnist",
        "--cfg=1.0",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [row["steps"] for row in results["rows"]] == [1, 2, 8]
    assert results["settings"]["checkpoint_step"] == 6
    assert all(np.isfinite(row["fd_mnist"]) for row in results["rows"])
    assert results["metrics"]["fd_mnist"]["floor"] < results["metrics"]["fd_mnist"]["ceiling"]
    assert "| 8 | 8 |" in (out / "results.md").read_text()
    digest = fd_mnist.feature_net().weights_digest  # the shipped classifier, recorded
    assert results["metrics"]["fd_mnist"]["weights_digest"] == digest
    assert f"features of fd_mnist (weights {digest})." in (out / "results.md").read_text()
    assert (out / "scores_vs_nfe.png").stat().st_size > 1000
    assert "| steps | NFE | CFG | fd_mnist |" in result.stdout

    bad = run_module("shortcut_jax.evaluate", f"--workdir={workdir}", "--steps=1,16")
    assert bad.returncode == 2 and "error: --steps: [16] outside 1..8" in bad.stderr


def test_fid_stats_tool_writes_the_statistics_of_its_images(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (30, 28, 28, 1)).astype(np.float32)
    # Compressed, and streamed in 5 chunks of at most 7 rows: the all-at-once statistics.
    np.savez_compressed(tmp_path / "images.npz", images=images)
    out = tmp_path / "stats.npz"
    result = run_module(
        "shortcut_jax.tools.fid_stats",
        f"--images={tmp_path / 'images.npz'}",
        "--network=fd_mnist",
        "--chunk=7",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mu, sigma = fid.load_statistics(out)
    expected = features.compute_features(fd_mnist.feature_net(), images)
    mu_expected, sigma_expected = fid.feature_statistics(expected)
    np.testing.assert_allclose(mu, mu_expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sigma, sigma_expected, rtol=1e-3, atol=1e-4)

    missing = run_module("shortcut_jax.tools.fid_stats", "--images=/no/such.npz", f"--out={out}")
    assert (  # a missing input file is a run-time failure (1), not a usage error (2)
        missing.returncode == 1 and "error: --images=/no/such.npz: no such file" in missing.stderr
    )


def test_eval_report_script_combines_runs_into_one_table_and_plot(tmp_path):
    for label, scale in (("shortcut", 1.0), ("flow_matching", 4.0)):
        result = report.make_report(
            rows=[
                {"steps": s, "nfe": 2 * s, "seconds": 0.5, "fid": scale * 50 / s} for s in (1, 2)
            ],
            metrics={"fid": {"network": "inception_fid", "feature_dim": 2048, "floor": 1.0}},
            settings={"objective": label, "num": 10},
        )
        report.write(result, tmp_path / label)
    plot = tmp_path / "combined.png"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "eval_report.py"),
            f"shortcut={tmp_path / 'shortcut'}",
            f"flow_matching={tmp_path / 'flow_matching'}",
            "--plot",
            str(plot),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| shortcut | 1 | 2 | - | 50.00 |" in result.stdout
    assert "| flow_matching | 2 | 4 | - | 100.00 |" in result.stdout
    assert plot.stat().st_size > 1000
    missing = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "eval_report.py"), f"x={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "results.json" in missing.stderr


def test_fid_stats_reads_a_latent_dir_in_chunks_decoded_like_its_real_examples(tmp_path):
    from test_latents import ARCH, encode, encode_config, make_folder

    from shortcut_jax import data, latent_space, sharding
    from shortcut_jax.models import vae as vae_lib
    from shortcut_jax.tools import fid_stats

    make_folder(tmp_path / "images")
    vae_lib.save_vae(tmp_path / "vae.npz", vae_lib.random_vae(ARCH, seed=0))
    config = encode_config({"images": tmp_path / "images", "vae": tmp_path / "vae.npz"})
    encode(config, tmp_path / "latents")
    config.data.latent_dir = str(tmp_path / "latents")
    config.vae.decode_batch_size = 2
    config.batch_size = 4  # the source refuses a training batch larger than its 15 examples
    mesh = sharding.make_mesh(sharding.single_device_config(), jax.local_devices())
    chunks = list(fid_stats.latent_image_chunks(config, 11, 4, mesh))
    assert [len(chunk) for chunk in chunks] == [4, 4, 3]
    latents = data.get_source(config).real_examples(11)["image"]
    expected = latent_space.PixelDecoder.for_config(config, mesh, 11)(latents)
    assert expected.shape == (11, 16, 16, 3)
    np.testing.assert_allclose(np.concatenate(chunks), expected, rtol=1e-5, atol=1e-5)


def test_fid_stats_reads_an_image_folder_in_chunks_like_its_real_examples(tmp_path):
    from test_latents import encode_config, make_folder

    from shortcut_jax import data
    from shortcut_jax.tools import fid_stats

    make_folder(tmp_path / "images")
    config = encode_config({"images": tmp_path / "images", "vae": tmp_path / "unused.npz"})
    config.data.latent_dir = ""
    config.batch_size = 4
    chunks = list(fid_stats.dataset_image_chunks(config, 11, 4))
    assert [len(chunk) for chunk in chunks] == [4, 4, 3]
    expected = data.get_source(config).real_examples(11)["image"]
    np.testing.assert_array_equal(np.concatenate(chunks), expected)
