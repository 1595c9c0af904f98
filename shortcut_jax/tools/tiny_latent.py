"""What the `:tiny` latent variants need, made on first use: a generated image folder and a VAE.

`experiments/imagenet256.py:tiny` (and celebahq256.py:tiny) run the whole latent path on a CPU in a
minute with nothing downloaded: a small class-per-folder image dataset (discs and squares of random
colours, sizes and aspect ratios, so the center crop has work to do) and a small random-weight VAE
of the Stable Diffusion block structure (same downsampling factor 8 and 4 latent channels).

    python -m shortcut_jax.tools.tiny_latent --out DIR   # makes them explicitly (else on first use)

Both are deterministic and written atomically (a temporary sibling, then a rename), so processes
that start together never see half an asset and agree on the VAE checksum. The directory may be in
a bucket (gs://...): there every file is uploaded whole, and a folder missing any of its images
(an interrupted upload) is completed on the next use.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from absl import app, flags
from etils import epath
from PIL import Image, ImageDraw

from shortcut_jax import atomic_files, cli_inputs

CLASS_NAMES = ("disc", "square")
IMAGES_PER_CLASS = 24
# Four down blocks (factor 8, 4 latent channels) as in the SD VAE, with narrow widths.
TINY_VAE_CHANNELS = (16, 32, 32, 32)
TINY_VAE_GROUPS = 8


def default_dir() -> str:
    """$SHORTCUT_JAX_CACHE/tiny_latent, else ~/.cache/shortcut_jax/tiny_latent."""
    cache = os.environ.get("SHORTCUT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "shortcut_jax"
    )
    return os.path.join(cache, "tiny_latent")


def _draw(rng: np.random.Generator, class_index: int) -> Image.Image:
    width, height = (int(v) for v in rng.integers(48, 112, size=2))
    background = tuple(int(v) for v in rng.integers(0, 90, size=3))
    colour = tuple(int(v) for v in rng.integers(120, 256, size=3))
    image = Image.new("RGB", (width, height), background)
    side = min(width, height)
    radius = float(rng.uniform(0.2, 0.4)) * side
    centre_x = width / 2 + float(rng.uniform(-0.1, 0.1)) * side
    centre_y = height / 2 + float(rng.uniform(-0.1, 0.1)) * side
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    draw = ImageDraw.Draw(image)
    if CLASS_NAMES[class_index] == "disc":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def image_names() -> list[str]:
    """Paths of the generated images relative to the folder ('disc/disc_000.png', ...)."""
    return [f"{name}/{name}_{i:03d}.png" for name in CLASS_NAMES for i in range(IMAGES_PER_CLASS)]


def _render(directory: str, seed: int) -> None:
    """Draws every image of the dataset into the local `directory` (one subfolder per class)."""
    rng = np.random.default_rng(seed)
    for class_index, name in enumerate(CLASS_NAMES):
        os.makedirs(os.path.join(directory, name))
        for i in range(IMAGES_PER_CLASS):
            _draw(rng, class_index).save(os.path.join(directory, name, f"{name}_{i:03d}.png"))


def _is_complete(path: str) -> bool:
    """Whether `path` (local or bucket) holds every generated image (two listings)."""
    root = epath.Path(path)
    if not root.is_dir():
        return False
    present = {
        f"{folder.name}/{entry.name}"
        for folder in root.iterdir()
        if folder.name in CLASS_NAMES
        for entry in folder.iterdir()
    }
    return present.issuperset(image_names())


def make_image_folder(path: str, seed: int = 0) -> str:
    """Writes the generated dataset to `path` (one subfolder per class) unless it is there."""
    if _is_complete(path):
        return path
    if atomic_files.is_remote(path):
        with tempfile.TemporaryDirectory() as scratch:
            _render(os.path.join(scratch, "images"), seed)
            for name in image_names():  # deterministic: rewriting a present image is harmless
                with open(os.path.join(scratch, "images", name), "rb") as file:
                    atomic_files.write_bytes(epath.Path(path) / name, file.read())
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".images-", dir=parent)
    try:
        _render(os.path.join(staging, "images"), seed)
        try:
            os.rename(os.path.join(staging, "images"), path)
        except OSError:  # another process finished first: its folder is identical
            if not os.path.isdir(path):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def make_vae(path: str, seed: int = 0) -> str:
    """Writes the tiny random-weight VAE (our .npz) to `path` (local or bucket) unless it exists."""
    if epath.Path(path).is_file():
        return path
    from shortcut_jax.models import vae as vae_lib

    arch = vae_lib.VaeArch(
        block_out_channels=TINY_VAE_CHANNELS, layers_per_block=1, norm_num_groups=TINY_VAE_GROUPS
    )
    vae = vae_lib.random_vae(arch, seed=seed)
    vae_lib.save_vae(path, vae)  # atomic; makes the parent directories
    return path


def ensure_assets(directory: str | None = None) -> dict[str, str]:
    """Makes (once) and returns {'image_dir': ..., 'vae_path': ...} under `directory`."""
    directory = default_dir() if directory is None else directory
    return {
        "image_dir": make_image_folder(str(epath.Path(directory) / "images")),
        "vae_path": make_vae(str(epath.Path(directory) / "vae.npz")),
    }


def main(argv: list[str]) -> None:
    """Makes the assets and prints where they are."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with cli_inputs.errors_as_one_line(OSError):  # --out cannot be written: status 1
        assets = ensure_assets(flags.FLAGS.out)
    for name, path in assets.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    # Defined only when run as a script: the :tiny configs import this module from other CLIs.
    flags.DEFINE_string("out", None, "Directory for the assets (default: the user cache).")
    cli_inputs.run(main)
