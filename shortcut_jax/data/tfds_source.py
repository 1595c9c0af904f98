"""Named, already prepared TFDS image datasets (ImageNet, CelebA-HQ, CIFAR-10, MNIST, ...).

`config.data.tfds_name` / `config.data.tfds_split` pick the dataset, read from
`config.data.data_dir` (or the TFDS default; a gs:// bucket works: metadata through etils.epath,
ArrayRecord shards through array_record's own GCS client). Nothing is ever downloaded: a dataset
that is not prepared raises `FileNotFoundError` at once, saying how to prepare it (ImageNet and
CelebA-HQ need their files downloaded by hand into `config.data.manual_dir` first).

The split is read by index (`tfds.data_source`), so the build must be ArrayRecord (or Parquet):
`tfds build NAME --file_format array_record`. A TFRecord build is refused at startup with the
command that converts it in place (`tfds convert_format`): streaming TFRecord would make every
restart re-read all the records before the resume step (after 400k steps of batch 256, about
100M records), and would give other batches on another number of processes.

Batches are those of every indexed source (`image_folder.IndexedImageSource`): per-epoch seeded
permutations of the whole split, global step k at positions [k * B, (k + 1) * B), process p
taking its contiguous slice; flips per (seed, step, position). `iterate(k)` reads only the
examples of steps >= k, and the global batches do not depend on the process count. Images are
decoded and ADM-center-cropped with PIL on a thread pool (`preprocess.tfds_images`), exactly as
image folders and `tools/encode_latents` preprocess them.

TensorFlow and TFDS are imported inside `preprocess`'s TFDS functions: importing
`shortcut_jax.data` stays cheap.
"""

from __future__ import annotations

import ml_collections

from shortcut_jax.data import image_folder, preprocess


class TfdsSource(image_folder.IndexedImageSource):
    """A prepared TFDS image dataset as a `DataSource` (see the module docstring).

    Attributes:
      element_shape: (image_size, image_size, channels).
      num_classes: `config.data.num_classes` (0 = unconditional; labels then all 0).
      dataset_num_classes: Classes of the dataset's 'label' feature (0 if it has none).
      (and those of `image_folder.IndexedImageSource`)
    """

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Opens the split for random access (no image is decoded yet) and checks the config.

        Args:
          config: Experiment config; reads seed, batch_size and config.data.*.
          process_index: Index of this process in [0, process_count).
          process_count: Number of processes sharing each global batch.

        Raises:
          ValueError: On an empty or unknown `config.data.tfds_name`, a TFRecord build (the
            message says how to convert it), channel or class-count mismatches, or a batch that
            does not fit the split or split across processes.
          FileNotFoundError: If the dataset is not prepared in `config.data.data_dir` (the
            message says how to prepare it; nothing is downloaded).
        """
        data = config.data
        image_folder.check_image_size(config)
        builder = preprocess.tfds_builder(config)
        features = builder.info.features
        if "image" in features:
            self._check_channels(config, features["image"].shape[-1])
        self.dataset_num_classes = int(features["label"].num_classes) if "label" in features else 0
        if data.num_classes and data.num_classes != self.dataset_num_classes:
            raise ValueError(
                f"config.data.num_classes={data.num_classes} but {data.tfds_name!r} has "
                f"{self.dataset_num_classes} classes; set it to {self.dataset_num_classes} "
                "(class-conditional) or 0 (unconditional)."
            )
        images = preprocess.tfds_images(config, data.channels)
        where = f"TFDS {data.tfds_name!r} split {data.tfds_split!r}"
        super().__init__(config, images, where, process_index, process_count)

    @staticmethod
    def _check_channels(config: ml_collections.ConfigDict, native: int | None) -> None:
        """Grayscale may become RGB (equal channels); anything else must match the dataset."""
        channels = config.data.channels
        if channels not in (1, 3):
            raise ValueError(f"config.data.channels={channels} must be 1 or 3 for TFDS images.")
        if native not in (None, channels) and not (native == 1 and channels == 3):
            raise ValueError(
                f"config.data.channels={channels} but {config.data.tfds_name!r} has "
                f"{native}-channel images; set config.data.channels={native}."
            )
