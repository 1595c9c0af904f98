"""CelebA-HQ 256x256 in SD-VAE latents (32x32x4), the paper's setting: DiT-B/2, unconditional.

    python -m shortcut_jax.main --config experiments/celebahq256.py --workdir gs://BUCKET/celeba

Variants (`--config experiments/celebahq256.py:VARIANT`): `b2` (the default), `xl` (DiT-XL/2),
`tiny` (a CPU smoke run of the latent path on generated images; see experiments/imagenet256.py).
CelebA-HQ needs its images by hand (`tfds build celeb_a_hq/256 --manual_dir DIR`), or use
`--config.data.name=image_folder --config.data.image_dir=DIR` on a folder of the 30,000 images.
"""

from shortcut_jax.configs import apply_variant, paper_latent_config


def get_config(variant: str = ""):
    """DiT-B/2, batch 64 for 410k steps (as the official code), AdamW 1e-4 wd 0.1, EMA 0.999."""
    config = paper_latent_config()
    config.batch_size = 64
    config.total_steps = 410_000
    config.bootstrap_cfg = False
    config.class_dropout_prob = 0.0
    config.sample_cfg_scale = 1.0
    config.data.tfds_name = "celeb_a_hq/256"
    config.data.num_classes = 0
    return apply_variant(config, variant)
