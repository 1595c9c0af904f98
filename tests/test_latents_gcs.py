"""Latent directories in a bucket (the GCS emulator): encode, resume, read through the shard cache.

The same tiny VAE and 15-image folder as tests/test_latents.py, encoded once to a local directory
(the reference) and once straight to gs://; every object must equal its local file and every batch
read from the bucket must equal the batch read locally.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from shortcut_jax import atomic_files, configs, data
from shortcut_jax.data import latents, shard_cache
from shortcut_jax.models import vae as vae_lib
from shortcut_jax.tools import encode_latents
from tests.test_image_folder import make_folder, take

ARCH = vae_lib.VaeArch(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
IMAGE_SIZE = 16  # latents 8 x 8 x 4
COUNT = 15


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latents_gcs")
    paths = {"images": root / "images", "vae": root / "vae.npz", "root": root}
    make_folder(paths["images"])
    vae_lib.save_vae(paths["vae"], vae_lib.random_vae(ARCH, seed=0))
    return paths


def encode_config(workspace: dict[str, Path]) -> object:
    config = configs.base_config()
    config.data.name = "image_folder"
    config.data.image_dir = str(workspace["images"])
    config.data.image_size = IMAGE_SIZE
    config.data.channels = 3
    config.data.num_classes = 3
    config.vae.path = str(workspace["vae"])
    config.vae.downsample_factor = ARCH.downsample_factor
    return config


def encode(workspace, out: str, shard_size: int, **kwargs) -> dict | None:
    return encode_latents.encode_dataset(
        encode_config(workspace), out, batch_size=4, shard_size=shard_size, progress=False, **kwargs
    )


def latent_config(latent_dir: str, batch_size: int = 4, **data_fields) -> object:
    config = configs.base_config()
    config.batch_size = batch_size
    config.data.latent_dir = latent_dir
    config.data.image_size = IMAGE_SIZE
    config.data.num_classes = 3
    config.data.random_flip = True
    config.vae.sample_posterior = True
    config.data.update(data_fields)
    return config


@pytest.fixture(scope="module")
def local_encoded(workspace) -> dict[int, Path]:
    """Local reference encodes: {shard_size: directory}."""
    out = {}
    for shard_size in (6, 2):
        out[shard_size] = workspace["root"] / f"local_{shard_size}"
        encode(workspace, str(out[shard_size]), shard_size)
    return out


@pytest.fixture(scope="module")
def bucket_encoded(gcs, workspace) -> dict[int, str]:
    """The same encodes written straight to a bucket: {shard_size: 'gs://...'}."""
    bucket = gcs.bucket()
    out = {}
    for shard_size in (6, 2):
        out[shard_size] = f"{bucket}/latents_{shard_size}"
        encode(workspace, out[shard_size], shard_size)
    return out


def objects_under(gcs, directory: str) -> dict[str, bytes]:
    """{name relative to `directory`: content} of every object under it."""
    bucket, prefix = directory.removeprefix("gs://").split("/", 1)
    names = [name for name in gcs.list_objects(bucket) if name.startswith(prefix + "/")]
    return {
        name[len(prefix) + 1 :]: (epath.Path(f"gs://{bucket}") / name).read_bytes()
        for name in names
    }


def steps(source, start: int, count: int) -> list[dict[str, np.ndarray]]:
    """`count` batches from `start`; then closes the iterator (and so its shard cache)."""
    iterator = source.iterate(start)
    try:
        return take(iterator, count)
    finally:
        iterator.close()


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Polls `condition` (the iterator closes its producer thread asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for got, want in zip(first, second, strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


# --- encode_latents --out gs://... ----------------------------------------------------------------


def test_an_encode_to_a_bucket_writes_the_objects_a_local_encode_writes(
    gcs, local_encoded, bucket_encoded
):
    for shard_size in (6, 2):
        objects = objects_under(gcs, bucket_encoded[shard_size])
        local = local_encoded[shard_size]
        assert sorted(objects) == sorted(os.listdir(local))  # no temporary objects
        for name, content in objects.items():
            assert content == (local / name).read_bytes(), name
    assert latents.read_metadata(bucket_encoded[6]) == latents.read_metadata(str(local_encoded[6]))


def test_an_interrupted_encode_to_a_bucket_leaves_no_partial_shard_and_resumes(
    gcs, gcs_bucket, workspace, local_encoded
):
    out = f"{gcs_bucket}/resumed"
    with pytest.raises(encode_latents.EncodingInterruptedError):
        encode(workspace, out, 6, interrupt_after_shards=1)
    assert sorted(objects_under(gcs, out)) == [
        "plan.json",
        "shard-00000-of-00003.arrayrecord",
        "shard-00000-of-00003.json",
    ]  # the shard being written when it stopped is not in the bucket, not even in part
    with pytest.raises(FileNotFoundError, match="encoding has not finished"):
        latents.read_metadata(out)
    first = f"{out}/shard-00000-of-00003.arrayrecord"
    filesystem, path = atomic_files.bucket_filesystem(first)
    generation = filesystem.info(path)["generation"]
    metadata = encode(workspace, out, 6)
    assert filesystem.info(path, refresh=True)["generation"] == generation  # not uploaded again
    objects = objects_under(gcs, out)
    assert sorted(objects) == sorted(os.listdir(local_encoded[6]))
    for name, content in objects.items():
        assert content == (local_encoded[6] / name).read_bytes(), name
    assert metadata == latents.read_metadata(out)


def test_a_sigkilled_encode_to_a_bucket_leaves_no_partial_shard_and_resumes(
    gcs, gcs_bucket, workspace, local_encoded, tmp_path, monkeypatch
):
    import subprocess
    import sys
    import tempfile

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
    out, scratch_root = f"{gcs_bucket}/killed", tmp_path / "tmp" / "shortcut_jax_shard_scratch"
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TMPDIR": str(tmp_path / "tmp"),
        encode_latents.INTERRUPT_ENV: "1",
        encode_latents.KILL_ENV: "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "shortcut_jax.tools.encode_latents", f"--config={config_file}",
         f"--config.data.image_dir={workspace['images']}", f"--config.vae.path={workspace['vae']}",
         f"--out={out}", "--batch_size=4", "--shard_size=6"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr[-3000:]
    assert sorted(objects_under(gcs, out)) == [
        "plan.json",
        "shard-00000-of-00003.arrayrecord",
        "shard-00000-of-00003.json",
    ]
    assert len(os.listdir(scratch_root)) == 1  # the killed writer's local scratch
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    encode(workspace, out, 6)
    assert os.listdir(scratch_root) == []  # the abandoned scratch went too
    objects = objects_under(gcs, out)
    assert sorted(objects) == sorted(os.listdir(local_encoded[6]))
    for name, content in objects.items():
        assert content == (local_encoded[6] / name).read_bytes(), name


# --- LatentSource on gs:// -----------------------------------------------------------------------


def test_bucket_batches_equal_local_batches(local_encoded, bucket_encoded, tmp_path):
    cache_dir = str(tmp_path / "cache")
    remote = data.get_source(latent_config(bucket_encoded[6], latent_cache_dir=cache_dir))
    local = data.get_source(latent_config(str(local_encoded[6])))
    assert remote.remote and not local.remote
    assert_same_batches(steps(remote, 0, 6), steps(local, 0, 6))
    assert_same_batches(steps(remote, 4, 2), steps(local, 4, 2))  # resume
    assert_same_batches([remote.batch(5)], [local.batch(5)])
    assert_same_batches([remote.real_examples(9)], [local.real_examples(9)])
    assert wait_until(lambda: os.listdir(cache_dir) == [])  # each cache removed its directory


def test_a_cache_smaller_than_the_set_stays_in_budget_and_serves_the_same_batches(
    local_encoded, bucket_encoded, tmp_path, monkeypatch
):
    latent_dir = bucket_encoded[2]  # 8 shards of 2 examples (the last holds 1)
    shard_bytes = epath.Path(f"{latent_dir}/shard-00000-of-00008.arrayrecord").stat().length
    budget = 3 * shard_bytes  # a batch of 2 reads at most 2 shards; the set is 8
    cache_dir = tmp_path / "cache"
    closed = []
    close = shard_cache.ShardCache.close
    monkeypatch.setattr(
        shard_cache.ShardCache, "close", lambda self: (closed.append(self), close(self))
    )
    config = latent_config(
        latent_dir, batch_size=2, latent_cache_bytes=budget, latent_cache_dir=str(cache_dir)
    )
    source = data.get_source(config)
    stop, peak = threading.Event(), [0]

    def size_on_disk() -> int:
        total = 0
        for directory, _, files in os.walk(cache_dir):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # evicted or renamed meanwhile
                    total += os.stat(os.path.join(directory, name)).st_size
        return total

    def watch() -> None:  # what is on disk, sampled while it trains
        while not stop.is_set():
            peak[0] = max(peak[0], size_on_disk())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        count = 3 * source.steps_per_epoch  # 21 steps: every shard is needed again and again
        remote = steps(source, 0, count)
        assert wait_until(lambda: closed)
    finally:
        stop.set()
        watcher.join()
    local_source = data.get_source(latent_config(str(local_encoded[2]), batch_size=2))
    assert_same_batches(remote, steps(local_source, 0, count))
    (cache,) = closed
    assert 0 < peak[0] <= budget and cache.peak_bytes <= budget
    assert cache.downloads > 8  # shards were evicted and fetched again, never all at once


def test_a_zero_cache_budget_reads_bucket_shards_in_place_with_the_local_batches(
    gcs, local_encoded, bucket_encoded, tmp_path, monkeypatch
):
    # ArrayRecord's own GCS client (google-cloud-cpp) finds the emulator through this variable.
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", gcs.url)
    cache_dir = tmp_path / "cache"
    config = latent_config(
        bucket_encoded[2], batch_size=4, latent_cache_bytes=0, latent_cache_dir=str(cache_dir)
    )
    remote = data.get_source(config)
    local = data.get_source(latent_config(str(local_encoded[2]), batch_size=4))
    assert_same_batches(steps(remote, 0, 5), steps(local, 0, 5))
    assert_same_batches([remote.real_examples(15)], [local.real_examples(15)])
    assert not cache_dir.exists()  # nothing downloaded


def test_a_cache_budget_below_one_batch_is_refused_naming_the_field(bucket_encoded):
    config = latent_config(bucket_encoded[2], batch_size=4, latent_cache_bytes=1000)
    with pytest.raises(
        ValueError, match=r"config\.data\.latent_cache_bytes=1000 cannot hold .* up to 4 shards"
    ):
        data.get_source(config)


def test_another_scaling_factor_than_the_bucket_metadata_is_refused(bucket_encoded):
    config = latent_config(bucket_encoded[6])
    config.vae.scaling_factor = 0.13025
    with pytest.raises(ValueError) as error:
        data.get_source(config)
    message = str(error.value)
    assert "config.vae.scaling_factor=0.13025" in message and "0.18215" in message
    assert f"{bucket_encoded[6]}/metadata.json" in message


def test_a_missing_bucket_directory_names_the_encode_command(gcs_bucket):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*encode_latents"):
        latents.read_metadata(f"{gcs_bucket}/nothing_here")


def test_config_refuses_a_cache_budget_that_is_no_count_of_bytes(bucket_encoded, workspace):
    from shortcut_jax import config_lib

    config = latent_config(bucket_encoded[6], latent_cache_bytes=-1)
    config.vae.path = str(workspace["vae"])
    config.vae.downsample_factor = ARCH.downsample_factor
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.latent_cache_bytes = -1"):
        config_lib.validate(config, device_count=1)


# --- tiny_latent assets in a bucket ---------------------------------------------------------------


def test_tiny_latent_assets_are_written_to_a_bucket_and_completed_after_an_interruption(
    gcs, gcs_bucket
):
    from shortcut_jax.tools import tiny_latent

    directory = f"{gcs_bucket}/tiny"
    assets = tiny_latent.ensure_assets(directory)
    assert assets == {"image_dir": f"{directory}/images", "vae_path": f"{directory}/vae.npz"}
    expected = sorted(["tiny/vae.npz", *(f"tiny/images/{n}" for n in tiny_latent.image_names())])
    assert sorted(gcs.list_objects(gcs_bucket)) == expected
    image = epath.Path(directory) / "images" / tiny_latent.image_names()[5]
    content = image.read_bytes()
    image.unlink()  # as if the upload had stopped before this image
    assert tiny_latent.ensure_assets(directory) == assets
    assert sorted(gcs.list_objects(gcs_bucket)) == expected and image.read_bytes() == content


# --- reflow pairs in a bucket --------------------------------------------------------------------


def test_pairs_in_a_bucket_load_like_local_pairs(gcs_bucket, tmp_path):
    from shortcut_jax import atomic_files
    from shortcut_jax.data import pairs

    rng = np.random.default_rng(0)
    metadata = {"num": 5, "num_shards": 2, "element_shape": [2, 2, 1], "num_classes": 0}
    shards = [
        {
            "noise": rng.standard_normal((n, 2, 2, 1), np.float32),
            "sample": rng.standard_normal((n, 2, 2, 1), np.float32),
            "label": np.zeros(n, np.int32),
        }
        for n in (3, 2)
    ]
    for directory in (f"{gcs_bucket}/pairs", str(tmp_path / "pairs")):
        atomic_files.write_json(epath.Path(directory) / pairs.METADATA_NAME, metadata)
        for index, arrays in enumerate(shards):
            atomic_files.write_npz(epath.Path(directory) / pairs.shard_name(index), **arrays)
    remote_metadata, remote = pairs.load_pairs(f"{gcs_bucket}/pairs")
    local_metadata, local = pairs.load_pairs(str(tmp_path / "pairs"))
    assert remote_metadata == local_metadata == metadata
    for key in ("noise", "sample", "label"):
        np.testing.assert_array_equal(remote[key], local[key])
    with pytest.raises(FileNotFoundError, match=r"pairs_dir = 'gs://.*' holds no pairs\.json"):
        pairs.read_metadata(f"{gcs_bucket}/no_pairs")


def test_listings_see_objects_another_host_wrote_since(gcs_bucket):
    import gcsfs

    directory = f"{gcs_bucket}/listing"
    (epath.Path(directory) / "a").write_bytes(b"a")
    assert {entry.name for entry in epath.Path(directory).iterdir()} == {"a"}  # now cached
    other_host = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    other_host.pipe(f"{gcs_bucket.removeprefix('gs://')}/listing/b", b"b")
    assert shard_cache.list_names(directory) == {"a", "b"}
