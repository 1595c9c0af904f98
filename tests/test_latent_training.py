"""The latent path end to end: train on VAE latents (online or precomputed), decode, evaluate.

Random-weight VAEs prove the plumbing (shapes, ranges, which VAE decodes what); the learning in
latent space is measured by benchmarks/mnist_latent_benchmark.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import run_module, tiny_mnist_config

from shortcut_jax import (
    aot,
    checkpoint,
    compiled_step,
    config_lib,
    latent_space,
    models,
    optim,
    sharding,
    steps,
    train,
)
from shortcut_jax.models import vae as vae_lib
from shortcut_jax.state import init_state, sharded_abstract_state

# MNIST digits (28x28x1) -> 7x7x4 latents: two down blocks.
MNIST_ARCH = vae_lib.VaeArch(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
)


@pytest.fixture(scope="module")
def mnist_vae_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("vae") / "mnist_vae.npz")
    vae_lib.save_vae(path, vae_lib.random_vae(MNIST_ARCH, seed=0, scaling_factor=0.5))
    return path


def latent_mnist_config(vae_path: str, total_steps: int = 3):
    """The tiny MNIST config in the latent space of MNIST_ARCH (7x7x4 latents, patch 7 -> 1)."""
    config = tiny_mnist_config(total_steps)
    config.vae.path = vae_path
    config.vae.scaling_factor = 0.5
    config.vae.downsample_factor = 4
    config.vae.latent_channels = 4
    config.model.patch_size = 7
    config.sample_num = 6
    config.eval_batch_size = 8
    return config


def test_model_shape_follows_the_vae(mnist_vae_path):
    config = latent_mnist_config(mnist_vae_path)
    assert latent_space.pixel_shape(config) == (28, 28, 1)
    assert latent_space.model_shape(config) == (7, 7, 4)
    x, *_ = models.example_inputs(config, batch_size=2)
    assert x.shape == (2, 7, 7, 4)


def test_online_step_equals_the_step_on_encoded_latents(mnist_vae_path):
    """Encoding inside the jitted step equals encoding first (posterior means)."""
    config = latent_mnist_config(mnist_vae_path)
    config.vae.sample_posterior = False
    vae = latent_space.load_run_vae(config)
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    step = steps.make_train_step(config, model, optimizer)
    images = np.random.default_rng(0).uniform(-1, 1, (16, 28, 28, 1)).astype(np.float32)
    batch = {"image": jnp.asarray(images), "label": jnp.arange(16, dtype=jnp.int32) % 10}

    state = init_state(config, model, optimizer)
    _, online = jax.jit(latent_space.online_encode_step(config, step, vae))(
        state, batch, vae.encoder_params
    )
    latents = vae_lib.encode(
        vae.arch, vae.params, batch["image"], None, scaling_factor=vae.scaling_factor
    )
    _, offline = jax.jit(step)(init_state(config, model, optimizer), {**batch, "image": latents})
    np.testing.assert_allclose(
        np.asarray(online["loss"][0]), np.asarray(offline["loss"][0]), rtol=1e-5
    )


def _nbytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs / ArgInfos) of a tree."""
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
    )


def _paths(tree) -> set[str]:
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_train_step_is_given_only_the_encoder_and_sampling_only_the_decoder(mnist_vae_path):
    config = latent_mnist_config(mnist_vae_path)
    vae = latent_space.load_run_vae(config)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    abstract, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    step = compiled_step.build(config, mesh, model, optimizer, state_sharding, vae=vae)
    assert sorted(step.frozen["vae"]) == ["encoder", "quant_conv"]
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((16, 28, 28, 1), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=batch_sharding),
    }
    # The program's VAE argument: every encoder parameter and nothing else.
    vae_argument = step.lower(abstract, batch).args_info[0][3]["vae"]
    assert _paths(vae_argument) == _paths(vae.encoder_params)
    assert _nbytes(vae_argument) == _nbytes(vae.encoder_params) < _nbytes(vae.params)
    decoder_shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(vae.decoder_params)}
    assert (1, 1, 4, 4) in decoder_shapes  # post_quant_conv: a shape only the decoder has
    assert (1, 1, 4, 4) not in {tuple(leaf.shape) for leaf in jax.tree.leaves(vae_argument)}

    pixels, params = latent_space.PixelDecoder(vae, mesh).device_fn()
    assert sorted(params) == ["decoder", "post_quant_conv"]
    latents = np.random.default_rng(0).normal(size=(3, 7, 7, 4)).astype(np.float32)
    full = vae_lib.decode(vae.arch, vae.params, latents, scaling_factor=vae.scaling_factor)
    np.testing.assert_allclose(pixels(params, latents), np.clip(full, -1, 1), atol=1e-6)


