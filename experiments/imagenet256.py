"""ImageNet 256x256 in SD-VAE latents (32x32x4), the paper's setting: DiT-B/2, CFG 1.5.

    python -m shortcut_jax.main --config experiments/imagenet256.py --workdir gs://BUCKET/in256

Variants (`--config experiments/imagenet256.py:VARIANT`): `b2` (the default, DiT-B/2), `xl`
(DiT-XL/2), `tiny` (a CPU smoke run of the whole latent path on generated images with a small
random-weight VAE, both made on first use: trains, samples decoded grids, evaluates).

From the VAE file and the ImageNet archive to a running job (README, "Latent space"):

    python -m shortcut_jax.tools.convert_vae --from vae-ft-mse-840000-ema-pruned.safetensors \\
        --out ~/.cache/shortcut_jax/sd_vae_ft_mse.npz
    tfds build imagenet2012 --manual_dir DIR_WITH_THE_TAR_FILES
    python -m shortcut_jax.main --config experiments/imagenet256.py --workdir gs://BUCKET/in256

(optionally `python -m shortcut_jax.tools.encode_latents --config experiments/imagenet256.py
--out LATENTS` once, then `--config.data.latent_dir=LATENTS` trains without encoding each step).
"""

from shortcut_jax.configs import apply_variant, paper_latent_config


def get_config(variant: str = ""):
    """DiT-B/2, batch 256, AdamW 1e-4 wd 0.1, EMA 0.999, bootstrap 1/8, CFG 1.5 inside targets."""
    config = paper_latent_config()
    config.bootstrap_cfg = True
    config.cfg_scale = 1.5
    config.sample_cfg_scale = 1.5
    config.sample_guidance = "auto"  # bootstrap_cfg: guide only at 128 steps, as the paper's code
    config.class_dropout_prob = 0.1
    config.data.tfds_name = "imagenet2012"
    config.data.num_classes = 1000
    return apply_variant(config, variant)
