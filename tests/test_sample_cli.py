"""`python -m shortcut_jax.sample` writes what FID tools read: the ADM evaluator's .npz (default),
float .npz, a PNG folder; locally or on a bucket; chunk by chunk, whole or not at all."""

from __future__ import annotations

import functools
import os
import tracemalloc
import zipfile

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image
from tiny import run_module, tiny_mnist_config

from shortcut_jax import checkpoint, images, models, optim, sample
from shortcut_jax.state import init_state

NUM = 10  # with --batch_size 4: chunks of 4, 4 and 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A checkpoint of the tiny MNIST DiT at initialisation (class-conditional, 10 classes)."""
    workdir = str(tmp_path_factory.mktemp("sample_cli") / "run")
    config = tiny_mnist_config()
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    state = jax.jit(functools.partial(init_state, config, model, optimizer))()
    manager = checkpoint.make_manager(workdir, for_training=True)
    checkpoint.save(manager, state, config, 3)
    manager.wait_until_finished()
    manager.close()
    return workdir


def run_sample(run: str, out, *flags: str) -> None:
    result = run_module(
        "shortcut_jax.sample",
        f"--workdir={run}",
        f"--num={NUM}",
        "--steps=2",
        "--batch_size=4",
        f"--out={out}",
        *flags,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def float_samples(run, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("float") / "samples.npz"
    run_sample(run, out, "--format=npz_float")
    with np.load(out) as stored:
        return {key: stored[key] for key in stored.files}


@pytest.fixture(scope="module")
def adm_file(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("adm") / "samples.npz"
    run_sample(run, out)  # no --format: adm is the default for images
    return out


def test_default_output_is_the_adm_npz_of_the_float_samples_quantized(adm_file, float_samples):
    with np.load(adm_file, allow_pickle=False) as stored:
        assert stored.files == ["arr_0", "arr_1"]
        pixels, labels = stored["arr_0"], stored["arr_1"]
    assert pixels.dtype == np.uint8 and pixels.shape == (NUM, 28, 28, 1)
    floats = float_samples["images"]
    assert floats.dtype == np.float32 and floats.shape == (NUM, 28, 28, 1)
    # guided-diffusion's image_sample.py: ((x + 1) * 127.5).clamp(0, 255).to(uint8)
    np.testing.assert_array_equal(pixels, np.clip((floats + 1) * 127.5, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(labels, np.arange(NUM) % 10)
    np.testing.assert_array_equal(labels, float_samples["labels"])
    assert sorted(os.listdir(adm_file.parent)) == ["samples.npz", "samples.png"]
    with zipfile.ZipFile(adm_file) as archive:  # np.savez's layout: stored, NAME.npy members
        assert [info.filename for info in archive.infolist()] == ["arr_0.npy", "arr_1.npy"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


def test_adm_npz_round_trips_into_the_fid_image_loader(adm_file):
    from shortcut_jax.tools import fid_stats

    with np.load(adm_file) as stored:
        pixels = stored["arr_0"]
    loaded = fid_stats.load_images(str(adm_file))  # floats in [-1, 1]: the uint8 values mapped
    np.testing.assert_allclose(loaded, pixels.astype(np.float32) / 127.5 - 1, atol=1e-6)


def test_png_folder_holds_one_file_per_sample_in_order(run, adm_file, tmp_path):
    out = tmp_path / "pngs"
    run_sample(run, out, "--format=png")
    names = sorted(os.listdir(out))
    assert names == [f"{index:06d}.png" for index in range(NUM)] + ["labels.txt"]
    with np.load(adm_file) as stored:
        expected, labels = stored["arr_0"], stored["arr_1"]
    for index, name in enumerate(names[:NUM]):
        with Image.open(out / name) as image:
            assert image.size == (28, 28) and image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), expected[index, ..., 0])
    assert (out / "labels.txt").read_text().split() == [str(label) for label in labels]
    assert sorted(os.listdir(tmp_path)) == ["pngs", "pngs.png"]  # no temporary folder left


def test_adm_npz_goes_to_a_bucket(run, adm_file, gcs_bucket):
    out = f"{gcs_bucket}/eval/samples.npz"
    run_sample(run, out)
    with epath.Path(out).open("rb") as file, np.load(file) as stored, np.load(adm_file) as local:
        np.testing.assert_array_equal(stored["arr_0"], local["arr_0"])
        np.testing.assert_array_equal(stored["arr_1"], local["arr_1"])
    assert epath.Path(f"{gcs_bucket}/eval/samples.png").exists()


def test_png_format_refuses_an_npz_path_in_one_line(run, tmp_path):
    result = run_module(
        "shortcut_jax.sample",
        f"--workdir={run}",
        "--format=png",
        f"--out={tmp_path}/samples.npz",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--format png writes a folder" in errors[0], result.stderr[-2000:]


# ------------------------------------------------------------------ the writers, in-process


def test_adm_quantization_truncates_where_the_grid_rounds():
    values = np.array([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0, np.nan], np.float32)
    np.testing.assert_array_equal(images.quantize_adm(values), [0, 0, 0, 127, 254, 255, 255, 127])
    assert images.to_uint8(np.float32(0.999)) == 255  # rounding: the grids, not the files


@pytest.mark.parametrize("fmt", ["adm", "npz_float"])
def test_writing_many_chunks_holds_one_chunk_in_memory(tmp_path, fmt):
    chunk, chunks, shape = 25, 60, (64, 64, 3)
    labels = np.arange(chunk * chunks) % 7
    rng = np.random.default_rng(0)

    def draw():  # what sample_chunks yields: fresh float32 chunks
        for index in range(chunks):
            pixels = rng.random((chunk, *shape), dtype=np.float32)
            pixels *= 2
            pixels -= 1
            yield pixels, labels[index * chunk : (index + 1) * chunk]

    tracemalloc.start()
    try:
        out = str(tmp_path / "s.npz")
        with sample.sample_writer(out, fmt, chunk * chunks, shape, labels, True) as write:
            shown = sample.write_chunks(draw(), write, chunk * chunks, grid=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    chunk_bytes = chunk * int(np.prod(shape)) * 4  # one float32 chunk: 1.2 MB
    total_uint8 = chunks * chunk_bytes // 4  # 18 MB (74 MB as floats)
    # A few chunks in flight (the next one is drawn while the last is still named), not 60.
    assert peak < min(6 * chunk_bytes, total_uint8 / 2), (peak, chunk_bytes)
    assert shown.shape == (30, *shape)
    with np.load(tmp_path / "s.npz") as stored:
        key = "arr_0" if fmt == "adm" else "images"
        assert stored[key].shape == (chunk * chunks, *shape)
        np.testing.assert_array_equal(stored["arr_1" if fmt == "adm" else "labels"], labels)


def test_a_failed_write_leaves_no_file_and_no_folder(tmp_path):
    labels = np.zeros(4, np.int32)
    for fmt, out in (("adm", tmp_path / "s.npz"), ("png", tmp_path / "pngs")):
        writer = sample.sample_writer(str(out), fmt, 4, (8, 8, 1), labels, True)
        with pytest.raises(ValueError, match="missing 2 rows|2 of 4 samples"), writer as write:
            write(np.zeros((2, 8, 8, 1), np.float32), labels[:2])
    assert os.listdir(tmp_path) == []


def test_a_png_folder_replaces_an_older_one_whole(tmp_path):
    out = tmp_path / "pngs"
    for num in (5, 3):
        pixels = np.full((num, 8, 8, 3), 0.5, np.float32)
        sample.write_samples(
            str(out), pixels, np.zeros(num), title="", grid=2, num_classes=0, fmt="png"
        )
    assert sorted(os.listdir(out)) == [f"{index:06d}.png" for index in range(3)]
    assert sorted(os.listdir(tmp_path)) == ["pngs", "pngs.png"]


def test_a_bucket_png_folder_that_holds_files_is_refused(gcs_bucket):
    pixels = np.zeros((2, 8, 8, 1), np.float32)
    out = f"{gcs_bucket}/pngs"
    sample.write_samples(out, pixels, np.zeros(2), title="", grid=2, num_classes=0, fmt="png")
    assert sorted(path.name for path in epath.Path(out).iterdir()) == ["000000.png", "000001.png"]
    with pytest.raises(FileExistsError, match="already holds files"):
        sample.write_samples(out, pixels, np.zeros(2), title="", grid=2, num_classes=0, fmt="png")


def test_chunks_are_the_samples_of_one_sample_batch_call(run):
    from shortcut_jax import objectives, sampling, sharding, steps

    mesh = sharding.make_mesh(sharding.single_device_config(), jax.local_devices())
    config, params, _ = checkpoint.load_params(run, mesh=mesh)
    labels = sampling.default_labels(NUM, 10)
    rng = jax.random.PRNGKey(3)
    settings = {"num_steps": 2, "cfg_scale": 1.5}
    chunks = list(
        sample.sample_chunks(config, params, rng, labels, batch_size=4, mesh=mesh, **settings)
    )
    assert [len(pixels) for pixels, _ in chunks] == [4, 4, 2]
    expected, _ = sampling.sample_batch(
        steps.make_apply_fn(models.get_model(config)),
        params,
        rng,
        num=NUM,
        shape=(28, 28, 1),
        labels=labels,
        num_steps=2,
        denoise_timesteps=config.denoise_timesteps,
        cfg_scale=1.5,
        num_classes=10,
        mesh=mesh,
        sharding_rules=sharding.logical_rules(config),
        objective=objectives.ObjectiveConfig.from_config(config),
    )
    got = np.concatenate([pixels for pixels, _ in chunks])
    np.testing.assert_allclose(got, np.clip(expected, -1, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([chunk for _, chunk in chunks]), labels)


def test_an_unconditional_adm_file_holds_arr_0_alone(tmp_path):
    out = str(tmp_path / "s.npz")
    pixels = np.linspace(-1, 1, 3 * 4 * 4 * 3, dtype=np.float32).reshape(3, 4, 4, 3)
    sample.write_samples(out, pixels, np.zeros(3), title="", grid=3, num_classes=0, fmt="adm")
    with np.load(out) as stored:
        assert stored.files == ["arr_0"]
        np.testing.assert_array_equal(stored["arr_0"], images.quantize_adm(pixels))
