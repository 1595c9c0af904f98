"""Tests for the ADM center crop (data/preprocess.py) and the image-folder source."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shortcut_jax import configs, data
from shortcut_jax.data import image_folder, mnist, preprocess

# --- ADM center crop ---------------------------------------------------------------------------


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A deterministic image whose every pixel differs from its mirror image's."""
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x * y / 255) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def test_center_crop_adm_halves_with_box_then_bicubic_then_crops_the_center():
    image = gradient_image(300, 200)
    # 200 >= 2 * 64 -> 150 x 100 (box); 100 < 128 stops; bicubic to short side 64 -> 96 x 64;
    # center crop: columns 16..80.
    expected = image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    expected = np.asarray(expected)[:, 16:80]
    np.testing.assert_array_equal(preprocess.center_crop_adm(image, 64), expected)


def test_center_crop_adm_halves_repeatedly_on_large_images_and_crops_tall_ones():
    image = gradient_image(130, 530)  # tall: box to 65 x 265, then (65 >= 64) to 32 x 132
    expected = image.resize((65, 265), Image.BOX).resize((32, 132), Image.BOX)
    expected = np.asarray(expected.resize((32, 132), Image.BICUBIC))[50:82]
    np.testing.assert_array_equal(preprocess.center_crop_adm(image, 32), expected)


