"""CelebA-HQ 256x256 in SD-VAE latents (32x32x4), the paper's setting: DiT-B/2, unconditional.

    python -m shortcut_jax.main --config experiments/celebahq256.py --workdir gs://BUCKET/celeba

Latent encoding and pod launch come with later issues; the config parses and validates now.
"""

from shortcut_jax.configs import paper_latent_config


def get_config():
    """DiT-B/2, batch 256, AdamW 1e-4 wd 0.1, EMA 0.999, bootstrap 1/8, no classes."""
    config = paper_latent_config()
    config.total_steps = 400_000
    config.bootstrap_cfg = False
    config.class_dropout_prob = 0.0
    config.sample_cfg_scale = 1.0
    config.data.tfds_name = "celeb_a_hq/256"
    config.data.num_classes = 0
    return config
