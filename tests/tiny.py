"""Tiny configs and a CLI runner shared by the tests and the multi-device worker scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from shortcut_jax import configs

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repository root on the CPU; captures its output."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A free TCP port on localhost (for a jax.distributed coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(
    commands: list[list[str]], env: dict[str, str], timeout: float = 600
) -> list[tuple[str, str]]:
    """Starts every command at once from the repository root and waits for all of them.

    Returns:
      (stdout, stderr) of each; asserts that every process exited 0 (killing the rest otherwise).
    """
    processes = [
        subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command in commands
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    return outputs


def tiny_mnist_config(total_steps: int = 6):
    """A DiT small enough for a step in milliseconds, on the real MNIST digits.

    Every sharded parameter dimension divides by 8 (hidden 32, MLP 128, 2 heads for tensor=2).
    """
    config = configs.base_config()
    config.total_steps = total_steps
    config.batch_size = 16
    config.model.hidden_size = 32
    config.model.depth = 1
    config.model.num_heads = 2
    config.model.patch_size = 7
    config.denoise_timesteps = 8
    config.optim.warmup_steps = 2
    config.optim.schedule = "constant"  # so a run cut short shares its schedule with a longer one
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.sample_every_steps = 0
    config.sample_steps = (1, 3)
    config.sample_num = 10
    config.eval_steps = (1, 8)
    return config


def get_config():
    """The tiny config as a config file for the CLI (`--config tests/tiny.py`)."""
    return tiny_mnist_config()