def test_compile_cli_programs_hold_the_encoder_to_train_and_the_decoder_to_decode(mnist_vae_path):
    """`shortcut_jax.compile` lowers the same programs: 'train_online' with the encoder half,
    'decode' with the decoder half (lowered for this CPU; the TPU compile is tests/test_compile)."""
    config = latent_mnist_config(mnist_vae_path)
    run = aot.build_run(config, jax.devices()[:1])
    vae = vae_lib.load_vae(mnist_vae_path)
    _, lower_train = aot._train(run, online=True)
    train_argument = lower_train().args_info[0][3]["vae"]
    assert _paths(train_argument) == _paths(vae.encoder_params)
    _, lower_decode = aot._decode(run)
    decode_argument = lower_decode().args_info[0][0]
    assert _paths(decode_argument) == _paths(vae.decoder_params)


def test_config_vae_dtype_sets_the_compute_dtype_of_encode_and_decode(mnist_vae_path):
    config = latent_mnist_config(mnist_vae_path)
    config.vae.sample_posterior = False
    images = np.random.default_rng(1).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        config.vae.dtype = dtype
        config_lib.validate(config)
        vae = latent_space.load_run_vae(config)
        assert vae.dtype == dtype
        encode = latent_space.online_encode_step(config, lambda state, batch: batch["image"], vae)
        latents = encode(None, {"image": images}, vae.encoder_params)
        expected = vae_lib.encode(
            vae.arch, vae.params, images, scaling_factor=vae.scaling_factor, dtype=dtype
        )
        np.testing.assert_array_equal(latents, expected)
        pixels = latent_space.pixel_fn(vae)(vae.decoder_params, latents)
        decoded = vae_lib.decode(
            vae.arch, vae.params, latents, scaling_factor=vae.scaling_factor, dtype=dtype
        )
        np.testing.assert_array_equal(pixels, np.clip(decoded, -1, 1))
        # PixelDecoder runs it jitted on a padded chunk: other fusions, other roundings.
        chunked = latent_space.PixelDecoder(vae)(np.asarray(latents))
        np.testing.assert_allclose(chunked, pixels, atol=1e-5 if dtype == "float32" else 5e-2)
        assert latents.dtype == pixels.dtype == np.float32
        outputs[dtype] = (np.asarray(latents), pixels)
    for ours, reference in zip(outputs["bfloat16"], outputs["float32"], strict=True):
        relative = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
        assert 1e-4 < relative < 0.1  # bfloat16 really used, and still close
    config.vae.dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match="vae.dtype"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="config.vae.dtype"):
        vae_lib.load_vae(mnist_vae_path, dtype="float16")


@pytest.fixture(scope="module")
def online_run(mnist_vae_path, tmp_path_factory) -> Path:
    """A 2-step run that encodes MNIST digits inside the train step."""
    workdir = tmp_path_factory.mktemp("online") / "run"
    history = train.train_and_evaluate(latent_mnist_config(mnist_vae_path, 2), str(workdir))
    assert np.isfinite(history[2]["loss"])
    return workdir


