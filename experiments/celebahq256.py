"""CelebA-HQ 256x256 in SD-VAE latents (32x32x4), the paper's setting: DiT-B/2, unconditional.

    python -m shortcut_jax.main --config experiments/celebahq256.py --workdir gs://BUCKET/celeba

Latent encoding and pod launch come with later issues; the config parses and validates now.
"""

from shortcut_jax.configs import base_config


def get_config():
    """DiT-B/2, batch 256, AdamW 1e-4 wd 0.1, EMA 0.999, bootstrap 1/8, no classes."""
    config = base_config()
    config.total_steps = 400_000
    config.batch_size = 256
    config.denoise_timesteps = 128
    config.bootstrap_every = 8
    config.bootstrap_teacher = "ema"
    config.teacher_ema_rate = 0.999
    config.bootstrap_cfg = False
    config.class_dropout_prob = 0.0
    config.sample_cfg_scale = 1.0

    config.data.name = "tfds"
    config.data.tfds_name = "celeb_a_hq/256"
    config.data.image_size = 32
    config.data.channels = 4
    config.data.num_classes = 0
    config.data.random_flip = True

    config.model.preset = "DiT-B/2"
    config.model.dtype = "bfloat16"

    config.optim.learning_rate = 1e-4
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.1
    config.optim.grad_clip_norm = 0.0
    config.ema_rate = 0.999

    config.log_every_steps = 1_000
    config.checkpoint_every_steps = 20_000
    config.sample_every_steps = 20_000
    config.sample_num = 64
    return config