@pytest.mark.parametrize(("width", "height"), [(5, 3), (16, 16), (40, 17), (1, 9), (257, 256)])
def test_center_crop_adm_gives_the_size_for_any_shape_including_tiny_upscaled(width, height):
    out = preprocess.center_crop_adm(gradient_image(width, height), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_center_crop_adm_keeps_a_solid_color_and_converts_modes_to_rgb():
    solid = Image.new("RGB", (37, 23), (200, 30, 90))
    np.testing.assert_array_equal(preprocess.center_crop_adm(solid, 8), np.full((8, 8, 3), 0) +
                                  np.array([200, 30, 90]))  # fmt: skip
    gray = preprocess.center_crop_adm(gradient_image(20, 30, "L"), 8)
    assert gray.shape == (8, 8, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    rgba = gradient_image(20, 20).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: ADM (PIL convert) drops alpha, keeps the colours
    np.testing.assert_array_equal(
        preprocess.center_crop_adm(rgba, 8), preprocess.center_crop_adm(gradient_image(20, 20), 8)
    )
    cmyk = preprocess.center_crop_adm(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), 4)
    np.testing.assert_array_equal(cmyk, np.broadcast_to([255, 0, 0], (4, 4, 3)))
    one_channel = preprocess.center_crop_adm(gradient_image(20, 30), 8, channels=1)
    assert one_channel.shape == (8, 8, 1)


# --- A generated image folder --------------------------------------------------------------------

CLASSES = ("bird", "cat", "dog")


def write_image(path: Path, identity: int, width: int, height: int, mode: str = "RGB") -> None:
    """Red channel = 10 * identity + 5 everywhere (survives crops); green a horizontal ramp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    rgb = np.stack([np.full((height, width), 10 * identity + 5), ramp, 255 - ramp], axis=-1)
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode == "RGBA":
        image = image.convert("RGBA")
    image.save(path)


def make_folder(root: Path, per_class: int = 5) -> list[tuple[str, int]]:
    """Writes a 3-class folder; returns (relative path, identity) in the expected order."""
    rng = np.random.default_rng(0)
    entries = []
    identity = 0
    for class_name in CLASSES:
        for index in range(per_class):
            name = f"{class_name}/img{index}.png"
            if index == per_class - 1:
                name = f"{class_name}/nested/deeper{index}.png"  # found recursively
            width, height = (int(side) for side in rng.integers(5, 48, 2))
            mode = "RGBA" if index == 1 else "RGB"
            write_image(root / name, identity, width, height, mode)
            entries.append((name, identity))
            identity += 1
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"")
    return sorted(entries, key=lambda entry: (CLASSES.index(entry[0].split("/")[0]), entry[0]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[tuple[str, int]]]:
    root = tmp_path_factory.mktemp("images")
    return root, make_folder(root)


def folder_config(root: Path, batch_size: int = 4, **data_fields) -> object:
    config = configs.base_config()
    config.batch_size = batch_size
    config.data.name = "image_folder"
    config.data.image_dir = str(root)
    config.data.image_size = 8
    config.data.channels = 3
    config.data.num_classes = 3
    config.data.update(data_fields)
    return config


def identities(images: np.ndarray) -> np.ndarray:
    red = preprocess.to_uint8(images[:, 4, 4, 0]).astype(int)
    return (red - 5) // 10


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, count))


def test_scan_orders_by_class_then_path_and_labels_by_sorted_folder(folder):
    root, entries = folder
    files, labels, class_names = preprocess.scan_image_dir(str(root))
    assert class_names == CLASSES
    assert files == [name for name, _ in entries]
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 5))


def test_image_folder_batches_follow_the_contract(folder):
    root, entries = folder
    source = data.get_source(folder_config(root))
    assert "image_folder" in data.NAMES
    assert isinstance(source, image_folder.ImageFolderSource)
    assert source.element_shape == (8, 8, 3) and source.num_classes == 3
    batch = next(source.iterate(0))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    identity_to_label = {identity: i // 5 for i, (_, identity) in enumerate(entries)}
    np.testing.assert_array_equal(
        batch["label"], [identity_to_label[i] for i in identities(batch["image"])]
    )


def test_image_folder_epochs_cover_every_image_once_and_resume_by_step(folder):
    root, _ = folder
    source = data.get_source(folder_config(root, batch_size=5))  # 3 steps per epoch
    batches = take(source.iterate(0), 7)
    epoch = np.concatenate([identities(batch["image"]) for batch in batches[:3]])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(15))
    second = np.concatenate([identities(batch["image"]) for batch in batches[3:6]])
    assert not np.array_equal(epoch, second)
    for start in (2, 4):
        resumed = take(source.iterate(start), 7 - start)
        for got, want in zip(resumed, batches[start:], strict=True):
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(source.batch(5)["image"], batches[5]["image"])
    again = take(data.get_source(folder_config(root, batch_size=5)).iterate(0), 2)
    np.testing.assert_array_equal(again[1]["image"], batches[1]["image"])
    other_seed = folder_config(root, batch_size=5)
    other_seed.seed = 1
    other = next(data.get_source(other_seed).iterate(0))
    assert not np.array_equal(other["image"], batches[0]["image"])


def test_image_folder_process_slices_concatenate_to_the_global_batch(folder):
    root, _ = folder
    config = folder_config(root, batch_size=6, random_flip=True)
    whole = take(data.get_source(config, 0, 1).iterate(0), 3)
    halves = [take(data.get_source(config, index, 2).iterate(0), 3) for index in (0, 1)]
    for step in range(3):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key]
            )


def test_image_folder_random_flip_mirrors_about_half_of_the_images(folder):
    root, _ = folder
    plain = np.concatenate(
        [b["image"] for b in take(data.get_source(folder_config(root)).iterate(0), 6)]
    )
    flipped = np.concatenate(
        [
            b["image"]
            for b in take(data.get_source(folder_config(root, random_flip=True)).iterate(0), 6)
        ]
    )
    same = np.all(plain == flipped, axis=(1, 2, 3))
    mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 4 <= mirrored.sum() <= 20


def test_image_folder_unconditional_layouts_give_zero_labels(folder, tmp_path):
    root, _ = folder
    assert not next(data.get_source(folder_config(root, num_classes=0)).iterate(0))["label"].any()
    for index in range(4):
        write_image(tmp_path / f"{index}.png", index, 12 + index, 9)
    source = data.get_source(folder_config(tmp_path, num_classes=0, channels=1))
    assert source.class_names == () and source.element_shape == (8, 8, 1)
    batch = next(source.iterate(0))
    assert batch["image"].shape == (4, 8, 8, 1) and not batch["label"].any()


def test_image_folder_real_examples_use_the_fixed_reference_order(folder):
    root, entries = folder
    examples = data.get_source(folder_config(root)).real_examples(6)
    order = image_folder.reference_order(15)[:6]
    np.testing.assert_array_equal(identities(examples["image"]), [entries[i][1] for i in order])
    np.testing.assert_array_equal(examples["label"], order // 5)
    assert len(set(examples["label"])) > 1


def test_indexed_images_enumerate_the_folder_once_in_order(folder, tmp_path):
    root, entries = folder
    images = preprocess.indexed_images(folder_config(root))
    assert images.count == 15 and images.class_names == CLASSES
    rows = list(images.read(3, 9))
    assert [row[0] for row in rows] == list(range(3, 9))
    assert [row[2] for row in rows] == [0, 0, 1, 1, 1, 1]
    pixels = np.stack([row[1] for row in rows])
    assert pixels.dtype == np.uint8 and pixels.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal((pixels[:, 4, 4, 0] - 5) // 10, [e[1] for e in entries[3:9]])
    fingerprint = images.description["file_list_sha256"]
    copy = tmp_path / "copy"
    make_folder(copy)
    assert preprocess.indexed_images(folder_config(copy)).description["file_list_sha256"] == (
        fingerprint
    )
    write_image(copy / "dog" / "extra.png", 99, 9, 9)
    assert preprocess.indexed_images(folder_config(copy)).description["file_list_sha256"] != (
        fingerprint
    )


# --- Errors ------------------------------------------------------------------------------------


def test_missing_or_empty_image_dir_raises_naming_the_field_and_layout(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(FileNotFoundError, match=r"config\.data\.image_dir=.*one folder per"):
            data.get_source(folder_config(path))


def test_class_count_mismatch_raises_naming_the_field(folder):
    root, _ = folder
    with pytest.raises(ValueError, match=r"config\.data\.num_classes=10 .* 3 class folders"):
        data.get_source(folder_config(root, num_classes=10))


def test_unreadable_image_is_named_in_the_error(tmp_path):
    for index in range(3):
        write_image(tmp_path / "a" / f"{index}.png", index, 10, 10)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    source = data.get_source(folder_config(tmp_path, num_classes=1))
    with pytest.raises(ValueError, match=r"Cannot read image file .*a/broken\.png"):
        source.real_examples(4)


def test_bad_layouts_and_channels_raise(tmp_path):
    write_image(tmp_path / "a" / "0.png", 0, 10, 10)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"empty_class.* has no image files"):
        data.get_source(folder_config(tmp_path, num_classes=0))
    (tmp_path / "empty_class").rmdir()
    write_image(tmp_path / "top.png", 1, 10, 10)
    with pytest.raises(ValueError, match=r"both class folders .* and image files at the top"):
        data.get_source(folder_config(tmp_path, num_classes=0))
    os.remove(tmp_path / "top.png")
    with pytest.raises(ValueError, match=r"config\.data\.channels=4"):
        data.get_source(folder_config(tmp_path, num_classes=0, channels=4))
    with pytest.raises(ValueError, match=r"config\.batch_size=4 exceeds the 1 images"):
        data.get_source(folder_config(tmp_path, num_classes=0))


# --- The other sources enumerated for encoding -------------------------------------------------


def test_mnist_embedded_is_enumerated_as_is_without_crop():
    config = configs.base_config()
    images = preprocess.indexed_images(config)
    assert images.count == 5000 and images.class_names == tuple("0123456789")
    rows = list(images.read(10, 13))
    digits, labels = mnist.load_mnist(28)
    np.testing.assert_array_equal(rows[0][1][..., 0], preprocess.to_uint8(digits[10, ..., 0]))
    np.testing.assert_array_equal(rows[0][1][..., 0], rows[0][1][..., 2])
    assert [row[2] for row in rows] == list(labels[10:13])


def test_prepared_tfds_split_is_read_by_index_slices(tfds, tmp_path):
    class ShortcutJaxLatentSizes(tfds.core.GeneratorBasedBuilder):
        """12 images of varying shapes; image i is filled with 20 * i, label i % 4."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=4),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index in range(12):
                shape = (9 + index, 30 - index, 3)
                yield index, {"image": np.full(shape, 20 * index, np.uint8), "label": index % 4}

    builder = tfds.builder(
        "shortcut_jax_latent_sizes", data_dir=str(tmp_path), file_format="array_record"
    )
    builder.download_and_prepare()
    config = configs.base_config()
    config.data.update(name="tfds", tfds_name="shortcut_jax_latent_sizes", data_dir=str(tmp_path))
    config.data.image_size = 8
    images = preprocess.indexed_images(config)
    assert images.count == 12 and images.description["version"] == "1.0.0"
    everything = list(images.read(0, 12))  # in the split's order (TFDS shuffles at build time)
    identity = [int(row[1][3, 3, 0]) // 20 for row in everything]
    assert sorted(identity) == list(range(12))
    assert [row[2] for row in everything] == [i % 4 for i in identity]
    rows = list(images.read(5, 9))  # a slice of the split, read on its own
    assert [row[0] for row in rows] == [5, 6, 7, 8]
    for row, whole in zip(rows, everything[5:9], strict=True):
        np.testing.assert_array_equal(row[1], whole[1])
        assert row[2] == whole[2] and row[1].shape == (8, 8, 3)
    config.data.tfds_split = "train[:50%]"  # random access reads split slices too
    half = preprocess.indexed_images(config)
    assert half.count == 6
    np.testing.assert_array_equal(half.load(2)[0], everything[2][1])


# --- A folder in a bucket (fake-gcs-server) ----------------------------------------------------


def test_image_folder_in_a_bucket_gives_the_same_batches_as_the_local_copy(folder, gcs_bucket):
    from etils import epath

    root, _ = folder
    image_dir = f"{gcs_bucket}/images"
    for path in root.rglob("*"):
        if path.is_file():
            (epath.Path(image_dir) / path.relative_to(root).as_posix()).write_bytes(
                path.read_bytes()
            )
    local = data.get_source(folder_config(root, random_flip=True))
    remote = data.get_source(folder_config(image_dir, random_flip=True))
    assert remote.class_names == CLASSES and remote.images.count == 15
    assert (
        remote.images.description["file_list_sha256"]
        == (local.images.description["file_list_sha256"])
    )
    for local_batch, remote_batch in zip(
        take(local.iterate(4), 2), take(remote.iterate(4), 2), strict=True
    ):
        np.testing.assert_array_equal(local_batch["image"], remote_batch["image"])
        np.testing.assert_array_equal(local_batch["label"], remote_batch["label"])