def test_online_latent_run_decodes_its_grids_and_samples(online_run, mnist_vae_path, tmp_path):
    config = latent_mnist_config(mnist_vae_path, 2)
    writer = train.SampleGridWriter(config, models.get_model(config), str(tmp_path), _NullWriter())
    grids = writer.write(checkpoint.load_run(str(online_run))[1], 2)
    for grid in grids.values():  # decoded pixels, clipped after decoding
        assert grid.shape == (6, 28, 28, 1) and grid.min() >= -1 and grid.max() <= 1

    out = tmp_path / "samples.npz"
    result = run_module(
        "shortcut_jax.sample",
        "--workdir",
        str(online_run),
        "--steps",
        "2",
        "--num",
        "5",
        "--out",
        str(out),
        "--format",
        "npz_float",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out) as saved:
        assert saved["images"].shape == (5, 28, 28, 1)
        assert saved["images"].min() >= -1 and saved["images"].max() <= 1


def test_evaluate_scores_decoded_samples_of_a_latent_run(online_run, tmp_path):
    result = run_module(
        "shortcut_jax.evaluate",
        "--workdir",
        str(online_run),
        "--steps",
        "1,8",
        "--num",
        "16",
        "--metrics",
        "fd_mnist",
        "--ref_num",
        "64",
        "--pr_num",
        "0",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["rows"]
    assert [row["steps"] for row in rows] == [1, 8]
    assert all(np.isfinite(row["fd_mnist"]) for row in rows)
    # FD-MNIST scored 28x28 pixels (the classifier rejects any other shape), not 7x7 latents.
    assert report["metrics"]["fd_mnist"]["ceiling"] > 0


def test_precomputed_latents_train_and_refuse_another_vae(mnist_vae_path, tmp_path):
    from shortcut_jax.tools import encode_latents

    config = latent_mnist_config(mnist_vae_path, total_steps=2)
    latent_dir = str(tmp_path / "latents")
    encode_latents.encode_dataset(
        config, latent_dir, batch_size=250, shard_size=2500, progress=False
    )
    config.data.latent_dir = latent_dir
    history = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(history[2]["loss"])

    other = str(tmp_path / "other_vae.npz")
    vae_lib.save_vae(other, vae_lib.random_vae(MNIST_ARCH, seed=1, scaling_factor=0.5))
    config.vae.path = other
    with pytest.raises(ValueError, match="encoded with other VAE weights"):
        train.train_and_evaluate(config, str(tmp_path / "run2"))


def test_tiny_variant_runs_the_whole_latent_path_from_one_command(tmp_path, request):
    """`main --config experiments/imagenet256.py:tiny`: generated images and VAE, online encoding,
    decoded grids and, with the converted Inception weights, FID of decoded samples at the end."""
    try:  # CI has the weights (SHORTCUT_JAX_REQUIRE_PARITY=1 turns their absence into a failure)
        inception_path = request.getfixturevalue("converted")
    except pytest.skip.Exception:
        inception_path = None
    env = {"SHORTCUT_JAX_CACHE": str(tmp_path / "cache")}
    if inception_path:
        env["SHORTCUT_JAX_INCEPTION"] = inception_path
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        result = run_module(
            "shortcut_jax.main",
            "--config",
            "experiments/imagenet256.py:tiny",
            "--workdir",
            str(tmp_path / "tiny"),
            "--config.total_steps=4",
            "--config.sample_steps=(1,128)",
            "--config.eval_steps=(1,128)",
        )
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert result.returncode == 0, result.stderr[-3000:]
    classes = sorted(p.name for p in (tmp_path / "cache" / "tiny_latent" / "images").iterdir())
    assert classes == ["disc", "square"]
    saved = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert saved["vae"]["path"].endswith("vae.npz") and saved["data"]["name"] == "image_folder"
    grid = Path(tmp_path / "tiny" / "samples" / "step_0000004.png")
    from PIL import Image

    with Image.open(grid) as image:  # two columns of decoded 64x64 RGB images
        assert image.mode == "RGB" and image.width > 2 * 64
    if inception_path:
        assert saved["eval_every_steps"] > 0 and saved["eval_metrics"] == "fid"  # at the end
        # 1 step unguided, 128 steps guided (bootstrap_cfg: the 'auto' guidance policy).
        assert "eval/fid/steps_1" in result.stderr and "eval/fid/steps_128" in result.stderr


class _NullWriter:
    def write_images(self, step, images):
        del step, images
