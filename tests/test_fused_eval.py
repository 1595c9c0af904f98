"""The fused evaluation (`evaluators.on_device`): sampling, decoding and features in one device
program per chunk give the features of the old host composition sample_batch -> decoder ->
compute_features, with the same non-finite errors, progress and kept samples, on one device and
on an eight-device mesh."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import run_on_cpu_devices

from shortcut_jax import latent_space, sampling
from shortcut_jax.evaluators import fd_mnist, features, fid, on_device
from shortcut_jax.models import vae as vae_lib

TINY_VAE = vae_lib.VaeArch(
    in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4
)


def velocity(params, x, t, d, labels):
    """A small nonlinear class-conditional 'model' (module level: hashable, compiles once)."""
    shift = params["class_shift"][labels].reshape((-1,) + (1,) * (x.ndim - 1))
    scale = params["scale"] * (1.0 + t + d).reshape(shift.shape)
    return jnp.tanh(scale * x + shift) - 0.5 * x


def nan_velocity(params, x, t, d, labels):
    """A model whose samples are NaN in one pixel of examples with odd labels."""
    odd = (labels % 2 == 1).reshape((-1,) + (1,) * (x.ndim - 1))
    first_pixel = (jnp.arange(x[0].size) == 0).reshape(x.shape[1:])
    return jnp.where(odd & first_pixel, jnp.nan, velocity(params, x, t, d, labels))


def model_params(num_classes: int = 3) -> dict[str, jax.Array]:
    return {"scale": jnp.float32(1.3), "class_shift": jnp.linspace(-0.6, 0.6, num_classes + 1)}


def _pooled_features(params, images):
    pooled = jax.image.resize(images.mean(-1), (images.shape[0], 4, 4), "linear")
    flat = pooled.reshape(images.shape[0], -1)
    return jnp.concatenate([flat, flat**2], axis=1) @ params


def pooled_net() -> features.FeatureNet:
    """Features = a fixed random projection of 4x4 average-pooled pixels (plus their squares)."""
    params = jax.random.normal(jax.random.PRNGKey(0), (32, 6))
    return features.FeatureNet("pooled", 6, params, _pooled_features, batch_size=5)


def mnist_net(batch_size: int = 8) -> features.FeatureNet:
    """The FD-MNIST classifier's architecture with random weights (no training, no cache)."""
    variables = fd_mnist.MnistClassifier().init(jax.random.PRNGKey(1), jnp.zeros((1, 28, 28, 1)))
    return features.FeatureNet(
        "mnist_random",
        fd_mnist.FEATURE_DIM,
        variables["params"],
        fd_mnist._apply_features,
        batch_size,
    )


def old_composition(nets, decoder, *, seed, num, shape, mesh=None, batch_size, **settings):
    """What `sweep` did before fusing: samples and images through the host, then features."""
    samples, _ = sampling.sample_batch(
        velocity,
        model_params(),
        jax.random.PRNGKey(seed),
        num=num,
        shape=shape,
        batch_size=batch_size,
        mesh=mesh,
        **settings,
    )
    images = decoder(samples)
    return [features.compute_features(net, images, mesh=mesh) for net in nets], images


SETTINGS = {"num_steps": 3, "denoise_timesteps": 8, "cfg_scale": 1.5, "num_classes": 3}


def test_noise_of_a_chunk_is_the_example_noise_bit_for_bit():
    rng = jax.random.PRNGKey(5)
    whole = np.asarray(sampling.example_noise(rng, 11, (4, 4, 1)))
    indices = 6 + jnp.arange(5, dtype=jnp.uint32)
    jitted = jax.jit(sampling.noise_at, static_argnums=2)(rng, indices, (4, 4, 1))
    np.testing.assert_array_equal(np.asarray(jitted), whole[6:])


def test_feature_passes_bound_the_images_per_device_and_divide_the_chunk():
    assert on_device.feature_passes(chunk=256, shards=1, per_device_batch=32) == 8
    assert on_device.feature_passes(chunk=256, shards=8, per_device_batch=32) == 1
    assert on_device.feature_passes(chunk=24, shards=2, per_device_batch=5) == 3  # 12 = 3 x 4
    assert on_device.feature_passes(chunk=5, shards=1, per_device_batch=2) == 5  # 5 is prime


def test_fused_features_equal_the_host_composition_in_pixel_space():
    nets = [pooled_net(), mnist_net(batch_size=2)]  # the second runs a chunk of 5 in 5 passes
    decoder = latent_space.PixelDecoder(None)
    common = {"seed": 3, "num": 13, "shape": (28, 28, 1), "batch_size": 5, **SETTINGS}
    expected, images = old_composition(nets, decoder, **common)
    seen = []
    got, kept = on_device.sample_features(
        velocity,
        model_params(),
        nets,
        decoder=decoder,
        keep_samples=7,
        progress=seen.append,
        **common,
    )
    assert [feats.shape for feats in got] == [(13, 6), (13, fd_mnist.FEATURE_DIM)]
    for fused, old in zip(got, expected, strict=True):
        np.testing.assert_allclose(fused, old, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept, images[:7], rtol=1e-6, atol=1e-6)
    assert seen == [15, 15, 9]  # chunks of 5, 5 and 3, each sampled and featurized twice


