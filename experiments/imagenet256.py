"""ImageNet 256x256 in SD-VAE latents (32x32x4), the paper's setting: DiT-B/2, CFG 1.5.

    python -m shortcut_jax.main --config experiments/imagenet256.py --workdir gs://BUCKET/in256

Latent encoding and pod launch come with later issues; the config parses and validates now.
"""

from shortcut_jax.configs import paper_latent_config


def get_config():
    """DiT-B/2, batch 256, AdamW 1e-4 wd 0.1, EMA 0.999, bootstrap 1/8, CFG 1.5 inside targets."""
    config = paper_latent_config()
    config.bootstrap_cfg = True
    config.cfg_scale = 1.5
    config.sample_cfg_scale = 1.5
    config.class_dropout_prob = 0.1
    config.data.tfds_name = "imagenet2012"
    config.data.num_classes = 1000
    return config
