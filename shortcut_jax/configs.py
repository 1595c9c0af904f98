"""The base config that every file under experiments/ starts from.

Every field the library reads exists here with a safe default, so an experiment file only states
what differs, and `--config.field=value` can override any of them.
"""

from __future__ import annotations

import os

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
    # How each bootstrap example's student level is drawn (level 0 = one step of size 1):
    # 'uniform' over the log2(denoise_timesteps) levels; 'coarse' (p proportional to 2**-level:
    # about half at one step); 'curriculum' (the finest level first, coarser ones join linearly
    # until all are open at bootstrap_curriculum_fraction of total_steps; uniform over open ones).
    config.bootstrap_levels = "uniform"
    config.bootstrap_curriculum_fraction = 0.5
    # Loss weight per student level 0 .. log2(denoise_timesteps) - 1, e.g. (2, 1.5, 1, 1, 1, 1, 1)
    # for 128; () = all 1. Multiplies the bootstrap examples' errors (not renormalised).
    config.bootstrap_level_weights = ()
    # Times of the flow-matching part: 'uniform_grid' (multiples of 1 / denoise_timesteps) or
    # 'logit_normal' (t = sigmoid(mean + std * n); t = 1 is data, so mean > 0 favours that end).
    config.flow_time = "uniform_grid"
    config.flow_time_mean = 0.0
    config.flow_time_std = 1.0

    # --- Other objectives (each module's docstring cites its paper and equations) -------------
    config.meanflow = ml_collections.ConfigDict()  # objective 'meanflow' (Geng et al. 2025)
    config.meanflow.ratio_r_neq_t = 0.25  # fraction of examples with r != t (the rest: r = t)
    config.meanflow.time_mean = -0.4  # logit-normal (mean, std) of the two times
    config.meanflow.time_std = 1.0
    config.meanflow.adaptive_p = 1.0  # loss weight 1 / (error + c)^p; p = 0 = plain squared error
    config.meanflow.adaptive_c = 1e-3
    config.diffusion = ml_collections.ConfigDict()  # objective 'diffusion' (DDPM, DDIM sampling)
    config.diffusion.schedule = "cosine"  # 'cosine' or 'linear'
    config.diffusion.prediction = "eps"  # 'eps' or 'v'
    config.diffusion.clip_x0 = 1.0  # clip predicted data to [-c, c] while sampling; 0 = off
    config.diffusion.eta = 0.0  # DDIM noise: 0 = deterministic, 1 = DDPM posterior variance
    config.consistency = ml_collections.ConfigDict()  # 'consistency_training' (Song et al. 2023)
    config.consistency.sigma_min = 0.002
    config.consistency.sigma_max = 80.0
    config.consistency.sigma_data = 0.5
    config.consistency.rho = 7.0
    config.consistency.s0 = 2  # discretisation curriculum N(k) from s0 + 1 ... to s1 + 1 scales
    config.consistency.s1 = 150
    config.consistency.mu0 = 0.9  # target-network EMA rate at N = s0
    # 'improved_consistency_training' (Song and Dhariwal 2023) draws the noise level n with
    # p(n) ~ erf((ln sigma_{n+1} - p_mean) / (sqrt(2) p_std)) - erf((ln sigma_n - ...)) and its
    # paper's curriculum is s0 = 10, s1 = 1280 (shortcut_jax.paper_settings has every setting).
    config.consistency.p_mean = -1.1
    config.consistency.p_std = 2.0
    config.live_reflow = ml_collections.ConfigDict()  # objective 'live_reflow' (Frans et al.)
    config.live_reflow.steps = 8  # Euler steps of the model's own flow behind each reflow target
    # The step sizes the reflow pairs train: 'all' (1 ... 2 / denoise_timesteps, every level the
    # sampler uses) or 'one_step' (d = 1 only, as the paper's official code).
    config.live_reflow.levels = "all"
    # A frozen teacher from another finished run, for 'progressive_distillation' and
    # 'consistency_distillation' (loaded with its own model config onto this run's mesh); 'reflow'
    # reads pairs its teacher wrote (python -m shortcut_jax.tools.reflow_pairs, data.name
    # 'reflow_pairs').
    config.teacher = ml_collections.ConfigDict()
    config.teacher.workdir = ""  # the teacher run's --workdir
    config.teacher.step = 0  # its checkpoint step; 0 = the newest
    # progressive_distillation: the student's step count per stage, each half the one before;
    # () = denoise_timesteps / 2, ..., 2, 1. steps_per_stage 0 = total_steps split evenly.
    config.teacher.stage_steps = ()
    config.teacher.steps_per_stage = 0
    # progressive_distillation: the student starts as a copy of the teacher run (Algorithm 2;
    # needs the same config.model) unless config.init_from names a run; False = a fresh student.
    config.teacher.init_student = True
    config.teacher.consistency_scales = 18  # consistency_distillation: N (paper: 18 on CIFAR-10)
    config.teacher.target_ema_rate = 0.95  # consistency_distillation: target network EMA rate mu
    # consistency_distillation: the ODE solver of the teacher step, 'heun' (the paper's CD runs,
    # two teacher evaluations) or 'euler' (one).
    config.teacher.ode_solver = "heun"
    # Start params, EMA and target network of a fresh run from another run's model (e.g. shortcut
    # from a pretrained flow_matching run; same config.model). '' = random initialisation.
    config.init_from = ""

    # --- Data ------------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.name = "mnist_embedded"  # 'mnist_embedded', 'toy2d', 'tfds', 'image_folder'
    config.data.tfds_name = ""  # e.g. 'imagenet2012', 'celeb_a_hq/256' when name == 'tfds'
    config.data.tfds_split = "train"
    config.data.data_dir = ""  # TFDS data_dir ('' = TFDS default)
    config.data.manual_dir = ""  # TFDS manual_dir for datasets that need one
    config.data.image_dir = ""  # for name == 'image_folder': one subfolder of images per class
    # Precomputed latents (python -m shortcut_jax.tools.encode_latents): when set, training reads
    # them instead of encoding the images above; requires config.vae.path.
    config.data.latent_dir = ""
    # A latent_dir in a bucket (gs://...) is read through a local cache of its shards, fetched
    # ahead of the reader: at most latent_cache_bytes on disk (it must hold the shards of one
    # batch), in a fresh directory under latent_cache_dir ('' = the system temporary directory).
    # latent_cache_bytes = 0 reads gs:// shards in place, record by record (ArrayRecord's client).
    config.data.latent_cache_bytes = 4 << 30
    config.data.latent_cache_dir = ""
    # Noise/sample pairs (python -m shortcut_jax.tools.reflow_pairs) for objective 'reflow': when
    # set, training reads them instead of the data above (which must describe the same shape).
    config.data.pairs_dir = ""
    config.data.image_size = 28  # side of the (pixel) images; latents are image_size / f
    config.data.channels = 1
    config.data.num_classes = 10  # 0 = unconditional; label num_classes is the null class
    config.data.random_flip = False
    config.data.shuffle_buffer = 10_000
    # A batch with NaN or inf stops the run naming the examples; True replaces each such example
    # by a good one of its batch and counts them (data/skipped_examples), so a rerun can go on.
    config.data.skip_non_finite = False
    config.data.toy_name = "checkerboard"  # for name == 'toy2d'
    config.data.dim = 2  # point dimension for name == 'toy2d'

    # --- Latent space (the Stable Diffusion VAE) --------------------------------------------
    # path '' = the model works on pixels. Otherwise a VAE weights file (our .npz from
    # `python -m shortcut_jax.tools.convert_vae`, or a .safetensors file) and the model works on
    # scaled latents: encoded inside the train step (online) unless data.latent_dir is set; samples
    # are decoded to pixels before grids and scores.
    config.vae = ml_collections.ConfigDict()
    config.vae.path = ""
    config.vae.scaling_factor = 0.18215  # SD 1.x/2.x VAEs; the SDXL VAE uses 0.13025
    config.vae.latent_channels = 4  # checked against the weights file when it is loaded
    config.vae.downsample_factor = 8  # image side / latent side; checked against the weights
    config.vae.dtype = "float32"  # compute dtype of encode/decode; parameters stay float32
    config.vae.sample_posterior = True  # train on posterior samples (False: posterior means)
    # Images per device per VAE-decode pass inside the evaluation program (0 = the whole chunk at
    # once): bounds the decoder's activations, tens of GiB for a 256-image chunk at 256 px.
    config.vae.decode_batch_size = 8

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
    # t in [0, 1] is multiplied by this before its sinusoidal features ('dit' only); 1.0 is the
    # official code's DiT (runs made by python -m shortcut_jax.tools.import_official).
    config.model.time_scale = 1000.0
    # Rematerialise each block in the backward pass (memory for compute; results unchanged):
    # 'none' keeps every activation, 'dots' keeps the weight matmuls' outputs, 'full' only the
    # blocks' inputs.
    config.model.remat = "none"

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
    # The loss of every objective: 'auto' (the objective's own: 'pseudo_huber' for
    # improved_consistency_training, else 'l2'), 'l2' (mean squared error) or 'pseudo_huber' (iCT:
    # sqrt(||e||^2 + c^2) - c, c = huber_c or, when 0, 0.00054 * sqrt(H * W * C)); adaptive_p > 0
    # weighs each example by 1 / (loss + adaptive_c)^p under stop-gradient (MeanFlow's weighting;
    # objective 'meanflow' has its own, config.meanflow.adaptive_p).
    config.loss = ml_collections.ConfigDict()
    config.loss.kind = "auto"
    config.loss.huber_c = 0.0
    config.loss.adaptive_p = 0.0
    config.loss.adaptive_c = 1e-3

    # --- Devices ---------------------------------------------------------------------------
    # Mesh sizes over ('data', 'fsdp', 'tensor'); -1 = the rest of the devices. The batch is split
    # over data x fsdp. sharding_rules map the model's logical axis names to mesh axes: those of
    # the parameters, then those of the activations (configs without the latter get these
    # defaults, sharding.ACTIVATION_RULES).
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding_rules = (
        ("embed", "fsdp"),  # FSDP: the hidden width of every weight matrix
        ("heads", "tensor"),  # tensor parallel attention
        ("mlp", "tensor"),  # tensor parallel MLP
        ("activation_batch", ("data", "fsdp")),  # activations: the batch split as the data is
        ("activation_length", None),  # tokens
        ("activation_embed", None),  # the residual stream's width: whole on every device
        ("activation_heads", "tensor"),  # attention heads, as their kernels
        ("activation_kv", None),  # head dimension
        ("activation_mlp", "tensor"),  # the MLP's inner width, as its kernels
    )

    # --- Loop ------------------------------------------------------------------------------
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2_000
    config.max_checkpoints_to_keep = 3
    config.sample_every_steps = 4_000  # sample grids at sample_steps; 0 = only at the end
    config.sample_steps = (1, 4, 128)
    config.sample_num = 64  # images per grid
    config.sample_use_ema = True
    config.sample_cfg_scale = 1.5  # guidance used for sample grids and scores (1 = none)
    # Which step counts sampling guides: 'all'; 'finest' (only denoise_timesteps steps, as the
    # paper's code evaluates runs trained with bootstrap_cfg, whose coarse step sizes learned guided
    # targets already); 'auto' = 'finest' with bootstrap_cfg, else 'all'.
    config.sample_guidance = "auto"
    # Weights & Biases beside TensorBoard: the project to log to ('' = off; needs `pip install
    # wandb`, not a dependency) and its entity ('' = W&B's default). W&B's own environment
    # variables (WANDB_API_KEY, WANDB_MODE=offline, ...) apply.
    config.wandb_project = ""
    config.wandb_entity = ""

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
    config.eval_ceiling_num = 1_000  # clipped-noise images behind each metric's ceiling
    config.eval_batch_size = 256  # samples per sampling call

    # --- Resume ----------------------------------------------------------------------------
    # A rerun in the same workdir resumes, and refuses a config that would change the run (see
    # shortcut_jax.resume_policy). Comma-separated fields (a section such as 'optim' or a glob
    # such as 'data.*' names all under it; 'process_count' the number of processes) that may
    # change anyway: --config.resume_allow_changes=total_steps,optim.learning_rate
    config.resume_allow_changes = ""
    # One run per workdir: a flock (local disks) or a lease (buckets). False runs without it, with
    # a warning: only for filesystems whose flock fails or does nothing (some FUSE / NFS mounts).
    config.workdir_lock = True
    # A checkpoint that fails to restore stops the start, naming it and why; True moves it aside
    # (WORKDIR/failed_checkpoints) and resumes from the newest older one that restores.
    config.restore_fallback = False
    return config