def test_fused_features_equal_the_host_composition_through_a_vae():
    decoder = latent_space.PixelDecoder(vae_lib.random_vae(TINY_VAE, seed=2), batch_size=4)
    nets = [pooled_net()]
    common = {"seed": 1, "num": 6, "shape": (8, 8, 4), "batch_size": 4, **SETTINGS}
    expected, images = old_composition(nets, decoder, **common)
    got, kept = on_device.sample_features(
        velocity, model_params(), nets, decoder=decoder, keep_samples=2, **common
    )
    assert images.shape == (6, 16, 16, 1) and kept.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept, images[:2], rtol=1e-5, atol=1e-5)
    # Decoded one image per pass (4 passes of the decoder over each chunk of 4): the same.
    in_passes = on_device.sample_statistics(
        velocity, model_params(), nets, decoder=decoder, decode_batch_size=1, **common
    )
    mu, sigma = fid.feature_statistics(expected[0])
    np.testing.assert_allclose(in_passes.statistics[0].statistics()[0], mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(in_passes.statistics[0].statistics()[1], sigma, atol=1e-5)


def test_streamed_statistics_equal_those_of_all_features_and_keep_only_the_first():
    nets = [pooled_net(), mnist_net(batch_size=2)]
    common = {"seed": 3, "num": 13, "shape": (28, 28, 1), "batch_size": 5, **SETTINGS}
    all_features, _ = on_device.sample_features(velocity, model_params(), nets, **common)
    result = on_device.sample_statistics(velocity, model_params(), nets, keep_features=7, **common)
    assert result.images.shape == (0, 28, 28, 1)
    for running, first, feats in zip(result.statistics, result.features, all_features, strict=True):
        assert running.count == 13 and first.shape == (7, feats.shape[1])
        np.testing.assert_array_equal(first, feats[:7])
        mu, sigma = fid.feature_statistics(feats)
        np.testing.assert_allclose(running.statistics()[0], mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(running.statistics()[1], sigma, rtol=1e-7, atol=1e-12)


def test_non_finite_samples_raise_with_the_counts_of_the_real_examples_only():
    # 5 examples in chunks of 4: labels 0 1 2 0 1, so examples 1 and 4 hold one NaN each; the
    # padding rows of the last chunk (labels 2 0 1) are not counted.
    with pytest.raises(
        features.NonFiniteImagesError, match=r"2 of 3,920 values .*\(in 2 of 5 images\)"
    ):
        on_device.sample_features(
            nan_velocity,
            model_params(),
            [pooled_net()],
            seed=0,
            num=5,
            shape=(28, 28, 1),
            batch_size=4,
            **{**SETTINGS, "cfg_scale": 1.0},  # guided, the odd null label 3 would spoil all
        )


def test_bad_inputs_get_one_clear_error():
    common = {"seed": 0, "shape": (2,), "num_steps": 1, "denoise_timesteps": 8}
    with pytest.raises(ValueError, match=r"decode to \(2,\)"):
        on_device.sample_features(velocity, model_params(), [pooled_net()], num=4, **common)
    with pytest.raises(ValueError, match="num must be >= 1"):
        on_device.sample_features(velocity, model_params(), [], num=0, **common)
    with pytest.raises(ValueError, match="num_steps"):
        on_device.sample_features(velocity, model_params(), [], num=4, **{**common, "num_steps": 9})


def test_sweep_refuses_a_decoder_that_cannot_run_on_the_device():
    from tiny import tiny_mnist_config

    from shortcut_jax.evaluators import sweep

    with pytest.raises(TypeError, match="PixelDecoder"):
        sweep.sweep(
            tiny_mnist_config(),
            model_params(),
            [],
            steps=[1],
            num=4,
            cfg_scale=1.0,
            apply_fn=velocity,
            decoder=lambda samples: samples,
        )


def test_fused_features_on_an_eight_device_mesh_equal_the_one_device_composition():
    script = textwrap.dedent(
        """
        import dataclasses, sys, numpy as np, jax
        sys.path.insert(0, "tests")
        from test_fused_eval import SETTINGS, model_params, old_composition, pooled_net, velocity
        from shortcut_jax import latent_space, sharding
        from shortcut_jax.evaluators import on_device
        assert jax.device_count() == 8
        mesh = sharding.make_mesh(sharding.single_device_config())
        params = jax.device_put(model_params(), sharding.replicated(mesh))
        common = {"seed": 4, "num": 21, "shape": (8, 8, 3), "batch_size": 12, **SETTINGS}
        decoder = latent_space.PixelDecoder(None)
        net = dataclasses.replace(pooled_net(), batch_size=1)  # 2 per device: 2 passes
        (expected,), images = old_composition([net], decoder, **common)
        (got,), kept = on_device.sample_features(
            velocity, params, [net], mesh=mesh, keep_samples=18, **common
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kept, images[:18], rtol=1e-6, atol=1e-6)
        print("OK", got.shape, kept.shape)
        """
    )
    stdout = run_on_cpu_devices(script)
    assert "OK (21, 6) (18, 8, 8, 3)" in stdout
