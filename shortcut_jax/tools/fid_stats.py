"""Reference statistics (mu, sigma) of a dataset's features, in the common FID .npz format.

    # A config's data (TFDS or the embedded MNIST), with the usual overrides:
    python -m shortcut_jax.tools.fid_stats --config experiments/imagenet256.py --num 50000 \
        --out imagenet256_stats.npz [--config.data.tfds_split=train]
    # Images in an .npz (key 'images', (N, H, W, C), float in [-1, 1] or uint8), e.g. samples:
    python -m shortcut_jax.tools.fid_stats --images samples.npz --out samples_stats.npz

The file has keys 'mu' (D,) and 'sigma' (D, D) like published FID statistics, so it can be
passed to `python -m shortcut_jax.evaluate --ref_stats`. The default network is the FID
Inception (converted weights, see `shortcut_jax.tools.convert_inception`); --network takes any
metric of `shortcut_jax.evaluators.registry` (fd_mnist: the project's MNIST classifier).
Features are computed on all local devices. --out may be a bucket path (gs://...); the file is
written atomically. Bad flags or input files give one line on stderr and exit status 2.
"""

from __future__ import annotations

import zipfile

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

from shortcut_jax import atomic_files, cli_inputs, configs, sharding
from shortcut_jax.evaluators import features, fid, registry, sweep

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "An experiments/*.py config whose data to use.", lock_config=True
)
_IMAGES = flags.DEFINE_string("images", None, "An .npz with key 'images' instead of --config.")
_NUM = flags.DEFINE_integer("num", 50_000, "Number of examples (at most what there is).")
_NETWORK = flags.DEFINE_enum(
    "network", "fid", list(registry.names()), "Feature network (a metric of the evaluation)."
)
_INCEPTION = flags.DEFINE_string("inception", None, "Converted Inception weights .npz.")
_OUT = flags.DEFINE_string("out", None, "Output .npz path.")
_SAVE_FEATURES = flags.DEFINE_bool(
    "save_features", False, "Also store the features (key 'features') for precision/recall."
)
flags.mark_flags_as_required(["out"])


def load_images(path: str) -> np.ndarray:
    """Images from an .npz (key 'images'; uint8 or float in [-1, 1]) as float32 in [-1, 1].

    Raises:
      InputError: naming the file when it is missing, unreadable or holds no usable images.
    """
    file = epath.Path(path)
    if not file.is_file():
        raise cli_inputs.InputError(f"--images={path}: no such file")
    try:
        with file.open("rb") as f, np.load(f, allow_pickle=False) as stored:
            keys = sorted(stored.files)
            images = np.asarray(stored["images"]) if "images" in keys else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise cli_inputs.InputError(
            f"--images={path}: not a readable .npz ({type(error).__name__}: {error})"
        ) from None
    if images is None:
        raise cli_inputs.InputError(f"--images={path} has keys {keys}; expected 'images'")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise cli_inputs.InputError(
            f"--images={path}: images must be (N, H, W, C) with C in (1, 3), got {images.shape}"
        )
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def main(argv: list[str]) -> None:
    """Reads the images, computes their features and writes mu and sigma."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with cli_inputs.errors_as_one_line(
        sweep.EvaluationError,
        features.WeightsError,
        features.NonFiniteImagesError,
    ):
        _write_statistics()


def _write_statistics() -> None:
    num = cli_inputs.check_positive("--num", _NUM.value)
    if not _OUT.value:
        raise cli_inputs.InputError("--out is empty: pass the .npz path to write")
    if (_CONFIG.value is None) == (_IMAGES.value is None):
        raise cli_inputs.InputError("give exactly one of --config and --images")
    if _CONFIG.value is not None:
        from shortcut_jax import data

        config = _CONFIG.value
        problem = registry.get(_NETWORK.value).data_problem(config)
        if problem:
            raise cli_inputs.InputError(f"--network={_NETWORK.value} and --config: {problem}")
        images = data.get_source(config).real_examples(num)["image"]
        what = f"{len(images)} real examples of config.data ({config.data.name})"
    else:
        config = configs.base_config()
        images = load_images(_IMAGES.value)[:num]
        what = f"{len(images)} images of {_IMAGES.value}"
    if len(images) < 2:
        raise cli_inputs.InputError(f"{what}: at least 2 images are needed for a covariance")
    features.check_finite_images(images, what)
    if _INCEPTION.value:
        config.eval_inception_path = _INCEPTION.value
    net = sweep.load_feature_net(config, _NETWORK.value)
    mesh_config = sharding.single_device_config()
    mesh = sharding.make_mesh(mesh_config, jax.local_devices())
    with tqdm(total=len(images), unit="img", desc=f"{net.name} features") as bar:
        feats = features.compute_features(net, images, mesh=mesh, progress=bar.update)
    mu, sigma = fid.feature_statistics(feats)
    if _SAVE_FEATURES.value:
        atomic_files.write_npz(_OUT.value, mu=mu, sigma=sigma, features=feats)
    else:
        fid.save_statistics(_OUT.value, mu, sigma)
    logging.info("Wrote %s statistics of %s to %s", net.name, what, _OUT.value)
    print(f"{_OUT.value}: {net.name} statistics of {what} (D={net.dim})")


if __name__ == "__main__":
    app.run(main)
