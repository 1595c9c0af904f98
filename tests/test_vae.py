"""The SD VAE in Flax (models.vae), its weight files and the converter (tools.convert_vae).

Parity is checked against diffusers' ``AutoencoderKL`` on torch CPU with random weights (biases
and GroupNorm affine parameters perturbed away from their init so that they matter), saved as
safetensors in diffusers names, in LDM names (checked against diffusers' own single-file LDM
converter) and inside a full-checkpoint-style file with the ``first_stage_model.`` prefix. The
parity tests need torch and diffusers and skip without them; the rest does not.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from shortcut_jax import sharding
from shortcut_jax.models import vae as vae_lib
from tests.tiny import run_module

# Full sd-vae-ft-mse structure at 32x32 (latents 4x4), and a small one of the same block
# structure (4 blocks, 2 resnets each, channels c, 2c, 4c, 4c) for the other layouts and bf16.
_FULL = vae_lib.SD_ARCH
_SMALL = vae_lib.VaeArch(block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
# Sampling, meshes and files do not depend on the depth: a 2-block VAE compiles in a fraction.
_TINY = vae_lib.VaeArch(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
_SIZE = 32

# Parity tolerance. Both sides compute in float32 with different convolution algorithms and
# summation orders (XLA:CPU vs oneDNN, up to 3*3*512 = 4608 terms per output, ~30 layers deep),
# so differences of a few float32 ulps per layer compound. Measured on this CPU with the full SD
# structure at 32x32 (moments up to ~0.7, decoded values up to ~1.5): max |diff| 1.7e-6 (mean),
# 1.9e-6 (std), 3.7e-6 (logvar), 1.3e-5 (decode); relative Frobenius 2.0e-6, 4.0e-7, 2.7e-6,
# 6.6e-6 (small structure from the LDM / full-checkpoint files: 8.9e-7 / 1.0e-5 max, 1.0e-6 /
# 3.6e-6 relative). Bounds: max |diff| 1e-5 (encode) and 1e-4 (decode), relative 2e-5 (3x the
# worst). They are tight on purpose so that subtle mistakes fail; measured with the full
# structure: GroupNorm eps 1e-5 instead of 1e-6 gives 2.6e-5 / 3.0e-5 (mean max / relative) and
# 2.3e-4 / 1.2e-4 (decode); a missing 1/sqrt(C) attention scale 9.5e-2 / 0.14 and 0.78 / 0.43;
# symmetric instead of (0, 1, 0, 1) downsample padding 0.50 / 0.45 on the mean.
_ENCODE_ATOL, _DECODE_ATOL, _RTOL_NORM = 1e-5, 1e-4, 2e-5
# bfloat16 parity (config.vae.dtype = 'bfloat16'), against diffusers in float32, full SD
# structure at 32x32. bfloat16 keeps 8 significant bits, so the error is set by rounding, not by
# mistakes: the yardstick is diffusers' own bfloat16 (model.to(torch.bfloat16)) on the same
# weights and inputs. Measured (max |diff| / relative Frobenius), ours vs diffusers bf16:
# mean 6.0e-3 / 6.8e-3 vs 5.9e-3 / 6.9e-3; std 4.0e-3 / 1.2e-3 vs 7.6e-3 / 2.5e-3; decode
# 3.3e-2 / 1.8e-2 vs 4.4e-2 / 2.2e-2 (GroupNorm statistics and the softmax stay float32 here).
# Bounds: about 3x our measured error, and at most twice diffusers' own bfloat16 error.
_BF16_BOUNDS = {"mean": (2e-2, 2e-2), "std": (1.5e-2, 5e-3), "decoded": (0.1, 6e-2)}


def _assert_parity(ours, reference, atol: float, what: str) -> None:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, what
    difference = np.abs(ours - reference)
    relative = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    print(f"{what}: max |diff| {difference.max():.2e}, relative Frobenius {relative:.2e}")
    assert difference.max() <= atol, (what, difference.max())
    assert relative <= _RTOL_NORM, (what, relative)


def _errors(ours, reference) -> tuple[float, float]:
    """(max |ours - reference|, relative Frobenius norm of the difference)."""
    difference = np.asarray(ours, np.float64) - np.asarray(reference, np.float64)
    return float(np.abs(difference).max()), float(
        np.linalg.norm(difference) / np.linalg.norm(reference)
    )


def _images(batch: int = 2, size: int = _SIZE, seed: int = 0) -> np.ndarray:
    """Smooth random images in [-1, 1] (B, size, size, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (batch, size // 4, size // 4, 3))
    noise = rng.uniform(-0.2, 0.2, (batch, size, size, 3))
    return np.clip(coarse.repeat(4, 1).repeat(4, 2) + noise, -1, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Fixtures: diffusers models with random weights, built and run once.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    """torch with diffusers; skips without them, fails if SHORTCUT_JAX_REQUIRE_PARITY=1 (CI)."""
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as error:
        if os.environ.get("SHORTCUT_JAX_REQUIRE_PARITY") == "1":
            pytest.fail(f"VAE parity needs torch and diffusers: {error}")
        pytest.skip(f"VAE parity needs torch and diffusers ({error})")
    torch.set_num_threads(2)
    return torch


def _diffusers_case(torch, arch: vae_lib.VaeArch, seed: int, bfloat16: bool = False) -> dict:
    """A diffusers AutoencoderKL of ``arch``, its numpy state dict and its outputs on _images().

    With ``bfloat16`` also diffusers' own bfloat16 outputs (``model.to(torch.bfloat16)``; the
    decode is of the float32 posterior mean), keyed ``mean_bf16``, ``std_bf16``,
    ``decoded_bf16``.
    """
    from diffusers import AutoencoderKL

    blocks = len(arch.block_out_channels)
    config = {
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "latent_channels": arch.latent_channels,
        "block_out_channels": arch.block_out_channels,
        "layers_per_block": arch.layers_per_block,
        "norm_num_groups": arch.norm_num_groups,
        "down_block_types": ("DownEncoderBlock2D",) * blocks,
        "up_block_types": ("UpDecoderBlock2D",) * blocks,
    }
    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    with torch.no_grad():  # biases (zero at init) and GroupNorm affine (1, 0) must matter
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    images = _images()
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        decoded = model.decode(posterior.mean).sample
    outputs = {}
    if bfloat16:
        state = {name: value.numpy().copy() for name, value in model.state_dict().items()}
        model = model.to(torch.bfloat16)
        with torch.no_grad():
            inputs = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.bfloat16)
            half = model.encode(inputs).latent_dist
            decoded_half = model.decode(posterior.mean.to(torch.bfloat16)).sample
        for name, value in (("mean", half.mean), ("std", half.std), ("decoded", decoded_half)):
            outputs[f"{name}_bf16"] = value.float().permute(0, 2, 3, 1).numpy()
    else:
        state = {name: value.numpy() for name, value in model.state_dict().items()}
    return {
        **outputs,
        "config": config,
        "state": state,
        "num_params": sum(p.numel() for p in model.parameters()),
        "images": images,
        "mean": posterior.mean.permute(0, 2, 3, 1).numpy(),
        "logvar": posterior.logvar.permute(0, 2, 3, 1).numpy(),
        "std": posterior.std.permute(0, 2, 3, 1).numpy(),
        "decoded": decoded.permute(0, 2, 3, 1).numpy(),
    }


@pytest.fixture(scope="module")
def full(torch, tmp_path_factory) -> dict:
    """The full SD structure, saved in diffusers names and loaded with ours."""
    case = _diffusers_case(torch, _FULL, seed=0, bfloat16=True)
    path = str(tmp_path_factory.mktemp("vae_full") / "diffusion_pytorch_model.safetensors")
    save_file(case["state"], path)
    case["vae"] = vae_lib.load_vae(path)
    return case


@pytest.fixture(scope="module")
def small(torch, tmp_path_factory) -> dict:
    """The small structure in diffusers names, LDM names and a full-checkpoint file."""
    case = _diffusers_case(torch, _SMALL, seed=1)
    directory = tmp_path_factory.mktemp("vae_small")
    case["diffusers_path"] = str(directory / "diffusion_pytorch_model.safetensors")
    save_file(case["state"], case["diffusers_path"])
    case["vae"] = vae_lib.load_vae(case["diffusers_path"], norm_num_groups=8)
    ldm = vae_lib.to_state_dict(case["vae"], layout="ldm")
    case["ldm"] = ldm
    case["ldm_path"] = str(directory / "vae-ft-mse-840000-ema-pruned.safetensors")
    save_file(ldm, case["ldm_path"])
    checkpoint = {f"first_stage_model.{name}": value for name, value in ldm.items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = np.ones((8, 4, 3, 3), np.float32)
    checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(8)
    case["checkpoint_path"] = str(directory / "sd-v1-5.safetensors")
    save_file(checkpoint, case["checkpoint_path"])
    return case


@pytest.fixture(scope="module")
def encode_jit():
    return jax.jit(vae_lib.encode_moments, static_argnums=(0, 3))


@pytest.fixture(scope="module")
def decode_jit():
    return jax.jit(vae_lib.decode, static_argnums=(0,), static_argnames=("scaling_factor", "dtype"))


@pytest.fixture(scope="module")
def small_vae() -> vae_lib.Vae:
    """A random VAE of the small structure (no torch needed), GroupNorm affine perturbed."""
    vae = vae_lib.random_vae(_SMALL, seed=1)
    rng = np.random.default_rng(1)
    flat = traverse_util.flatten_dict(vae.params, sep="/")
    for path, value in flat.items():
        if "norm" in path:
            flat[path] = (value + rng.normal(0, 0.1, value.shape)).astype(np.float32)
    params = traverse_util.unflatten_dict(flat, sep="/")
    return dataclasses.replace(vae, params=params, checksum=vae_lib.params_checksum(params))


@pytest.fixture(scope="module")
def tiny_vae() -> vae_lib.Vae:
    return vae_lib.random_vae(_TINY, seed=2)


@pytest.fixture(scope="module")
def compiled(tiny_vae) -> dict:
    """make_encoder / make_decoder of the tiny VAE on a 1-device mesh (each compiles once)."""
    mesh = sharding.make_mesh(sharding.single_device_config())
    return {
        "mean": vae_lib.make_encoder(tiny_vae, mesh, sample=False),
        "sample": vae_lib.make_encoder(tiny_vae, mesh, sample=True),
        "decode": vae_lib.make_decoder(tiny_vae, mesh),
    }


# --------------------------------------------------------------------------------------------
# Structure and names.
# --------------------------------------------------------------------------------------------


def test_sd_structure_has_the_83_7m_parameters_and_every_tensor_of_diffusers(full):
    vae = full["vae"]
    assert vae.arch == _FULL
    assert vae.num_params == full["num_params"] == 83_653_863
    names = {vae_lib.diffusers_name(path) for path in vae_lib.param_shapes(_FULL)}
    assert names == set(full["state"])


def test_sd_arch_maps_256_images_to_32x32x4_latents_and_back():
    params = traverse_util.unflatten_dict(
        {
            path: jax.ShapeDtypeStruct(shape, jnp.float32)
            for path, shape in vae_lib.param_shapes(_FULL).items()
        },
        sep="/",
    )
    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    latents = jax.eval_shape(
        lambda p, x: vae_lib.encode(_FULL, p, x, scaling_factor=0.18215), params, images
    )
    assert (latents.shape, latents.dtype) == ((2, 32, 32, 4), jnp.float32)
    decoded = jax.eval_shape(
        lambda p, z: vae_lib.decode(_FULL, p, z, scaling_factor=0.18215, dtype="bfloat16"),
        params,
        latents,
    )
    assert (decoded.shape, decoded.dtype) == ((2, 256, 256, 3), jnp.float32)
    assert _FULL.downsample_factor == 8


def test_ldm_names_are_those_diffusers_single_file_converter_reads(full, torch):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = vae_lib.to_state_dict(full["vae"], layout="ldm")
    # Spot checks of the LDM layout (as in vae-ft-mse-840000-ema-pruned.safetensors).
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in ldm
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert "encoder.down.3.downsample.conv.weight" not in ldm
    assert len(ldm) == len(full["state"])
    back = convert_ldm_vae_checkpoint(
        {k: torch.from_numpy(v) for k, v in ldm.items()}, full["config"]
    )
    assert set(back) == set(full["state"])
    for name, value in full["state"].items():
        np.testing.assert_array_equal(back[name].numpy(), value, err_msg=name)


def test_param_shapes_are_those_of_the_flax_init():
    arch = vae_lib.VaeArch(2, 1, 8, (32, 64, 64), layers_per_block=1, norm_num_groups=16)
    abstract = jax.eval_shape(
        vae_lib.AutoencoderKL(arch).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32),
    )
    flat = traverse_util.flatten_dict(abstract["params"], sep="/")
    assert {path: leaf.shape for path, leaf in flat.items()} == vae_lib.param_shapes(arch)


def test_arch_is_read_from_tensor_shapes():
    arch = vae_lib.VaeArch(1, 2, 8, (32, 64), layers_per_block=1, norm_num_groups=32)
    vae = vae_lib.random_vae(arch, seed=3)
    for layout in ("diffusers", "ldm"):
        read, flat = vae_lib.from_state_dict(vae_lib.to_state_dict(vae, layout))
        assert read == arch, layout
        assert vae_lib.params_checksum(traverse_util.unflatten_dict(flat, "/")) == vae.checksum


# --------------------------------------------------------------------------------------------
# Parity with diffusers.
# --------------------------------------------------------------------------------------------


def test_full_sd_vae_matches_diffusers_encode_and_decode(full, encode_jit, decode_jit):
    vae = full["vae"]
    mean, std = encode_jit(vae.arch, vae.params, full["images"], "float32")
    _assert_parity(mean, full["mean"], _ENCODE_ATOL, "full encode mean")
    _assert_parity(std, full["std"], _ENCODE_ATOL, "full encode std")
    logvar = 2 * np.log(np.asarray(std, np.float64))  # std = exp(logvar / 2), logvar in range
    _assert_parity(logvar, full["logvar"], _ENCODE_ATOL, "full encode logvar")
    scale = vae.scaling_factor
    decoded = decode_jit(vae.arch, vae.params, full["mean"] * scale, scaling_factor=scale)
    _assert_parity(decoded, full["decoded"], _DECODE_ATOL, "full decode")


def test_full_sd_vae_in_bfloat16_is_as_close_to_diffusers_as_diffusers_own_bfloat16(
    full, encode_jit, decode_jit
):
    vae, scale = full["vae"], full["vae"].scaling_factor
    mean, std = encode_jit(vae.arch, vae.params, full["images"], "bfloat16")
    decoded = decode_jit(
        vae.arch, vae.params, full["mean"] * scale, scaling_factor=scale, dtype="bfloat16"
    )
    for name, ours in (("mean", mean), ("std", std), ("decoded", decoded)):
        reference = np.asarray(full[name], np.float64)
        ours_max, ours_rel = _errors(ours, reference)
        theirs_max, theirs_rel = _errors(full[f"{name}_bf16"], reference)
        print(
            f"bf16 {name} vs diffusers float32: ours max {ours_max:.2e} rel {ours_rel:.2e}; "
            f"diffusers bf16 max {theirs_max:.2e} rel {theirs_rel:.2e}"
        )
        most, relative = _BF16_BOUNDS[name]
        assert ours_max <= most and ours_rel <= relative, (name, ours_max, ours_rel)
        assert ours_rel <= 2 * theirs_rel, (name, ours_rel, theirs_rel)
        assert ours_rel > 1e-4, name  # really computed in bfloat16 (float32: ~1e-6)


def test_ldm_and_full_checkpoint_files_load_the_same_weights_as_diffusers_names(
    small, encode_jit, decode_jit
):
    from safetensors.numpy import load_file

    # LDM attention q/k/v/proj_out are 1x1 convs: (C, C, 1, 1) in the file.
    assert load_file(small["ldm_path"])["decoder.mid.attn_1.proj_out.weight"].shape == (
        64,
        64,
        1,
        1,
    )
    reference = small["vae"]
    for path in (small["ldm_path"], small["checkpoint_path"]):
        vae = vae_lib.load_vae(path, norm_num_groups=8)
        assert vae.arch == _SMALL
        assert vae.checksum == reference.checksum, path
    vae = vae_lib.load_vae(small["checkpoint_path"], norm_num_groups=8)
    mean, _ = encode_jit(vae.arch, vae.params, small["images"], "float32")
    _assert_parity(mean, small["mean"], _ENCODE_ATOL, "small encode mean (full checkpoint)")
    scale = vae.scaling_factor
    decoded = decode_jit(vae.arch, vae.params, small["mean"] * scale, scaling_factor=scale)
    _assert_parity(decoded, small["decoded"], _DECODE_ATOL, "small decode (full checkpoint)")


def test_old_diffusers_attention_names_query_key_value_proj_attn_load(small, tmp_path):
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, value in small["state"].items():
        for new, old in renames.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[name] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
    path = str(tmp_path / "old.safetensors")
    save_file(state, path)
    assert vae_lib.load_vae(path, norm_num_groups=8).checksum == small["vae"].checksum


def test_attention_in_query_chunks_equals_plain_softmax_attention():
    # Above ATTENTION_QUERY_CHUNK positions (e.g. SDXL decode at 1024x1024: 128 x 128 = 16384),
    # queries are processed in chunks; the result must not change.
    q, k, v = np.random.default_rng(0).normal(size=(3, 2, 64, 16)).astype(np.float32)
    logits = np.einsum("bqc,bkc->bqk", q, k) / 4.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("bqk,bkc->bqc", weights / weights.sum(-1, keepdims=True), v)
    for chunk in (16, 64, 1000):
        np.testing.assert_allclose(vae_lib._attention(q, k, v, chunk), expected, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32_and_returns_float32(
    small_vae, encode_jit, decode_jit
):
    vae, scale, images = small_vae, small_vae.scaling_factor, _images()
    mean32, std32 = encode_jit(vae.arch, vae.params, images, "float32")
    mean16, std16 = encode_jit(vae.arch, vae.params, images, "bfloat16")
    latents = np.asarray(mean32) * scale
    decode32 = decode_jit(vae.arch, vae.params, latents, scaling_factor=scale)
    decode16 = decode_jit(vae.arch, vae.params, latents, scaling_factor=scale, dtype="bfloat16")
    for value in (mean16, std16, decode16):
        assert value.dtype == jnp.float32
    # bfloat16 keeps 8 significant bits (relative rounding up to 2^-9 = 2e-3 per op) and ~30
    # layers compound it. Measured here against our float32: relative Frobenius 1.4e-2 (mean),
    # 1.8e-3 (std), 3.6e-2 (decode; values up to ~2), max |diff| 9.2e-3, 5.1e-3, 6.4e-2.
    # diffusers itself in bfloat16 (model.to(torch.bfloat16)) deviates from its float32 output
    # by as much: on the perturbed small diffusers model, 8.4e-3 (mean) and 3.0e-2 (decode)
    # relative, 6.8e-2 max on the decode, where ours gave 8.8e-3 and 3.3e-2. Bound: relative
    # 8e-2 and max 0.2 (2-3x); float32 compute (~1e-7) fails the lower bound of 1e-4.
    for ours, reference in ((mean16, mean32), (std16, std32), (decode16, decode32)):
        ours, reference = np.asarray(ours), np.asarray(reference)
        relative = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
        print(f"bf16: relative {relative:.2e}, max {np.abs(ours - reference).max():.2e}")
        assert relative < 8e-2 and np.abs(ours - reference).max() < 0.2
        assert relative > 1e-4  # really computed in bfloat16 (float32 gives ~1e-7)


# --------------------------------------------------------------------------------------------
# Sampling, files, compiled functions.
# --------------------------------------------------------------------------------------------


def test_encode_with_rng_is_mean_plus_std_times_normal_scaled(tiny_vae, encode_jit, compiled):
    vae, scale, images = tiny_vae, tiny_vae.scaling_factor, _images()
    mean, std = encode_jit(vae.arch, vae.params, images, "float32")
    rng = jax.random.key(7)
    sample = np.asarray(compiled["sample"](images, rng))
    noise = (sample - np.asarray(mean) * scale) / (np.asarray(std) * scale)
    np.testing.assert_allclose(noise, jax.random.normal(rng, mean.shape), atol=1e-4)
    assert abs(noise.std() - 1) < 0.1  # 2 * 16 * 16 * 4 = 2048 draws
    assert not np.allclose(compiled["sample"](images, jax.random.key(8)), sample)
    np.testing.assert_allclose(compiled["mean"](images), mean * scale, atol=1e-6)


def test_npz_roundtrip_keeps_params_arch_scaling_and_checksum(small_vae, tmp_path):
    reference = small_vae
    out = tmp_path / "sub" / "vae.npz"
    vae_lib.save_vae(str(out), reference.params, reference.arch, vae_lib.SDXL_SCALING_FACTOR)
    assert sorted(os.listdir(out.parent)) == ["vae.npz"]  # no temporary left behind
    loaded = vae_lib.load_vae(str(out), dtype="bfloat16")
    assert (loaded.arch, loaded.scaling_factor, loaded.dtype) == (
        _SMALL,
        vae_lib.SDXL_SCALING_FACTOR,
        "bfloat16",
    )
    safetensors_path = str(tmp_path / "vae.safetensors")
    save_file(vae_lib.to_state_dict(reference, layout="ldm"), safetensors_path)
    from_safetensors = vae_lib.load_vae(safetensors_path, norm_num_groups=8)
    assert from_safetensors.scaling_factor == vae_lib.SD_SCALING_FACTOR  # the default
    assert loaded.checksum == from_safetensors.checksum == reference.checksum
    flat = traverse_util.flatten_dict(loaded.params, sep="/")
    for path, value in traverse_util.flatten_dict(reference.params, sep="/").items():
        np.testing.assert_array_equal(flat[path], value, err_msg=path)
    assert vae_lib.load_vae(str(out), scaling_factor=0.5).scaling_factor == 0.5
    vae_lib.save_vae(str(out), loaded, scaling_factor=0.25)  # overwrites in place
    assert vae_lib.load_vae(str(out)).scaling_factor == 0.25
    assert sorted(os.listdir(out.parent)) == ["vae.npz"]
    changed = dataclasses.replace(reference, params=jax.tree.map(lambda a: a * 2, reference.params))
    assert vae_lib.params_checksum(changed.params) != reference.checksum


def test_make_encoder_and_decoder_on_a_one_device_mesh_match_the_pure_functions(
    tiny_vae, compiled, encode_jit, decode_jit
):
    vae, images, rng = tiny_vae, _images(), jax.random.key(3)
    scale = vae.scaling_factor
    mean, std = encode_jit(vae.arch, vae.params, images, "float32")
    expected_sample = (mean + std * jax.random.normal(rng, mean.shape)) * scale
    np.testing.assert_allclose(compiled["mean"](images), mean * scale, atol=1e-6)
    sample = compiled["sample"](jnp.asarray(images), rng)
    np.testing.assert_allclose(sample, expected_sample, atol=1e-6)
    latents = np.asarray(mean) * scale
    decoded = compiled["decode"](latents)
    assert decoded.shape == images.shape and decoded.dtype == jnp.float32
    expected = decode_jit(vae.arch, vae.params, latents, scaling_factor=scale)
    np.testing.assert_allclose(decoded, expected, atol=1e-6)
    odd = compiled["decode"](jnp.asarray(latents[:1]))  # no padding needed on 1 device
    np.testing.assert_allclose(odd, expected[:1], atol=1e-6)
    without_mesh = vae_lib.make_encoder(vae, None, sample=False)(images)
    np.testing.assert_allclose(without_mesh, mean * scale, atol=1e-6)
    with pytest.raises(ValueError, match="needs an rng"):
        compiled["sample"](images)


# --------------------------------------------------------------------------------------------
# Converter and its errors.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state(tiny_vae) -> tuple[vae_lib.Vae, dict[str, np.ndarray]]:
    """The tiny random VAE and its diffusers-named state dict (no torch needed)."""
    return tiny_vae, vae_lib.to_state_dict(tiny_vae)


def test_missing_file_error_gives_the_convert_command(tmp_path):
    path = str(tmp_path / "nowhere" / "vae.npz")
    with pytest.raises(FileNotFoundError) as error:
        vae_lib.load_vae(path)
    assert "python -m shortcut_jax.tools.convert_vae --from" in str(error.value)
    assert f"--out {path}" in str(error.value)


def test_wrong_file_lists_missing_unexpected_and_wrong_shape_tensors_in_one_error(
    tiny_state, tmp_path
):
    _, state = tiny_state
    state = dict(state)
    state["encoder.conv_in.weight_renamed"] = state.pop("encoder.conv_out.weight")
    state["decoder.mid_block.resnets.1.conv2.bias"] = np.zeros(7, np.float32)
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    path = str(tmp_path / "broken.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError) as error:
        vae_lib.load_vae(path, norm_num_groups=8)
    message = str(error.value)
    assert "1 missing: encoder.conv_out.weight" in message
    assert "2 unexpected: encoder.conv_in.weight_renamed, encoder.extra.weight" in message
    assert "1 wrong shape: decoder.mid_block.resnets.1.conv2.bias (7,) (expected (32,))" in message
    with pytest.raises(ValueError, match="pass norm_num_groups"):  # 16 channels, 32 groups
        vae_lib.from_state_dict(tiny_state[1])


def test_pickled_torch_files_are_refused_without_unpickling(tmp_path):
    # A pickle that would run code if it were ever unpickled: os.system("touch <marker>").
    marker = tmp_path / "unpickled"
    payload = b"\x80\x02cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    for name in ("vae.ckpt", "vae.pt", "pytorch_model.bin", "weights"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match="never unpickles"):
            vae_lib.load_vae(str(tmp_path / name))
    with zipfile.ZipFile(tmp_path / "weights_zip", "w") as archive:  # torch's zip format
        archive.writestr("archive/data.pkl", payload)
    with pytest.raises(ValueError, match="never unpickles"):
        vae_lib.load_vae(str(tmp_path / "weights_zip"))
    assert not marker.exists()


def test_convert_cli_writes_an_npz_with_the_same_checksum(tiny_state, tmp_path):
    vae, state = tiny_state
    source = str(tmp_path / "sdxl_vae.safetensors")
    save_file(vae_lib.to_state_dict(vae, layout="ldm"), source)
    out = str(tmp_path / "vae.npz")
    module = "shortcut_jax.tools.convert_vae"
    done = run_module(
        module,
        f"--from={source}",
        f"--out={out}",
        "--scaling_factor=0.13025",
        "--norm_num_groups=8",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters: " in done.stdout and f"checksum: {vae.checksum}" in done.stdout
    assert "block_out_channels=(16, 32), layers_per_block=1" in done.stdout
    loaded = vae_lib.load_vae(out)
    assert (loaded.checksum, loaded.scaling_factor, loaded.arch) == (
        vae.checksum,
        0.13025,
        vae.arch,
    )
    missing = run_module(module, f"--from={tmp_path / 'no.safetensors'}", f"--out={out}")
    assert missing.returncode == 1 and "not found" in missing.stderr
