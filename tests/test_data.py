"""Tests for shortcut_jax.data: the embedded MNIST, toy 2-D and TFDS sources."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from shortcut_jax import configs, data
from shortcut_jax.data import image_folder, mnist, toy2d


def mnist_config(seed: int = 0, batch_size: int = 32, **data_fields) -> object:
    config = configs.base_config()
    config.seed = seed
    config.batch_size = batch_size
    config.data.update(data_fields)
    return config


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, count))


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for batch_a, batch_b in zip(first, second, strict=True):
        np.testing.assert_array_equal(batch_a["image"], batch_b["image"])
        np.testing.assert_array_equal(batch_a["label"], batch_b["label"])


# --- Source selection --------------------------------------------------------------------------


def test_unknown_data_name_raises_naming_the_field_and_allowed_values():
    config = mnist_config(name="cifar_embedded")
    with pytest.raises(ValueError, match=r"config\.data\.name='cifar_embedded'.*toy2d"):
        data.get_source(config)


def test_batch_size_not_divisible_by_process_count_raises():
    with pytest.raises(ValueError, match=r"config\.batch_size=30"):
        data.get_source(mnist_config(batch_size=30), process_index=0, process_count=4)


# --- Embedded MNIST ----------------------------------------------------------------------------


def test_mnist_batches_follow_the_contract():
    source = data.get_source(mnist_config(batch_size=32))
    assert isinstance(source, data.DataSource)
    assert source.element_shape == (28, 28, 1)
    assert source.num_classes == 10
    batch = next(source.iterate(0))
    assert batch["image"].shape == (32, 28, 28, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,)
    assert batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() < 0.0 < batch["image"].max() <= 1.0
    assert set(np.unique(batch["label"])) <= set(range(10))


def test_mnist_has_500_real_digits_per_class_in_minus_one_to_one():
    examples = data.get_source(mnist_config()).real_examples(10_000)
    assert examples["image"].shape == (5000, 28, 28, 1)
    assert examples["image"].min() == -1.0 and examples["image"].max() == 1.0
    np.testing.assert_array_equal(np.bincount(examples["label"]), np.full(10, 500))
    few = data.get_source(mnist_config()).real_examples(16)
    assert few["image"].shape == (16, 28, 28, 1)
    assert len(np.unique(few["label"])) > 3  # a mixed grid, not sixteen zeros


def test_mnist_steps_of_one_epoch_cover_every_digit_exactly_once():
    source = data.get_source(mnist_config(batch_size=40))
    assert source.steps_per_epoch == 125
    indices = np.concatenate([source.global_indices(step) for step in range(125)])
    np.testing.assert_array_equal(np.sort(indices), np.arange(5000))
    next_epoch = np.concatenate([source.global_indices(step) for step in range(125, 250)])
    assert not np.array_equal(indices, next_epoch)  # reshuffled every epoch
    batch = source.batch(7)
    images, labels = mnist.load_mnist()
    np.testing.assert_array_equal(batch["image"], images[source.global_indices(7)])
    np.testing.assert_array_equal(batch["label"], labels[source.global_indices(7)])


def test_mnist_same_seed_gives_same_batches_and_other_seed_differs():
    first = take(data.get_source(mnist_config(seed=3)).iterate(0), 3)
    again = take(data.get_source(mnist_config(seed=3)).iterate(0), 3)
    other = take(data.get_source(mnist_config(seed=4)).iterate(0), 3)
    assert_same_batches(first, again)
    assert not np.array_equal(first[0]["label"], other[0]["label"])


def test_mnist_resume_at_step_k_yields_the_uninterrupted_batches():
    source = data.get_source(mnist_config(batch_size=1000))  # 5 steps per epoch
    uninterrupted = take(source.iterate(0), 13)
    for start_step in (1, 5, 7):
        resumed = take(source.iterate(start_step), 13 - start_step)
        assert_same_batches(resumed, uninterrupted[start_step:])


def test_mnist_two_processes_get_disjoint_halves_of_the_global_batch():
    config = mnist_config(batch_size=64)
    whole = data.get_source(config, 0, 1)
    halves = [data.get_source(config, index, 2) for index in (0, 1)]
    for step in (0, 200):
        first, second = (half.local_indices(step) for half in halves)
        assert len(first) == len(second) == 32
        assert not set(first) & set(second)
        np.testing.assert_array_equal(np.concatenate([first, second]), whole.local_indices(step))
        batches = [next(half.iterate(step)) for half in halves]
        np.testing.assert_array_equal(
            np.concatenate([batch["image"] for batch in batches]), whole.batch(step)["image"]
        )


def test_mnist_unconditional_labels_are_all_zero():
    source = data.get_source(mnist_config(num_classes=0))
    assert source.num_classes == 0
    assert not next(source.iterate(0))["label"].any()


def test_mnist_resizes_to_the_configured_image_size():
    source = data.get_source(mnist_config(image_size=16, batch_size=8))
    batch = next(source.iterate(0))
    assert source.element_shape == (16, 16, 1)
    assert batch["image"].shape == (8, 16, 16, 1)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_mnist_rejects_three_channels_naming_the_field():
    with pytest.raises(ValueError, match=r"config\.data\.channels=3"):
        data.get_source(mnist_config(channels=3))


# --- Toy 2-D ----------------------------------------------------------------------------------


def toy_config(toy_name: str = "checkerboard", seed: int = 0, batch_size: int = 256) -> object:
    config = mnist_config(seed=seed, batch_size=batch_size, name="toy2d", num_classes=0)
    config.data.toy_name = toy_name
    return config


@pytest.mark.parametrize("toy_name", toy2d.TOY_NAMES)
def test_toy2d_batches_are_deterministic_unconditional_points(toy_name):
    source = data.get_source(toy_config(toy_name))
    assert source.element_shape == (2,) and source.num_classes == 0
    first = take(source.iterate(0), 4)
    assert first[0]["image"].shape == (256, 2) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].shape == (256,) and first[0]["label"].dtype == np.int32
    assert not first[0]["label"].any()
    assert_same_batches(first, take(data.get_source(toy_config(toy_name)).iterate(0), 4))
    assert_same_batches(first[2:], take(source.iterate(2), 2))
    assert not np.array_equal(first[0]["image"], first[1]["image"])
    other_seed = next(data.get_source(toy_config(toy_name, seed=1)).iterate(0))
    assert not np.array_equal(first[0]["image"], other_seed["image"])
    points = source.real_examples(4000)["image"]
    assert points.shape == (4000, 2)
    assert np.all(np.abs(points) < 1.6)
    assert np.all((points.std(axis=0) > 0.3) & (points.std(axis=0) < 1.0))


def test_toy2d_process_slices_concatenate_to_the_one_process_global_batch():
    config = toy_config(batch_size=64)
    whole = next(data.get_source(config).iterate(3))
    first, second = (next(data.get_source(config, index, 2).iterate(3)) for index in (0, 1))
    assert first["image"].shape == (32, 2)
    assert not np.array_equal(first["image"], second["image"])
    np.testing.assert_array_equal(np.concatenate([first["image"], second["image"]]), whole["image"])


def test_eight_gaussians_has_eight_tight_modes_on_the_unit_circle():
    points = toy2d.sample_toy("eight_gaussians", 8000, np.random.default_rng(0))
    angle = np.round(np.arctan2(points[:, 1], points[:, 0]) / (np.pi / 4)) % 8
    assert len(np.unique(angle)) == 8
    centers = np.stack([np.cos(angle * np.pi / 4), np.sin(angle * np.pi / 4)], axis=1)
    assert 0.08 < np.std(points - centers) < 0.12


def test_unknown_toy_name_raises_naming_the_field():
    with pytest.raises(ValueError, match=r"config\.data\.toy_name='spiral'"):
        data.get_source(toy_config("spiral"))


def test_toy2d_rejects_class_conditional_config():
    config = toy_config()
    config.data.num_classes = 10
    with pytest.raises(ValueError, match=r"config\.data\.num_classes=10"):
        data.get_source(config)


# --- TFDS (mocked: never touches the network) ------------------------------------------------


def tfds_config(
    tfds_name: str, image_size: int, num_classes: int, channels: int = 3, **data_fields
) -> object:
    config = mnist_config(batch_size=4, name="tfds", tfds_name=tfds_name, **data_fields)
    config.data.image_size = image_size
    config.data.num_classes = num_classes
    config.data.channels = channels
    config.data.shuffle_buffer = 16
    return config


@pytest.mark.parametrize(
    ("tfds_name", "image_size", "num_classes"),
    [("imagenet2012", 32, 1000), ("celeb_a_hq/256", 64, 0)],
)
def test_tfds_mock_batches_follow_the_contract_and_resume(tfds, tfds_name, image_size, num_classes):
    with tfds.testing.mock_data(num_examples=12):
        source = data.get_source(tfds_config(tfds_name, image_size, num_classes))
        assert source.element_shape == (image_size, image_size, 3)
        assert source.num_classes == num_classes
        batches = take(source.iterate(0), 5)  # crosses the 12-example epoch boundary
        resumed = take(source.iterate(3), 2)
        reference = source.real_examples(5)
    batch = batches[0]
    assert batch["image"].shape == (4, image_size, image_size, 3)
    assert batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    if num_classes:
        assert np.all((batch["label"] >= 0) & (batch["label"] < num_classes))
    else:
        assert not batch["label"].any()
    assert_same_batches(resumed, batches[3:])
    assert reference["image"].shape == (5, image_size, image_size, 3)


def test_tfds_random_flip_mirrors_some_images_and_keeps_the_rest(tfds):
    plain_config = tfds_config("imagenet2012", 32, 1000)
    flip_config = tfds_config("imagenet2012", 32, 1000, random_flip=True)
    with tfds.testing.mock_data(num_examples=12):
        plain = take(data.get_source(plain_config).iterate(0), 3)
        flipped = take(data.get_source(flip_config).iterate(0), 3)
    plain_images = np.concatenate([batch["image"] for batch in plain])
    flipped_images = np.concatenate([batch["image"] for batch in flipped])
    unchanged = np.all(plain_images == flipped_images, axis=(1, 2, 3))
    mirrored = np.all(plain_images[:, :, ::-1] == flipped_images, axis=(1, 2, 3))
    assert np.all(unchanged | mirrored)
    assert mirrored.any() and unchanged.any()


def test_tfds_grayscale_is_tiled_to_three_channels(tfds):
    with tfds.testing.mock_data(num_examples=8):
        batch = next(data.get_source(tfds_config("mnist", 28, 10, channels=3)).iterate(0))
    assert batch["image"].shape == (4, 28, 28, 3)
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_tfds_channel_mismatch_raises_naming_the_field(tfds):
    with (
        tfds.testing.mock_data(num_examples=8),
        pytest.raises(ValueError, match=r"config\.data\.channels=1"),
    ):
        data.get_source(tfds_config("cifar10", 32, 10, channels=1))


def test_tfds_missing_dataset_fails_fast_saying_how_to_prepare_it(tfds):
    with tempfile.TemporaryDirectory() as empty_dir:
        config = tfds_config("imagenet2012", 32, 1000, data_dir=empty_dir)
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError) as error:
            data.get_source(config)
        assert time.perf_counter() - start < 10.0
    message = str(error.value)
    assert "imagenet2012" in message
    assert "tfds build imagenet2012" in message and "--manual_dir" in message


def test_tfds_empty_name_raises_naming_the_field(tfds):
    with pytest.raises(ValueError, match=r"config\.data\.tfds_name"):
        data.get_source(tfds_config("", 32, 0))


# --- TFDS on a real (tiny, locally generated) prepared dataset ---------------------------------


@pytest.fixture(scope="module")
def tiny_tfds_dir(tfds, tmp_path_factory):
    """Prepares a 40-example dataset whose image i is filled with the value 5 * i."""

    class ShortcutJaxTinyColors(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index in range(40):
                yield index, {"image": np.full((8, 8, 3), 5 * index, np.uint8), "label": index % 3}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = tfds.builder(
        "shortcut_jax_tiny_colors", data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
    return data_dir


def tiny_example_ids(batches: list[dict]) -> np.ndarray:
    images = np.concatenate([batch["image"] for batch in batches])
    return np.round((images[:, 0, 0, 0] + 1.0) * 127.5 / 5).astype(int)


def test_tfds_process_slices_concatenate_to_the_same_global_batches_for_any_layout(tiny_tfds_dir):
    config = tfds_config("shortcut_jax_tiny_colors", 8, 3, data_dir=tiny_tfds_dir)
    config.batch_size = 8  # one epoch of the 40 examples is 5 steps
    whole = take(data.get_source(config).iterate(0), 10)
    first_epoch, second_epoch = tiny_example_ids(whole[:5]), tiny_example_ids(whole[5:])
    assert sorted(first_epoch) == list(range(40)) and sorted(second_epoch) == list(range(40))
    assert not np.array_equal(first_epoch, second_epoch)  # reshuffled every epoch
    np.testing.assert_array_equal(
        np.concatenate([batch["label"] for batch in whole]),
        np.concatenate([first_epoch, second_epoch]) % 3,
    )
    halves = [take(data.get_source(config, index, 2).iterate(0), 10) for index in (0, 1)]
    for step, batch in enumerate(whole):
        assert halves[0][step]["image"].shape == (4, 8, 8, 3)
        joined = np.concatenate([halves[0][step]["image"], halves[1][step]["image"]])
        np.testing.assert_array_equal(joined, batch["image"])
    resumed = data.get_source(config, 1, 2).iterate(7)
    assert_same_batches(take(resumed, 3), halves[1][7:])


def test_tfds_real_examples_follow_the_fixed_reference_order(tiny_tfds_dir):
    config = tfds_config("shortcut_jax_tiny_colors", 8, 3, data_dir=tiny_tfds_dir)
    examples = data.get_source(config, 1, 2).real_examples(6)
    assert examples["image"].shape == (6, 8, 8, 3)
    source = data.get_source(config)
    expected = [
        int(source.images.load(int(i))[0][0, 0, 0]) // 5
        for i in image_folder.reference_order(40)[:6]
    ]
    np.testing.assert_array_equal(tiny_example_ids([examples]), expected)


# --- The resume benchmark ----------------------------------------------------------------------


def test_resume_benchmark_quick_times_every_start_step_of_each_source(tmp_path):
    out = tmp_path / "resume.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "resume_benchmark.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["matmul_start"]["gflops_median"] > 0
    assert set(results["sources"]) == {"mnist_embedded", "toy2d", "image_folder"}
    for source in results["sources"].values():
        for step in ("0", "10000", "1000000"):
            assert source["first_batch"][step]["median"] > 0
