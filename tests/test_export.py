"""`python -m shortcut_jax.tools.export`: serialized k-step samplers that reproduce `sample`'s
images in a process that cannot import shortcut_jax, for any batch size and guidance scale."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tiny import REPO, run_module, tiny_mnist_config

from shortcut_jax import (
    atomic_files,
    checkpoint,
    gpu_compile,
    images,
    models,
    optim,
    sample,
    sampling,
    sharding,
)
from shortcut_jax.models import vae as vae_lib
from shortcut_jax.state import init_state
from shortcut_jax.tools import export

HAS_TF = importlib.util.find_spec("tensorflow") is not None
# MNIST digits (28x28x1) <-> 7x7x4 latents.
TINY_VAE = vae_lib.VaeArch(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
)
ATOL = 1e-5  # exported vs library images in [-1, 1]
LABELS_5 = np.array([3, 10, 7, 0, 9], np.int32)  # 10 is the null class


def _save_run(config, workdir: str) -> str:
    """A checkpoint at step 3 whose params and EMA are random (not the zero-output init)."""
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    state = jax.jit(functools.partial(init_state, config, model, optimizer))()

    def randomized(tree, seed):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(treedef, noisy)

    state = state.replace(
        params=randomized(state.params, 1), ema_params=randomized(state.params, 2)
    )
    manager = checkpoint.make_manager(workdir, for_training=True)
    checkpoint.save(manager, state, config, 3)
    manager.wait_until_finished()
    manager.close()
    return workdir


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> str:
    """The tiny class-conditional MNIST DiT (guidance policy 'all', scale 1.5)."""
    return _save_run(tiny_mnist_config(), str(tmp_path_factory.mktemp("export") / "pixel_run"))


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> str:
    """The tiny DiT on 7x7x4 latents of a random VAE, guidance only at 8 steps ('finest')."""
    root = tmp_path_factory.mktemp("export_latent")
    config = tiny_mnist_config()
    config.vae.path = str(root / "vae.npz")
    vae_lib.save_vae(config.vae.path, vae_lib.random_vae(TINY_VAE, seed=0, scaling_factor=0.5))
    config.vae.scaling_factor = 0.5
    config.vae.downsample_factor = 4
    config.vae.latent_channels = 4
    config.model.patch_size = 7
    config.sample_guidance = "finest"
    return _save_run(config, str(root / "run"))


@pytest.fixture(scope="module")
def pixel_export(pixel_run, tmp_path_factory) -> str:
    """The export of 1 and 4 steps for cpu, cuda and tpu (and a SavedModel if TF is here)."""
    out = str(tmp_path_factory.mktemp("pixel_export") / "served")
    flags = ["--saved_model"] if HAS_TF else []
    assert export.main(["--workdir", pixel_run, "--steps", "1,4", "--out", out, *flags]) == 0
    return out


@pytest.fixture(scope="module")
def latent_export(latent_run, tmp_path_factory) -> str:
    """The 2-step sampler of the latent run with its parameters embedded, for the CPU only."""
    out = str(tmp_path_factory.mktemp("latent_export") / "served")
    args = ["--workdir", latent_run, "--steps", "2", "--out", out, "--platforms", "cpu"]
    assert export.main([*args, "--embed_params"]) == 0
    return out


def _manifest(directory: str) -> dict:
    return json.loads(Path(directory, export.MANIFEST).read_text())


def _noise(seed: int, num: int, shape) -> np.ndarray:
    """The noise `sample.sample_chunks` draws for examples 0..num-1 of --seed `seed`."""
    rng = jax.random.PRNGKey(seed)
    return np.asarray(sampling.noise_at(rng, np.arange(num, dtype=np.uint32), tuple(shape)))


def _library_images(workdir: str, seed: int, labels, num_steps: int, scale: float) -> np.ndarray:
    """What `python -m shortcut_jax.sample --seed seed` computes before writing its files."""
    mesh = sharding.make_mesh(sharding.single_device_config(), jax.local_devices())
    config, params, _ = checkpoint.load_params(workdir, mesh=mesh)
    chunks = sample.sample_chunks(
        config,
        params,
        jax.random.PRNGKey(seed),
        np.asarray(labels, np.int32),
        num_steps=num_steps,
        cfg_scale=scale,
        batch_size=len(labels),
        mesh=mesh,
    )
    return np.concatenate([pixels for pixels, _ in chunks])


# (key, export, steps, seed, labels, guidance scale)
JOBS = [
    ("k1_b5", "pixel", 1, 0, LABELS_5, 1.5),
    ("k4_b5", "pixel", 4, 0, LABELS_5, 1.5),
    ("k4_b2_w3", "pixel", 4, 1, LABELS_5[:2], 3.0),
    ("k4_b2_w1", "pixel", 4, 1, LABELS_5[:2], 1.0),
    ("latent_k2_b3", "latent", 2, 2, LABELS_5[:3], 1.0),
]


@pytest.fixture(scope="module")
def served(pixel_export, latent_export, tmp_path_factory) -> dict[str, np.ndarray]:
    """The outputs of every job, computed by tests/export_server.py without shortcut_jax."""
    scratch = tmp_path_factory.mktemp("server")
    directories = {"pixel": pixel_export, "latent": latent_export}
    inputs, jobs = {}, []
    for key, which, num_steps, seed, labels, scale in JOBS:
        shape = _manifest(directories[which])["run"]["noise_shape"]
        inputs[f"{key}/noise"] = _noise(seed, len(labels), shape)
        inputs[f"{key}/labels"] = labels
        jobs.append(
            {
                "key": key,
                "dir": directories[which],
                "steps": num_steps,
                "noise": f"{key}/noise",
                "labels": f"{key}/labels",
                "scale": scale,
            }
        )
    np.savez(scratch / "inputs.npz", **inputs)
    (scratch / "jobs.json").write_text(json.dumps(jobs))
    script = str(REPO / "tests" / "export_server.py")
    paths = [str(scratch / name) for name in ("jobs.json", "inputs.npz", "results.npz")]
    result = subprocess.run(
        [sys.executable, "-I", script, *paths],
        cwd=scratch,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "jobs": len(jobs),
        "platform": "cpu",
    }
    with np.load(scratch / "results.npz") as results:
        return {name: results[name] for name in results.files}


def _job(key: str):
    (job,) = [job for job in JOBS if job[0] == key]
    return job


def _expected(key: str, pixel_run: str, latent_run: str) -> np.ndarray:
    _, which, num_steps, seed, labels, scale = _job(key)
    workdir = pixel_run if which == "pixel" else latent_run
    return _library_images(workdir, seed, labels, num_steps, scale)


@pytest.mark.parametrize("key", ["k1_b5", "k4_b5", "k4_b2_w3", "k4_b2_w1"])
def test_artifact_reproduces_sample_without_shortcut_jax(served, pixel_run, key):
    expected = _expected(key, pixel_run, None)
    got = served[f"{key}/images"]
    assert got.shape == expected.shape and got.dtype == np.float32
    # The library's program, also at scale 1 (the unguided branch): measured equal; the bound
    # leaves room for XLA fusing the deserialized module differently.
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(served[f"{key}/images_uint8"], images.quantize_adm(got))


def test_one_artifact_serves_any_batch_size_and_guidance_scale(served, pixel_run):
    assert served["k4_b5/images"].shape == (5, 28, 28, 1)
    assert served["k4_b2_w3/images"].shape == (2, 28, 28, 1)
    guided, unguided = served["k4_b2_w3/images"], served["k4_b2_w1/images"]
    assert np.abs(guided - unguided).max() > 0.05  # the scale input changes the samples
    noise = _noise(1, 2, (28, 28, 1))
    assert np.abs(unguided - np.clip(noise, -1, 1)).max() > 0.05  # the network is not a no-op


def test_latent_artifact_decodes_with_the_vae_and_embeds_its_parameters(
    served, latent_export, latent_run
):
    manifest = _manifest(latent_export)
    (entry,) = manifest["samplers"]
    assert manifest["params_embedded"] and manifest["run"]["noise_shape"] == [7, 7, 4]
    assert [spec["name"] for spec in entry["inputs"]] == ["noise", "labels"]  # 'finest': 2 steps
    assert entry["guidance"] == {"input": False, "default_scale": 1.0}
    params = safetensors.numpy.load_file(os.path.join(latent_export, export.PARAMS_FILE))
    assert any(name.startswith("vae/") for name in params)
    assert not any("encoder" in name for name in params)  # the decoder half only
    expected = _expected("latent_k2_b3", None, latent_run)
    assert served["latent_k2_b3/images"].shape == expected.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(served["latent_k2_b3/images"], expected, rtol=0, atol=ATOL)


@pytest.mark.skipif(not HAS_TF, reason="tensorflow is not installed")
def test_saved_model_reproduces_sample(served, pixel_export, pixel_run):
    import tensorflow as tf

    (entry,) = [entry for entry in _manifest(pixel_export)["samplers"] if entry["steps"] == 4]
    model = tf.saved_model.load(os.path.join(pixel_export, entry["saved_model"]))
    noise, labels = _noise(1, 2, (28, 28, 1)), LABELS_5[:2]
    serve = model.signatures["serving_default"]
    outputs = serve(noise=noise, labels=labels, guidance_scale=tf.constant(3.0))
    assert sorted(outputs) == ["images", "images_uint8"]
    # TensorFlow compiles the StableHLO with its own XLA build (measured: 1.6e-5 apart).
    expected = _library_images(pixel_run, 1, labels, 4, 3.0)
    np.testing.assert_allclose(outputs["images"].numpy(), expected, rtol=0, atol=1e-4)
    assert np.abs(outputs["images"].numpy() - served["k4_b2_w3/images"]).max() < 1e-4


def _compile_for(devices, directory: str, num_steps: int, batch: int):
    """The artifact of `directory` compiled (not run) for the first of `devices`."""
    entry = [e for e in _manifest(directory)["samplers"] if e["steps"] == num_steps][0]
    exported = jax.export.deserialize(bytearray(Path(directory, entry["file"]).read_bytes()))
    on_device = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    params = safetensors.numpy.load_file(os.path.join(directory, export.PARAMS_FILE))
    arguments = [{k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}]
    for spec in entry["inputs"][1:]:
        shape = tuple(batch if size == "b" else size for size in spec["shape"])
        arguments.append(jax.ShapeDtypeStruct(shape, np.dtype(spec["dtype"])))
    arguments = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device), arguments
    )
    with warnings.catch_warnings():  # a compile-only client cannot load cached executables
        warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
        return jax.jit(exported.call).lower(*arguments).compile()


def test_the_tpu_branch_of_an_artifact_compiles_for_a_v5e(pixel_export, tpu_compiler):
    devices = tpu_compiler.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    compiled = _compile_for(devices, pixel_export, 4, batch=8)
    assert "T(8,128)" in compiled.as_text()  # TPU tiled layouts: XLA:TPU compiled it


def test_the_cuda_branch_of_an_artifact_compiles_for_an_h100(pixel_export):
    how = f"to run: {gpu_compile.INSTALL}"
    try:
        _, devices = gpu_compile.gpu_devices("h100-8")
    except gpu_compile.GpuCompileError as error:
        if os.environ.get("SHORTCUT_JAX_REQUIRE_GPU_COMPILE") == "1":
            pytest.fail(f"no compile-only GPUs: {error}; {how}")
        pytest.skip(f"no compile-only GPUs: {error}; {how}")
    compiled = _compile_for(devices, pixel_export, 4, batch=8)
    assert {device.platform for device in devices} == {"gpu"}
    assert "f32[8,28,28,1]" in compiled.as_text()


def test_manifest_and_params_file_describe_the_export(pixel_export, pixel_run):
    manifest = _manifest(pixel_export)
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["jax_version"] == jax.__version__
    assert [entry["steps"] for entry in manifest["samplers"]] == [1, 4]
    for entry in manifest["samplers"]:
        data = Path(pixel_export, entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert [spec["name"] for spec in entry["inputs"]] == [
            "params",
            "noise",
            "labels",
            "guidance_scale",
        ]
        assert entry["guidance"]["default_scale"] == 1.5
        assert entry["inputs"][1]["shape"] == ["b", 28, 28, 1]
    assert manifest["samplers"][1]["schedule"]["step_size"] == [0.25] * 4
    path = os.path.join(pixel_export, export.PARAMS_FILE)
    assert manifest["params_sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    _, ema, _ = checkpoint.load_params(pixel_run)
    _assert_params_file(path, ema)
    assert manifest["params_count"] == sum(leaf.size for leaf in jax.tree.leaves(ema))


def _assert_params_file(path: str, params) -> None:
    """The safetensors file holds exactly `params`, named "model/<flax path>"."""
    stored = safetensors.numpy.load_file(path)
    expected = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    assert set(stored) == {f"model/{name}" for name in expected}
    for name, value in expected.items():
        np.testing.assert_array_equal(stored[f"model/{name}"], value)


def test_guidance_input_follows_the_runs_policy():
    config = tiny_mnist_config()  # denoise_timesteps 8
    for policy, guided_counts in (("all", {1, 4, 8}), ("finest", {8})):
        config.sample_guidance = policy
        assert {k for k in (1, 4, 8) if export.guides(config, k)} == guided_counts
    config.data.num_classes = 0
    config.sample_guidance = "all"
    assert not export.guides(config, 8)


def test_an_earlier_export_is_replaced_whole(pixel_run, tmp_path):
    out = str(tmp_path / "served")
    common = ["--workdir", pixel_run, "--platforms", "cpu", "--out", out]
    assert export.main([*common, "--steps", "2,3"]) == 0
    assert export.main([*common, "--steps", "1", "--raw_params"]) == 0
    assert sorted(os.listdir(out)) == [
        export.MANIFEST,
        export.PARAMS_FILE,
        "sampler_1step.jax_export",
    ]
    manifest = _manifest(out)
    assert manifest["run"]["params"] == "raw"
    _, raw, _ = checkpoint.load_params(pixel_run, raw=True)
    _assert_params_file(os.path.join(out, export.PARAMS_FILE), raw)


def test_an_export_goes_to_a_bucket_with_its_manifest_last(pixel_run, gcs_bucket, monkeypatch):
    out = f"{gcs_bucket}/serving/mnist"
    uploaded = []
    upload = atomic_files.upload_file
    monkeypatch.setattr(
        atomic_files,
        "upload_file",
        lambda local, remote: (uploaded.append(remote), upload(local, remote)),
    )
    args = ["--workdir", pixel_run, "--steps", "2", "--platforms", "cpu", "--out", out]
    assert export.main(args) == 0
    assert uploaded[-1] == f"{out}/{export.MANIFEST}"
    manifest = json.loads(epath.Path(out, export.MANIFEST).read_text())
    data = epath.Path(out, "sampler_2step.jax_export").read_bytes()
    assert manifest["samplers"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(path.name for path in epath.Path(out).iterdir()) == [
        export.MANIFEST,
        export.PARAMS_FILE,
        "sampler_2step.jax_export",
    ]
    assert export.main(args) == 1  # a bucket folder that holds files is never overwritten


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps=0: '0' is not a step count; allowed: integers 1..8"),
        (["--steps", "9"], "--steps=9: '9' is not a step count"),
        (["--steps", "1,x"], "--steps=1,x: 'x' is not a step count"),
        (["--steps", ""], "--steps=: '' is not a step count"),
        (["--steps", "2,2"], "--steps=2,2: 2 is listed twice"),
        (["--steps", "1", "--platforms", "cpu,gpu"], "--platforms=cpu,gpu: allowed"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(pixel_run, tmp_path, capsys, flags, message):
    out = str(tmp_path / "served")
    assert export.main(["--workdir", pixel_run, "--out", out, *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1, error
    assert not os.path.exists(out)


def test_a_workdir_that_is_not_a_run_or_an_out_that_is_not_an_export_is_one_line(
    pixel_run, tmp_path, capsys
):
    # cli_inputs' rule: a named file or directory that is missing or unfit exits 1.
    missing = str(tmp_path / "nowhere")
    assert export.main(["--workdir", missing, "--steps", "1", "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == f"error: --workdir={missing}: no such directory\n"
    assert export.main(["--workdir", str(tmp_path), "--steps", "1", "--out", "o"]) == 1
    assert "is not a training run" in capsys.readouterr().err
    args = ["--workdir", pixel_run, "--steps", "1", "--checkpoint_step", "7", "--out", "o"]
    assert export.main(args) == 1
    assert "--checkpoint_step=7: no checkpoint at that step" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert export.main(["--workdir", pixel_run, "--steps", "1", "--out", str(busy)]) == 1
    error = capsys.readouterr().err
    assert "holds files and is not an earlier export" in error and error.count("\n") == 1
    assert os.listdir(busy) == ["notes.txt"]
    with pytest.raises(SystemExit) as exited:  # argparse: a required flag missing
        export.main(["--workdir", pixel_run, "--steps", "1"])
    assert exited.value.code == 2


def test_the_module_entry_point_reports_a_bad_steps_with_exit_2(pixel_run, tmp_path):
    args = ["--workdir", pixel_run, "--steps", "1,16", "--out", str(tmp_path / "out")]
    result = run_module("shortcut_jax.tools.export", *args, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --steps=1,16: '16' is not a step count; allowed: integers 1..8 "
        "(denoise_timesteps), e.g. --steps 1,4"
    )
    assert not (tmp_path / "out").exists()


def test_a_failed_export_exits_1_and_writes_nothing(pixel_run, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise NotImplementedError("no lowering for this primitive")

    monkeypatch.setattr(jax.export, "export", fail)
    out = tmp_path / "served"
    assert export.main(["--workdir", pixel_run, "--steps", "1", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: exporting the 1-step sampler for cpu,cuda,tpu failed: ")
    assert "no lowering for this primitive" in error and error.count("\n") == 1
    assert not out.exists() and os.listdir(tmp_path) == []
