"""Latent datasets: tools/encode_latents.py writes them, data/latents.py reads them.

A tiny random VAE (2 blocks of 8 and 16 channels: downsample 2) encodes a generated 3-class image
folder (PNGs of assorted sizes, some RGBA, one nested), a mocked TFDS ImageNet, and the process
layout test runs the CLI as two processes through jax.distributed.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import free_port, run_processes

from shortcut_jax import configs, data
from shortcut_jax.data import latents, preprocess
from shortcut_jax.models import vae as vae_lib
from shortcut_jax.tools import encode_latents
from tests.test_image_folder import make_folder, take

REPO = Path(__file__).resolve().parents[1]
ARCH = vae_lib.VaeArch(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
IMAGE_SIZE = 16  # latents 8 x 8 x 4
COUNT = 15  # 3 classes x 5 images
SHARD_SIZE = 6  # shards of 6, 6 and 3
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latents")
    paths = {"images": root / "images", "vae": root / "vae.npz", "other_vae": root / "vae1.npz"}
    make_folder(paths["images"])
    vae_lib.save_vae(paths["vae"], vae_lib.random_vae(ARCH, seed=0))
    vae_lib.save_vae(paths["other_vae"], vae_lib.random_vae(ARCH, seed=1))
    return {**paths, "root": root}


def encode_config(workspace: dict[str, Path], **data_fields) -> object:
    config = configs.base_config()
    config.data.name = "image_folder"
    config.data.image_dir = str(workspace["images"])
    config.data.image_size = IMAGE_SIZE
    config.data.channels = 3
    config.data.num_classes = 3
    config.data.update(data_fields)
    config.vae.path = str(workspace["vae"])
    config.vae.downsample_factor = ARCH.downsample_factor
    return config


def encode(config, out: Path, **kwargs) -> dict | None:
    kwargs = {"batch_size": BATCH_SIZE, "shard_size": SHARD_SIZE, "progress": False, **kwargs}
    return encode_latents.encode_dataset(config, str(out), **kwargs)


@pytest.fixture(scope="module")
def encoded(workspace) -> Path:
    out = workspace["root"] / "encoded"
    encode(encode_config(workspace), out)
    return out


def all_records(latent_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """indices (N,), labels (N,), moments (N, 4, h, w, c) float32 of every record, by index."""
    metadata = latents.read_metadata(str(latent_dir))
    readers = latents.ShardReaders(str(latent_dir), metadata)
    try:
        records = [latents.decode_record(r) for r in readers.read(range(metadata["count"]))]
    finally:
        readers.close()
    indices = np.array([record[0] for record in records])
    labels = np.array([record[1] for record in records])
    return indices, labels, np.stack([record[2] for record in records]).astype(np.float32)


def vae_moments(workspace, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vae = vae_lib.load_vae(workspace["vae"])
    encode_fn = jax.jit(lambda params, x: vae_lib.encode_moments(ARCH, params, x))
    mean, std = encode_fn(vae.params, jnp.asarray(preprocess.to_float(pixels)))
    return np.asarray(mean), np.asarray(std)


# --- encode_latents -----------------------------------------------------------------------------


def test_metadata_describes_source_vae_preprocessing_and_shards(workspace, encoded):
    metadata = latents.read_metadata(str(encoded))
    vae = vae_lib.load_vae(workspace["vae"])
    assert metadata["count"] == COUNT
    assert metadata["latent_shape"] == [8, 8, 4]
    assert metadata["scaling_factor"] == pytest.approx(0.18215)
    assert metadata["vae"]["checksum"] == vae.checksum
    assert metadata["vae"]["arch"]["block_out_channels"] == [8, 16]
    assert metadata["class_names"] == ["bird", "cat", "dog"] and metadata["num_classes"] == 3
    assert metadata["source"]["name"] == "image_folder" and metadata["source"]["count"] == COUNT
    assert len(metadata["source"]["file_list_sha256"]) == 64
    assert metadata["preprocessing"]["crop"] == "adm_center_crop"
    assert metadata["preprocessing"]["image_size"] == IMAGE_SIZE
    assert metadata["flip_policy"].startswith("both")
    assert metadata["storage_dtype"] == "float32"
    assert [(s["start"], s["count"]) for s in metadata["shards"]] == [(0, 6), (6, 6), (12, 3)]
    assert metadata["moment_stats"]["std_min"] > 0
    files = sorted(os.listdir(encoded))
    assert files == [
        "metadata.json",
        "plan.json",
        *[f"shard-{i:05d}-of-00003.{ext}" for i in range(3) for ext in ("arrayrecord", "json")],
    ]  # no temporary files left


def test_records_hold_the_vae_moments_of_the_cropped_images_and_of_their_mirrors(
    workspace, encoded
):
    images = preprocess.indexed_images(encode_config(workspace))
    rows = list(images.read(0, COUNT))
    pixels = np.stack([row[1] for row in rows])
    mean, std = vae_moments(workspace, pixels)
    mirror_mean, mirror_std = vae_moments(workspace, pixels[:, :, ::-1])
    indices, labels, moments = all_records(encoded)
    np.testing.assert_array_equal(indices, np.arange(COUNT))
    np.testing.assert_array_equal(labels, [row[2] for row in rows])
    for position, expected in enumerate((mean, std, mirror_mean, mirror_std)):
        # The same float32 VAE at another batch size: jax 0.12.1's XLA differs by 1.2e-6 in one
        # element of 3,840 (a reduction order).
        np.testing.assert_allclose(moments[:, position], expected, rtol=1e-5, atol=2e-6)
    assert not np.allclose(mirror_mean, mean[:, :, ::-1], atol=1e-3)  # the VAE is not equivariant


def test_interrupted_encoding_resumes_to_the_uninterrupted_files(workspace, encoded, tmp_path):
    out = tmp_path / "resumed"
    config = encode_config(workspace)
    with pytest.raises(encode_latents.EncodingInterruptedError):
        encode(config, out, interrupt_after_shards=1)
    first = out / "shard-00000-of-00003.arrayrecord"
    partial = out / ".shard-00001-of-00003.arrayrecord.tmp"
    assert first.exists() and partial.exists()
    assert not (out / "shard-00001-of-00003.arrayrecord").exists()
    assert not (out / "metadata.json").exists()
    with pytest.raises(FileNotFoundError, match="encoding has not finished"):
        latents.read_metadata(str(out))
    before = (first.stat().st_mtime_ns, first.read_bytes())
    metadata = encode(config, out)
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before  # not redone
    assert not partial.exists()
    assert sorted(os.listdir(out)) == sorted(os.listdir(encoded))
    for name in os.listdir(encoded):
        assert filecmp.cmp(out / name, encoded / name, shallow=False), name
    assert metadata == latents.read_metadata(str(encoded))
    assert encode(config, out) == metadata  # a complete directory: nothing to do


def test_a_directory_begun_with_another_vae_or_preprocessing_is_refused(workspace, encoded):
    config = encode_config(workspace)
    config.vae.path = str(workspace["other_vae"])
    with pytest.raises(encode_latents.PlanMismatchError) as error:
        encode(config, encoded)
    message = str(error.value)
    assert "vae.checksum" in message and "source" not in message.split("Differences")[1]
    with pytest.raises(encode_latents.PlanMismatchError) as error:
        encode(encode_config(workspace, image_size=8), encoded, shard_size=5)
    message = str(error.value)
    assert "preprocessing.image_size" in message and "shard_size" in message
    assert "vae.checksum" not in message


def test_vae_that_does_not_match_the_config_is_refused(workspace, tmp_path):
    config = encode_config(workspace)
    config.vae.latent_channels = 8
    config.vae.downsample_factor = 8
    with pytest.raises(ValueError, match=r"latent_channels=8 .* has 4; .*downsample_factor=8"):
        encode(config, tmp_path)
    config = encode_config(workspace)
    config.vae.path = ""
    with pytest.raises(ValueError, match=r"config\.vae\.path is empty"):
        encode(config, tmp_path)


def test_float16_storage_rounds_within_half_an_ulp_and_reports_it(workspace, encoded, tmp_path):
    out = tmp_path / "half"
    metadata = encode(encode_config(workspace), out, storage_dtype="float16")
    assert metadata["storage_dtype"] == "float16"
    rounding = metadata["moment_stats"]["float16_rounding_over_std"]
    assert (
        rounding == latents.read_metadata(str(encoded))["moment_stats"]["float16_rounding_over_std"]
    )
    assert 0 < rounding["mean_max"] < 1e-3 and 0 < rounding["std_max"] <= 2**-11
    _, _, half = all_records(out)
    _, _, full = all_records(encoded)
    np.testing.assert_allclose(half, full, rtol=2**-11, atol=1e-7)
    record = latents.ShardReaders(str(out), latents.read_metadata(str(out))).read([0])[0]
    assert len(record) == latents.HEADER.size + 4 * 8 * 8 * 4 * 2


# --- LatentSource -------------------------------------------------------------------------------


def latent_config(encoded: Path, batch_size: int = BATCH_SIZE, **fields) -> object:
    config = configs.base_config()
    config.batch_size = batch_size
    config.data.latent_dir = str(encoded)
    config.data.image_size = IMAGE_SIZE
    config.data.num_classes = 3
    config.vae.sample_posterior = fields.pop("sample_posterior", True)
    config.data.random_flip = fields.pop("random_flip", True)
    config.data.update(fields)
    return config


def test_latent_source_batches_follow_the_contract(encoded):
    source = data.get_source(latent_config(encoded))
    assert isinstance(source, latents.LatentSource)
    assert isinstance(source, data.DataSource)
    assert source.element_shape == (8, 8, 4) and source.num_classes == 3
    batch = next(source.iterate(0))
    assert batch["image"].shape == (4, 8, 8, 4) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    _, labels, _ = all_records(encoded)
    np.testing.assert_array_equal(batch["label"], labels[source.order.local_indices(0)])
    unconditional = data.get_source(latent_config(encoded, num_classes=0))
    assert not next(unconditional.iterate(0))["label"].any()


def test_latent_source_is_deterministic_and_resumes_at_any_step(encoded):
    source = data.get_source(latent_config(encoded))  # 3 steps per epoch
    batches = take(source.iterate(0), 8)
    epoch = np.concatenate([source.order.local_indices(step) for step in range(3)])
    assert len(set(epoch)) == 12  # 3 steps of 4 distinct examples out of 15
    for start in (1, 4, 7):
        for got, want in zip(take(source.iterate(start), 8 - start), batches[start:], strict=True):
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(source.batch(5)["image"], batches[5]["image"])
    again = take(data.get_source(latent_config(encoded)).iterate(0), 2)
    np.testing.assert_array_equal(again[1]["image"], batches[1]["image"])
    other = latent_config(encoded)
    other.seed = 1
    assert not np.array_equal(next(data.get_source(other).iterate(0))["image"], batches[0]["image"])


def test_latent_process_slices_concatenate_to_the_global_batch(encoded):
    config = latent_config(encoded, batch_size=6)
    whole = take(data.get_source(config, 0, 1).iterate(0), 4)
    halves = [take(data.get_source(config, index, 2).iterate(0), 4) for index in (0, 1)]
    for step in range(4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key]
            )


def test_latent_flips_use_the_mirror_moments_and_means_are_scaled(encoded):
    _, _, moments = all_records(encoded)
    scale = np.float32(0.18215)
    for random_flip in (False, True):
        config = latent_config(encoded, sample_posterior=False, random_flip=random_flip)
        source = data.get_source(config)
        mirrored = []
        for step, batch in enumerate(take(source.iterate(0), 6)):
            records = moments[source.order.local_indices(step)]
            plain = np.all(np.isclose(batch["image"], scale * records[:, 0]), axis=(1, 2, 3))
            mirror = np.all(np.isclose(batch["image"], scale * records[:, 2]), axis=(1, 2, 3))
            assert np.all(plain | mirror)
            mirrored.extend(mirror & ~plain)
        assert (0 < sum(mirrored) < len(mirrored)) == random_flip


def test_latent_posterior_samples_are_mean_plus_std_times_standard_normal(encoded):
    _, _, moments = all_records(encoded)
    scale = np.float32(0.18215)
    source = data.get_source(latent_config(encoded, random_flip=False))
    noise = []
    for step, batch in enumerate(take(source.iterate(0), 6)):
        records = moments[source.order.local_indices(step)]
        noise.append((batch["image"] / scale - records[:, 0]) / records[:, 1])
    noise = np.concatenate(noise)  # 24 x 256 values
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    assert not np.allclose(noise[:4], noise[12:16])  # fresh noise at every step


def test_latent_real_examples_are_scaled_means_in_the_reference_order(encoded):
    _, labels, moments = all_records(encoded)
    examples = data.get_source(latent_config(encoded)).real_examples(5)
    order = data.image_folder.reference_order(COUNT)[:5]
    np.testing.assert_allclose(examples["image"], 0.18215 * moments[order, 0], rtol=1e-6)
    np.testing.assert_array_equal(examples["label"], labels[order])


def test_latent_source_errors_name_the_problem(encoded, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)latent_dir=.*does not exist.*encode_latents"):
        data.get_source(latent_config(tmp_path / "missing"))
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"(?s)encoding has not finished.*encode_latents"):
        data.get_source(latent_config(tmp_path))
    config = latent_config(encoded)
    config.vae.scaling_factor = 0.13025
    with pytest.raises(ValueError, match=r"config\.vae\.scaling_factor=0\.13025 .* 0\.18215"):
        data.get_source(config)
    with pytest.raises(ValueError, match=r"config\.data\.num_classes=10 .* has 3 classes"):
        data.get_source(latent_config(encoded, num_classes=10))
    with pytest.raises(ValueError, match=r"config\.data\.image_size=256 .* from 16x16 images"):
        data.get_source(latent_config(encoded, image_size=256))
    with pytest.raises(ValueError, match=r"config\.batch_size=32 exceeds the 15 examples"):
        data.get_source(latent_config(encoded, batch_size=32))


# --- Other sources for encoding -----------------------------------------------------------------


def test_mocked_tfds_imagenet_is_decoded_with_pil_and_encoded(tfds, workspace, tmp_path):
    config = encode_config(workspace, name="tfds", tfds_name="imagenet2012", num_classes=1000)
    with tfds.testing.mock_data(num_examples=5):
        metadata = encode(config, tmp_path, shard_size=2)
        source = tfds.data_source(  # the random-access reader the TFDS path encodes from
            "imagenet2012",
            split="train",
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        raw = [source[index] for index in range(5)]
    assert metadata["count"] == 5 and len(metadata["shards"]) == 3
    assert metadata["source"]["tfds_name"] == "imagenet2012" and metadata["num_classes"] == 1000
    pixels = np.stack(
        [preprocess.decode_image_bytes(example["image"], IMAGE_SIZE) for example in raw]
    )
    mean, _ = vae_moments(workspace, pixels)
    indices, labels, moments = all_records(tmp_path)
    np.testing.assert_array_equal(indices, np.arange(5))
    np.testing.assert_array_equal(labels, [example["label"] for example in raw])
    np.testing.assert_allclose(moments[:, 0], mean, rtol=1e-5, atol=1e-6)


# --- Two processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(workspace, encoded, tmp_path):
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from shortcut_jax import configs\n\n\ndef get_config():\n"
        "    config = configs.base_config()\n"
        "    config.data.name = 'image_folder'\n"
        f"    config.data.image_size = {IMAGE_SIZE}\n"
        "    config.data.num_classes = 3\n"
        "    config.data.channels = 3\n"
        f"    config.vae.downsample_factor = {ARCH.downsample_factor}\n"
        "    return config\n"
    )
    out = tmp_path / "two"
    port = free_port()
    command = [
        sys.executable, "-m", "shortcut_jax.tools.encode_latents", f"--config={config_file}",
        f"--config.data.image_dir={workspace['images']}", f"--config.vae.path={workspace['vae']}",
        f"--out={out}", f"--batch_size={BATCH_SIZE}", f"--shard_size={SHARD_SIZE}",
        "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
    ]  # fmt: skip
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    environment.pop("XLA_FLAGS", None)
    run_processes(
        [[*command, f"--process_id={index}"] for index in range(2)], env=environment, timeout=300
    )
    assert sorted(os.listdir(out)) == sorted(os.listdir(encoded))
    for name in os.listdir(encoded):
        assert filecmp.cmp(out / name, encoded / name, shallow=False), name
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["count"] == COUNT
    shutil.rmtree(out)
