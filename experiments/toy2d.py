"""2-D toy data with an MLP backbone: seconds per run, for tests and teaching.

python -m shortcut_jax.main --config experiments/toy2d.py --workdir runs/toy2d
"""

from shortcut_jax.configs import base_config


def get_config():
    """Unconditional checkerboard (see config.data.toy_name), MLP width 256."""
    config = base_config()
    config.total_steps = 3_000
    config.batch_size = 256
    config.data.name = "toy2d"
    config.data.toy_name = "checkerboard"
    config.data.num_classes = 0
    config.model.name = "mlp"
    config.model.hidden_size = 256
    config.model.depth = 4
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.ema_rate = 0.99
    config.sample_num = 2_000
    config.sample_cfg_scale = 1.0
    config.sample_every_steps = 0
    config.checkpoint_every_steps = 1_000
    return config
