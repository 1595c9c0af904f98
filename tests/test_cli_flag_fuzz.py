"""Every flag of the sampling, evaluation and statistics CLIs, set to wrong values by kind
through their entry points: each ends with a clean exit (status 2 for a usage error, 1 for a
run-time failure) or runs, never with a traceback. The flags are read from the modules, so a flag
added later is fuzzed without a new test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny import REPO, tiny_mnist_config

from shortcut_jax import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(tiny_mnist_config(3), str(workdir))
    return workdir


@pytest.mark.parametrize(
    "module", ["shortcut_jax.sample", "shortcut_jax.evaluate", "shortcut_jax.tools.fid_stats"]
)
def test_every_flag_ends_cleanly_on_wrong_values(tiny_run, tmp_path, module):
    worker = REPO / "tests" / "cli_flag_fuzz_worker.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(worker), module, str(tiny_run), str(tmp_path)],
        cwd=tmp_path,  # relative outputs of accepted values land here
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert len({row["flag"] for row in outcomes}) >= 5, outcomes
    tracebacks = [row for row in outcomes if row["outcome"].startswith("traceback")]
    assert not tracebacks, "\n".join(
        f"--{row['flag']}={row['value']!r}: {row['outcome']}" for row in tracebacks
    )
    # cli_inputs' rule: 2 for the command line (a value the flag's parser refuses is one), 1 for
    # a run-time failure; nothing else.
    assert {row["outcome"] for row in outcomes} <= {"ran", "exit 1", "exit 2"}, outcomes
    unparsable = [row for row in outcomes if row["value"] in ("abc", "maybe", "1e99")]
    assert unparsable and all(row["outcome"] == "exit 2" for row in unparsable), unparsable
