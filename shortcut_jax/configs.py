"""The base config that every file under experiments/ starts from.

Every field the library reads exists here with a safe default, so an experiment file only states
what differs, and `--config.field=value` can override any of them.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Returns the default config (a small class-conditional shortcut model on MNIST-5k)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.objective = "shortcut"  # see shortcut_jax.objectives.names()
    config.total_steps = 16_000
    config.batch_size = 32

    # --- Shortcut / flow-matching objective -------------------------------------------------
    config.denoise_timesteps = 128  # smallest step size d_min = 1 / denoise_timesteps
    config.bootstrap_every = 8  # 1 / bootstrap_every of the batch is the self-consistency part
    config.bootstrap_teacher = "params"  # 'params' (stop-gradient) or 'ema' (teacher_ema_rate)
    config.teacher_ema_rate = 0.999  # only used when bootstrap_teacher == 'ema'
    config.bootstrap_cfg = False  # classifier-free guidance inside the bootstrap targets
    config.cfg_scale = 1.5  # guidance scale inside the bootstrap targets (bootstrap_cfg)
    config.class_dropout_prob = 0.1  # labels replaced by the null class (for CFG)
    config.target_clip = 4.0  # clip bootstrap targets and the intermediate x to [-c, c]; 0 = off

    # --- Data ------------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.name = "mnist_embedded"  # 'mnist_embedded', 'toy2d', 'tfds'
    config.data.tfds_name = ""  # e.g. 'imagenet2012', 'celeb_a_hq/256' when name == 'tfds'
    config.data.tfds_split = "train"
    config.data.data_dir = ""  # TFDS data_dir ('' = TFDS default)
    config.data.manual_dir = ""  # TFDS manual_dir for datasets that need one
    config.data.image_size = 28
    config.data.channels = 1
    config.data.num_classes = 10  # 0 = unconditional; label num_classes is the null class
    config.data.random_flip = False
    config.data.shuffle_buffer = 10_000
    config.data.toy_name = "checkerboard"  # for name == 'toy2d'
    config.data.dim = 2  # point dimension for name == 'toy2d'

    # --- Model -----------------------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.name = "dit"  # 'dit' or 'mlp'
    config.model.preset = ""  # e.g. 'DiT-B/2' overrides hidden_size, depth, num_heads, patch_size
    config.model.hidden_size = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.patch_size = 4
    config.model.mlp_ratio = 4.0
    config.model.dtype = "float32"  # compute dtype; parameters stay float32

    # --- Optimisation ------------------------------------------------------------------------
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 5e-4
    config.optim.schedule = "cosine"  # 'constant' or 'cosine' (both after linear warm-up)
    config.optim.warmup_steps = 200
    config.optim.end_lr_fraction = 0.0  # cosine decays to learning_rate * end_lr_fraction
    config.optim.weight_decay = 0.1
    config.optim.beta1 = 0.9
    config.optim.beta2 = 0.999
    config.optim.grad_clip_norm = 1.0  # 0 = no clipping
    config.ema_rate = 0.999  # EMA of the parameters used for sampling and evaluation

    # --- Devices ---------------------------------------------------------------------------
    # Mesh sizes over ('data', 'fsdp', 'tensor'); -1 = the rest of the devices. The batch is split
    # over data x fsdp. sharding_rules map the model's logical axis names to mesh axes.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding_rules = (
        ("embed", "fsdp"),  # FSDP: the hidden width of every weight matrix
        ("heads", "tensor"),  # tensor parallel attention
        ("mlp", "tensor"),  # tensor parallel MLP
    )

    # --- Loop ------------------------------------------------------------------------------
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2_000
    config.max_checkpoints_to_keep = 3
    config.sample_every_steps = 4_000  # sample grids at sample_steps; 0 = only at the end
    config.sample_steps = (1, 4, 128)
    config.sample_num = 64  # images per grid
    config.sample_use_ema = True
    config.sample_cfg_scale = 1.5  # guidance used for sample grids (1 = none)

    # --- Evaluation (python -m shortcut_jax.evaluate, and periodically during training) -------
    # Scores use the sampling settings above (EMA or raw params, guidance sample_cfg_scale).
    config.eval_every_steps = 0  # score samples every this many steps; 0 = never during training
    config.eval_steps = (1, 4, 128)  # step budgets scored during training
    config.eval_num = 1_000  # samples per step budget during training
    # 'auto' = fd_mnist for the embedded MNIST + fid when the Inception weights file exists;
    # or a comma-separated list of 'fd_mnist', 'fid'.
    config.eval_metrics = "auto"
    config.eval_inception_path = ""  # converted Inception .npz; '' = the default (see inception)
    config.eval_ref_stats = ""  # FID reference statistics (.npz with mu, sigma); '' = from the data
    config.eval_ref_num = 10_000  # real examples behind reference statistics taken from the data
    config.eval_batch_size = 256  # samples per sampling call
    return config


def paper_latent_config() -> ml_collections.ConfigDict:
    """The paper's 256x256 setting shared by ImageNet and CelebA-HQ (SD-VAE latents 32x32x4).

    DiT-B/2, batch 256, AdamW 1e-4 (constant) with weight decay 0.1, EMA 0.999 (also the bootstrap
    teacher, as in the paper's code), bootstrap part 1/8 of the batch, 128 denoise steps.
    """
    config = base_config()
    config.total_steps = 800_000
    config.batch_size = 256
    config.denoise_timesteps = 128
    config.bootstrap_every = 8
    config.bootstrap_teacher = "ema"
    config.teacher_ema_rate = 0.999

    config.data.name = "tfds"
    config.data.image_size = 32  # latent side: 256 / 8
    config.data.channels = 4
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