def default_vae_path() -> str:
    """Where the paper configs look for the converted SD VAE (sd-vae-ft-mse) by default.

    $SHORTCUT_JAX_CACHE/sd_vae_ft_mse.npz, else ~/.cache/shortcut_jax/sd_vae_ft_mse.npz; override
    with --config.vae.path=... (a gs:// path works too).
    """
    cache = os.environ.get("SHORTCUT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "shortcut_jax"
    )
    return os.path.join(cache, "sd_vae_ft_mse.npz")


def paper_latent_config() -> ml_collections.ConfigDict:
    """The paper's 256x256 setting shared by ImageNet and CelebA-HQ (SD-VAE latents 32x32x4).

    DiT-B/2, batch 256, AdamW 1e-4 (constant) with weight decay 0.1, EMA 0.999 (also the bootstrap
    teacher, as in the paper's code), bootstrap part 1/8 of the batch, 128 denoise steps. Images are
    256x256x3; the model works on their sd-vae-ft-mse latents (scaling factor 0.18215), encoded
    inside the train step unless config.data.latent_dir names precomputed ones.
    """
    config = base_config()
    config.total_steps = 810_000  # the official README's ImageNet-256 command (--max_steps)
    config.batch_size = 256
    config.denoise_timesteps = 128
    config.bootstrap_every = 8
    config.bootstrap_teacher = "ema"
    config.teacher_ema_rate = 0.999

    config.data.name = "tfds"
    config.data.image_size = 256  # pixels; the model sees 256 / 8 = 32x32x4 latents
    config.data.channels = 3
    config.data.random_flip = True

    config.vae.path = default_vae_path()
    config.vae.scaling_factor = 0.18215
    config.vae.latent_channels = 4
    config.vae.downsample_factor = 8
    config.vae.sample_posterior = True  # the paper's code encodes with a posterior sample

    config.model.preset = "DiT-B/2"
    config.model.dtype = "bfloat16"

    config.optim.learning_rate = 1e-4
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.1
    config.optim.beta1 = 0.9
    config.optim.beta2 = 0.999
    config.optim.grad_clip_norm = 0.0
    config.ema_rate = 0.999

    config.log_every_steps = 1_000
    config.checkpoint_every_steps = 20_000
    config.sample_every_steps = 20_000
    config.sample_num = 64
    config.eval_batch_size = 64  # samples per sampling / VAE-decode call
    return config


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The `file.py:VARIANT` variants of the paper configs: '' or 'b2', 'xl', 'tiny'.

    'b2': DiT-B/2 (the paper's model, the default; data parallel). 'xl': DiT-XL/2 with its state
    sharded over the slice (config.mesh fsdp=-1). 'tiny': a CPU smoke run of the
    whole latent path (generated images, a small random-weight VAE made on first use, online
    encoding, decoded grids and an evaluation at the end) in about a minute.

    Raises:
      ValueError: for an unknown variant.
    """
    variant = (variant or "").strip().lower()
    if variant in ("", "b2"):
        return config
    if variant == "xl":
        # 676 M parameters: parameters, Adam moments and EMA (10.1 GiB in float32) are sharded
        # over every chip of the slice (FSDP), the batch too; on a single v5e chip's 15.75 usable
        # GiB they would leave too little for activations (BENCHMARKS, "Pod planning").
        config.model.preset = "DiT-XL/2"
        config.mesh.data = 1
        config.mesh.fsdp = -1
        return config
    if variant != "tiny":
        raise ValueError(f"unknown config variant {variant!r}: use one of 'b2', 'xl', 'tiny'")
    from shortcut_jax.tools import tiny_latent

    assets = tiny_latent.ensure_assets()
    config.data.name = "image_folder"
    config.data.image_dir = assets["image_dir"]
    config.data.tfds_name = ""
    config.data.image_size = 64  # 8x8x4 latents
    config.data.num_classes = min(int(config.data.num_classes), len(tiny_latent.CLASS_NAMES))
    config.data.shuffle_buffer = 64
    config.vae.path = assets["vae_path"]
    config.model.preset = ""
    config.model.hidden_size = 64
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.patch_size = 2
    config.model.dtype = "float32"
    config.total_steps = 20
    config.batch_size = 16
    config.bootstrap_teacher = "params"
    config.log_every_steps = 10
    config.checkpoint_every_steps = 10
    config.sample_every_steps = 0
    config.sample_steps = (1, 4, 128)
    config.sample_num = 8
    config.eval_batch_size = 16
    config.eval_steps = (1, 4, 128)
    config.eval_num = 16
    config.eval_ref_num = 32
    config.eval_ceiling_num = 16
    # FID at the end when the converted Inception weights are where the evaluation looks for them
    # (python -m shortcut_jax.tools.convert_inception); without them the run trains and samples.
    from shortcut_jax.evaluators import inception

    has_fid = os.path.isfile(inception.default_weights_path())
    config.eval_every_steps = config.total_steps if has_fid else 0
    config.eval_metrics = "fid" if has_fid else "auto"
    return config
