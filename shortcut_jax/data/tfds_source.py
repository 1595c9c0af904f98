"""Named, already prepared TFDS image datasets (ImageNet, CelebA-HQ, CIFAR-10, MNIST, ...).

`config.data.tfds_name` / `config.data.tfds_split` pick the dataset, read from
`config.data.data_dir` (or the TFDS default). Nothing is ever downloaded: a dataset that is not
prepared raises `FileNotFoundError` at once, saying how to prepare it (ImageNet and CelebA-HQ need
their files downloaded by hand into `config.data.manual_dir` first).

Pipeline per process: its own `tfds.split_for_jax_process` shard of the split -> seeded file and
example shuffles (on encoded images, so the buffer stays small) -> repeat -> decode -> center
square crop -> bicubic (antialiased) resize to `config.data.image_size` -> optional random
horizontal flip -> scale to [-1, 1] -> batches of B_local = config.batch_size // process_count.

Resume: the order is deterministic (fixed seeds, deterministic tf.data), and `iterate(k)` skips the
first k * B_local encoded examples *before* decoding. The skip still reads and shuffles those
records, so resuming late in a long run costs roughly the reading time of k batches (ImageNet at
~5-20k records/s per host: a few minutes per million examples skipped), not their decoding.

TensorFlow and TFDS are imported inside functions: importing `shortcut_jax.data` stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from shortcut_jax.data import check_seed, local_batch_size

# Datasets whose source files must be downloaded by hand before `tfds build` (plus any builder
# declaring MANUAL_DOWNLOAD_INSTRUCTIONS).
_MANUAL_DATASETS = ("imagenet2012", "celeb_a_hq")


def _seeds(seed: int, process_index: int, count: int) -> list[int]:
    """`count` independent non-negative int63 seeds derived from (seed, process_index)."""
    state = np.random.SeedSequence([seed, process_index, 0x7466]).generate_state(count, np.uint64)
    return [int(value >> np.uint64(1)) for value in state]


def prepare_instructions(config: ml_collections.ConfigDict, manual: bool = False) -> str:
    """How to prepare `config.data.tfds_name` (a shell command and its Python equivalent).

    Args:
      config: Experiment config; reads data.tfds_name, data.data_dir, data.manual_dir.
      manual: Whether the dataset needs a manual download into a manual_dir.

    Returns:
      A human-readable, multi-line instruction string.
    """
    name = config.data.tfds_name
    data_dir = config.data.data_dir or "~/tensorflow_datasets"
    manual_dir = config.data.manual_dir or "MANUAL_DIR"
    if manual:
        return (
            f"{name!r} needs a manual download: put its source archives in {manual_dir} "
            "(see https://www.tensorflow.org/datasets/catalog/"
            f"{name.split('/')[0]}), then run\n"
            f"  tfds build {name} --data_dir {data_dir} --manual_dir {manual_dir}\n"
            f"or in Python: tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare("
            f"download_config=tfds.download.DownloadConfig(manual_dir={manual_dir!r}))\n"
            "and set config.data.data_dir (and config.data.manual_dir) accordingly."
        )
    return (
        "Prepare it once on a machine with network access:\n"
        f"  tfds build {name} --data_dir {data_dir}\n"
        f"or in Python: tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare()\n"
        "and set config.data.data_dir to that directory."
    )


class TfdsSource:
    """A prepared TFDS image dataset as a `DataSource` (see the module docstring).

    Attributes:
      element_shape: (image_size, image_size, channels).
      num_classes: `config.data.num_classes` (0 = unconditional; labels then all 0).
      dataset_num_classes: Classes of the dataset's 'label' feature (0 if it has none).
    """

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Opens the dataset (nothing is read or downloaded yet) and checks the config.

        Args:
          config: Experiment config; reads seed, batch_size and config.data.*.
          process_index: Index of this process in [0, process_count).
          process_count: Number of processes; each reads its own disjoint shard of the split.

        Raises:
          ValueError: On an unknown or empty `config.data.tfds_name`, channel or class-count
            mismatches, or a batch size that does not split across processes.
          FileNotFoundError: If the dataset is not prepared in `config.data.data_dir` (the
            message says how to prepare it; nothing is downloaded).
        """
        import tensorflow_datasets as tfds

        data = config.data
        if not data.tfds_name:
            raise ValueError(
                "config.data.tfds_name is empty; with config.data.name='tfds' set it to a TFDS "
                "dataset such as 'imagenet2012', 'celeb_a_hq/256' or 'cifar10'."
            )
        if not isinstance(data.image_size, int) or data.image_size < 1:
            raise ValueError(f"config.data.image_size={data.image_size!r} must be a positive int.")
        self.config = config
        self.seed = check_seed(config)
        self.local_batch_size = local_batch_size(config, process_index, process_count)
        self.process_index = process_index
        self.process_count = process_count
        self.image_size = data.image_size
        self.channels = data.channels
        self.random_flip = bool(data.random_flip)
        self.shuffle_buffer = int(data.shuffle_buffer)
        try:
            self.builder = tfds.builder(data.tfds_name, data_dir=data.data_dir or None)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise ValueError(
                f"config.data.tfds_name={data.tfds_name!r} is not a TFDS dataset: "
                f"{str(error).splitlines()[0]}"
            ) from error
        features = self.builder.info.features
        if "image" not in features:
            raise ValueError(
                f"config.data.tfds_name={data.tfds_name!r} has no 'image' feature "
                f"(features: {sorted(features.keys())})."
            )
        self.native_channels = features["image"].shape[-1]
        self.tile_gray = self.native_channels == 1 and self.channels == 3
        if self.native_channels not in (None, self.channels) and not self.tile_gray:
            raise ValueError(
                f"config.data.channels={self.channels} but {data.tfds_name!r} has "
                f"{self.native_channels}-channel images; set config.data.channels="
                f"{self.native_channels}."
            )
        self.dataset_num_classes = int(features["label"].num_classes) if "label" in features else 0
        self.num_classes = int(data.num_classes)
        if self.num_classes and self.num_classes != self.dataset_num_classes:
            raise ValueError(
                f"config.data.num_classes={self.num_classes} but {data.tfds_name!r} has "
                f"{self.dataset_num_classes} classes; set it to {self.dataset_num_classes} "
                "(class-conditional) or 0 (unconditional)."
            )
        self.element_shape = (self.image_size, self.image_size, self.channels)
        self._encoded_dataset(shuffle=False)  # fails fast (FileNotFoundError) if not prepared

    @property
    def needs_manual_download(self) -> bool:
        """Whether the dataset's source files must be downloaded by hand."""
        base_name = self.config.data.tfds_name.split("/")[0]
        return base_name in _MANUAL_DATASETS or bool(self.builder.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _encoded_dataset(self, shuffle: bool, file_seed: int = 0) -> Any:
        """This process's shard as a tf.data.Dataset of {'image': encoded bytes, 'label'}."""
        import tensorflow as tf
        import tensorflow_datasets as tfds

        options = tf.data.Options()
        options.deterministic = True
        split = tfds.split_for_jax_process(
            self.config.data.tfds_split,
            process_index=self.process_index,
            process_count=self.process_count,
            drop_remainder=True,
        )
        read_config = tfds.ReadConfig(
            shuffle_seed=file_seed, options=options, shuffle_reshuffle_each_iteration=True
        )
        try:
            dataset = self.builder.as_dataset(
                split=split,
                shuffle_files=shuffle,
                read_config=read_config,
                decoders={"image": tfds.decode.SkipDecoding()},
            )
        except AssertionError as error:  # TFDS's "could not find data" (never downloads here)
            raise FileNotFoundError(
                f"TFDS dataset {self.config.data.tfds_name!r} is not prepared in "
                f"{str(self.builder.data_dir_root)} (config.data.data_dir="
                f"{self.config.data.data_dir!r}; nothing is downloaded at run time).\n"
                + prepare_instructions(self.config, self.needs_manual_download)
            ) from error
        use_labels = self.num_classes > 0

        def select(example: dict[str, Any]) -> dict[str, Any]:
            label = example["label"] if use_labels else tf.zeros([], tf.int64)
            return {"image": example["image"], "label": tf.cast(label, tf.int32)}

        return dataset.map(select).with_options(options)

    def _preprocess(self, encoded: Any, flip_seed: Any | None) -> Any:
        """Decodes one image, crops its center square, resizes, flips, scales to [-1, 1].

        Args:
          encoded: Scalar tf.string (PNG/JPEG bytes).
          flip_seed: (2,) int64 stateless seed for the flip, or None for no flip.

        Returns:
          (image_size, image_size, channels) tf.float32 in [-1, 1].
        """
        import tensorflow as tf

        image = tf.io.decode_image(
            encoded, channels=self.native_channels or self.channels, expand_animations=False
        )
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        side = tf.minimum(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
        size = self.image_size
        image = tf.image.resize(image, [size, size], method="bicubic", antialias=True)
        image = tf.clip_by_value(image, 0.0, 255.0)
        if self.tile_gray:
            image = tf.tile(image, [1, 1, 3])
        if flip_seed is not None:
            flip = tf.random.stateless_uniform([], seed=flip_seed) < 0.5
            image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
        image = image / 127.5 - 1.0
        return tf.ensure_shape(image, (size, size, self.channels))

    def make_dataset(self, start_step: int = 0) -> Any:
        """The endless, batched tf.data pipeline starting at global step `start_step`.

        Args:
          start_step: Global step of the first batch; skips start_step * B_local examples.

        Returns:
          tf.data.Dataset of {'image': (B_local, S, S, C) float32 in [-1, 1],
          'label': (B_local,) int32}.
        """
        import tensorflow as tf

        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        file_seed, shuffle_seed, flip_seed = _seeds(self.seed, self.process_index, 3)
        dataset = self._encoded_dataset(shuffle=True, file_seed=file_seed)
        if self.shuffle_buffer > 1:
            dataset = dataset.shuffle(
                self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True
            )
        dataset = dataset.repeat().enumerate()
        dataset = dataset.skip(start_step * self.local_batch_size)
        random_flip = self.random_flip

        def preprocess(index: Any, example: dict[str, Any]) -> dict[str, Any]:
            seed = tf.stack([tf.constant(flip_seed, tf.int64), index]) if random_flip else None
            return {"image": self._preprocess(example["image"], seed), "label": example["label"]}

        dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.batch(self.local_batch_size, drop_remainder=True)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields this process's batches from global step `start_step` on (endless).

        Yields:
          {'image': (B_local, S, S, C) float32 in [-1, 1], 'label': (B_local,) int32}.
        """
        import tensorflow_datasets as tfds

        return iter(tfds.as_numpy(self.make_dataset(start_step)))

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """The first `n` examples of this process's shard, unshuffled and unflipped.

        Returns:
          {'image': (N, S, S, C) float32 in [-1, 1], 'label': (N,) int32}, N <= n.
        """
        import tensorflow as tf
        import tensorflow_datasets as tfds

        n = max(0, n)
        dataset = self._encoded_dataset(shuffle=False).take(n)
        dataset = dataset.map(
            lambda example: {
                "image": self._preprocess(example["image"], None),
                "label": example["label"],
            },
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        images, labels = [], []
        for example in tfds.as_numpy(dataset.batch(max(1, min(n, 256)))):
            images.append(example["image"])
            labels.append(example["label"])
        if not images:
            return {
                "image": np.zeros((0, *self.element_shape), np.float32),
                "label": np.zeros((0,), np.int32),
            }
        return {"image": np.concatenate(images), "label": np.concatenate(labels)}
