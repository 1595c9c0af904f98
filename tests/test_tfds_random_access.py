"""TFDS read by index: one preprocessing for every image path, O(1) resume, TFRecord refused.

A tiny TFDS dataset of random images of odd shapes is built offline (ArrayRecord, and once as
TFRecord), and the same images are written as PNG files into a folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shortcut_jax import configs, data
from shortcut_jax.data import preprocess

COUNT, SIZE = 24, 16


def random_images() -> list[np.ndarray]:
    """COUNT random RGB images of different shapes (some smaller, some >2x larger than SIZE)."""
    rng = np.random.default_rng(7)
    shapes = rng.integers(9, 70, size=(COUNT, 2))
    return [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in shapes]


@pytest.fixture(scope="module")
def builder_class(tfds):
    class ShortcutJaxRandomShapes(tfds.core.GeneratorBasedBuilder):
        """COUNT random images of varied shapes, in index order; label = index % 2."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=2),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index, image in enumerate(random_images()):
                yield index, {"image": image, "label": index % 2}

    return ShortcutJaxRandomShapes


def build(tfds, builder_class, directory, file_format: str) -> str:
    del builder_class  # registered by its fixture
    builder = tfds.builder(
        "shortcut_jax_random_shapes", data_dir=str(directory), file_format=file_format
    )
    builder.download_and_prepare()
    return str(directory)


@pytest.fixture(scope="module")
def array_record_dir(tfds, builder_class, tmp_path_factory) -> str:
    return build(tfds, builder_class, tmp_path_factory.mktemp("array_record"), "array_record")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    """The same images as PNG files 000.png ... (unconditional folder: index order = name)."""
    root = tmp_path_factory.mktemp("pngs")
    for index, image in enumerate(random_images()):
        Image.fromarray(image).save(root / f"{index:03d}.png")
    return str(root)


def tfds_config(data_dir: str, **fields) -> object:
    config = configs.base_config()
    config.batch_size = 8
    config.data.update(
        name="tfds", tfds_name="shortcut_jax_random_shapes", data_dir=data_dir, image_size=SIZE
    )
    config.data.update(channels=3, num_classes=0, random_flip=True, **fields)
    return config


def folder_config(image_dir: str) -> object:
    config = tfds_config("")
    config.data.update(name="image_folder", image_dir=image_dir, tfds_name="")
    return config


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, count))


def test_one_image_gives_one_array_through_tfds_folders_and_indexed_images(
    array_record_dir, image_dir
):
    tfds_source = data.get_source(tfds_config(array_record_dir))
    folder_source = data.get_source(folder_config(image_dir))
    tfds_indexed = preprocess.indexed_images(tfds_config(array_record_dir))
    folder_indexed = preprocess.indexed_images(folder_config(image_dir))
    for index, original in enumerate(random_images()):
        expected = preprocess.center_crop_adm(Image.fromarray(original), SIZE)
        np.testing.assert_array_equal(tfds_indexed.load(index)[0], expected)
        np.testing.assert_array_equal(folder_indexed.load(index)[0], expected)
    # Same count, seed and epoch tags: the TFDS and the folder source serve identical batches.
    for tfds_batch, folder_batch in zip(
        take(tfds_source.iterate(2), 4), take(folder_source.iterate(2), 4), strict=True
    ):
        np.testing.assert_array_equal(tfds_batch["image"], folder_batch["image"])


@pytest.mark.parametrize("name", ["tfds", "image_folder"])
def test_resuming_at_step_k_reads_only_the_examples_of_steps_from_k_on(
    name, array_record_dir, image_dir
):
    config = tfds_config(array_record_dir) if name == "tfds" else folder_config(image_dir)
    source = data.get_source(config, 1, 2)
    expected = take(source.iterate(10**6 + 2), 2)
    read: list[int] = []
    lock = threading.Lock()
    load = source.images.load

    def counting_load(index: int) -> tuple[np.ndarray, int]:
        with lock:
            read.append(index)
        return load(index)

    source.images = dataclasses.replace(source.images, load=counting_load)
    iterator = source.iterate(10**6)
    batches = take(iterator, 4)
    iterator.close()
    np.testing.assert_array_equal(batches[2]["image"], expected[0]["image"])
    allowed = {int(i) for step in range(10**6, 10**6 + 7) for i in source.order.local_indices(step)}
    assert set(read) <= allowed and len(read) <= 7 * source.local_batch_size


def test_tfrecord_builds_are_refused_with_the_command_that_converts_them(
    tfds, builder_class, tmp_path
):
    data_dir = build(tfds, builder_class, tmp_path, "tfrecord")
    with pytest.raises(ValueError) as error:
        data.get_source(tfds_config(data_dir))
    message = str(error.value)
    assert "config.data.tfds_name='shortcut_jax_random_shapes'" in message
    assert "stored as TFRecord" in message
    version_dir = f"{data_dir}/shortcut_jax_random_shapes/1.0.0"
    assert f"--dataset_version_dir={version_dir} --out_file_format=array_record" in message
    assert "--file_format array_record" in message


def test_an_unknown_split_names_the_field_and_the_splits(array_record_dir):
    with pytest.raises(ValueError, match=r"config\.data\.tfds_split='nope'.*'train'"):
        data.get_source(tfds_config(array_record_dir, tfds_split="nope"))


def test_a_tfrecord_build_converted_in_place_is_read_by_index(
    tfds, builder_class, array_record_dir, tmp_path
):
    """What `tfds convert_format` does in place: add the ArrayRecord shards, list the format."""
    data_dir = build(tfds, builder_class, tmp_path, "tfrecord")
    version = "shortcut_jax_random_shapes/1.0.0"
    for shard in Path(array_record_dir, version).glob("*.array_record-*"):
        shutil.copy(shard, Path(data_dir, version))
    info_path = Path(data_dir, version, "dataset_info.json")
    info = json.loads(info_path.read_text())
    info["alternativeFileFormats"] = ["array_record"]
    info_path.write_text(json.dumps(info))
    converted = take(data.get_source(tfds_config(data_dir)).iterate(5), 2)
    native = take(data.get_source(tfds_config(array_record_dir)).iterate(5), 2)
    for converted_batch, native_batch in zip(converted, native, strict=True):
        np.testing.assert_array_equal(converted_batch["image"], native_batch["image"])


def test_an_array_record_build_in_a_bucket_gives_the_local_batches(
    array_record_dir, gcs, gcs_bucket, monkeypatch
):
    from etils import epath

    # array_record's C++ GCS client (google-cloud-cpp) finds the emulator through this variable.
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", gcs.url)
    data_dir = f"{gcs_bucket}/tfds"
    for path in Path(array_record_dir).rglob("*"):
        if path.is_file():
            relative = path.relative_to(array_record_dir).as_posix()
            (epath.Path(data_dir) / relative).write_bytes(path.read_bytes())
    remote = take(data.get_source(tfds_config(data_dir)).iterate(10**6), 2)
    local = take(data.get_source(tfds_config(array_record_dir)).iterate(10**6), 2)
    for remote_batch, local_batch in zip(remote, local, strict=True):
        np.testing.assert_array_equal(remote_batch["image"], local_batch["image"])
