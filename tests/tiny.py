"""Tiny configs and a CLI runner shared by the tests and the multi-device worker scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
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


def run_on_cpu_devices(script: str, devices: int = 8, timeout: float = 600) -> str:
    """Runs ``python -c script`` from the repository root with `devices` CPU devices.

    Asserts it exits 0 (showing the end of its stderr otherwise) and returns its stdout.
    """
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


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


class HookedRun:
    """`tests/hooked_main.py ARGS` (training with test hooks) in the background.

    Its stdout lines `step N` are collected by a thread, so the tests can time their signals;
    its stderr goes to `log` (a file, so a chatty run never blocks on a full pipe).
    """

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = Path(log)
        self.steps: list[int] = []
        self.saves: list[int] = []
        self.evals: list[int] = []
        environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
        with open(self.log, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "hooked_main.py"), *args],
                cwd=REPO,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("step "):
                self.steps.append(int(line.split()[1]))
            elif line.startswith("save "):
                self.saves.append(int(line.split()[1]))
            elif line.startswith("eval "):
                self.evals.append(int(line.split()[1]))

    def wait_for(self, condition, timeout: float = 120.0, what: str = "a condition") -> None:
        """Polls `condition()` every 10 ms until it holds; fails if the run ends or times out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the run ended (exit {self.process.returncode}) before {what}:\n"
                    + self.stderr_tail()
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n" + self.stderr_tail())
            time.sleep(0.01)

    def wait_for_steps(self, count: int, timeout: float = 120.0) -> int:
        """Waits until this run has finished `count` steps; returns the newest step number."""
        self.wait_for(lambda: len(self.steps) >= count, timeout, f"{count} steps")
        return self.steps[-1]

    def __enter__(self) -> HookedRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:  # a failed test never leaves a run behind
            self.process.kill()
            self.process.wait()

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 120.0) -> int:
        """Waits for the exit; returns the exit code (negative: killed by that signal)."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stderr_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def handles_sigterm(pid: int) -> bool:
    """Whether process `pid` has installed a SIGTERM handler (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (15 - 1)))
    except OSError:
        return False
    return False


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
