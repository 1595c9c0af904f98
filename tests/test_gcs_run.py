"""A whole latent run on a bucket, against a real GCS API (fake-gcs-server on 127.0.0.1).

`experiments/imagenet256.py:tiny` with its latents and its workdir on gs://: encode the latents
into the bucket, train, SIGKILL the run after its first checkpoint, resume it to the end (the
same final state as an uninterrupted run on the bucket), sample and evaluate from the bucket.
Every process runs in an empty working directory with its caches redirected: afterwards the
local disk holds nothing but caches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath
from test_preemption import assert_same_state
from tiny import REPO, HookedRun

from shortcut_jax import checkpoint, workdir_lock

pytestmark = pytest.mark.slow

CONFIG = str(REPO / "experiments" / "imagenet256.py") + ":tiny"
TOTAL, EVERY = 8, 4
TRAIN_FLAGS = [
    f"--config.total_steps={TOTAL}",
    f"--config.checkpoint_every_steps={EVERY}",
    "--config.log_every_steps=2",
    "--config.sample_steps=(1,)",
    "--config.eval_every_steps=0",
]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _local_files(root: Path, caches: Path) -> list[str]:
    """Every file under `root` that is not under `caches`."""
    found = []
    for directory, _, names in os.walk(root):
        if Path(directory).is_relative_to(caches):
            continue
        found += [os.path.join(directory, name) for name in names]
    return found


def test_tiny_latent_run_on_a_bucket_trains_resumes_samples_and_evaluates(gcs, tmp_path, request):
    try:  # CI has the Inception weights (SHORTCUT_JAX_REQUIRE_PARITY=1 fails without them)
        inception = request.getfixturevalue("converted")
    except pytest.skip.Exception:
        inception = None
    bucket = gcs.bucket()
    caches, cwd = tmp_path / "caches", tmp_path / "cwd"
    cwd.mkdir()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "SHORTCUT_JAX_CACHE": str(caches / "shortcut_jax"),
        "XDG_CACHE_HOME": str(caches / "xdg"),
        "TMPDIR": str(caches / "tmp"),
        # A SIGKILLed run's lease stays until it is stale: 3 s here instead of 180.
        workdir_lock.RENEW_ENV: "1",
        workdir_lock.STALE_ENV: "3",
    }
    (caches / "tmp").mkdir(parents=True)
    latents, reference, run = f"{bucket}/latents", f"{bucket}/reference", f"{bucket}/run"

    _run(
        ["-m", "shortcut_jax.tools.encode_latents", "--config", CONFIG, "--out", latents,
         "--batch_size", "16", "--shard_size", "16"],
        cwd, env,
    )  # fmt: skip
    assert epath.Path(latents, "metadata.json").exists()
    train = ["--config", CONFIG, f"--config.data.latent_dir={latents}", *TRAIN_FLAGS]
    _run(["-m", "shortcut_jax.main", *train, "--workdir", reference], cwd, env)

    hooks = {**env, "SHORTCUT_JAX_TEST_STEP_SECONDS": "0.3"}
    first_save = epath.Path(run, "checkpoints", str(EVERY), "commit_success.txt")
    with HookedRun([*train, "--workdir", run], caches / "killed.log", hooks) as job:
        job.wait_for(first_save.exists, timeout=300, what=f"checkpoint {EVERY} in the bucket")
        job.send(signal.SIGKILL)
        assert job.wait() == -signal.SIGKILL, "the run ended before the kill"
    assert not epath.Path(run, "checkpoints", str(TOTAL)).exists()
    time.sleep(3.5)  # the killed run's lease goes stale
    resumed = _run(["-m", "shortcut_jax.main", *train, "--workdir", run], cwd, env)
    assert f"Resumed at step {EVERY}" in resumed.stderr or "Resumed at step" in resumed.stderr

    _, expected = checkpoint.load_run(reference)
    _, state = checkpoint.load_run(run)
    assert int(state.step) == TOTAL
    assert_same_state(state, expected)

    samples = f"{bucket}/samples/tiny.npz"
    _run(
        ["-m", "shortcut_jax.sample", "--workdir", run, "--out", samples, "--num", "4",
         "--steps", "1", "--batch_size", "4"],
        cwd, env,
    )  # fmt: skip
    assert epath.Path(samples).exists()
    if inception:
        _run(
            ["-m", "shortcut_jax.evaluate", "--workdir", run, "--steps", "1", "--num", "8",
             "--metrics", "fid", "--ref_num", "16", "--pr_num", "0", "--batch_size", "8",
             "--inception", inception],
            cwd, env,
        )  # fmt: skip
        assert epath.Path(run, "eval", f"step_{TOTAL}", "results.json").exists()

    names = gcs.list_objects(bucket)
    assert any(name.startswith("run/events.out.tfevents") for name in names), names
    assert f"run/checkpoints/{TOTAL}/commit_success.txt" in names
    assert not list(cwd.iterdir()), "a gs:// path was written to the working directory"
    assert _local_files(tmp_path, caches) == []
    assert not (REPO / "gs:").exists()
