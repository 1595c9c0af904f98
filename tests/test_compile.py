"""`python -m shortcut_jax.compile`: a run's programs compiled for TPU slices on this CPU host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shortcut_jax import aot, configs
from shortcut_jax import compile as compile_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name, generation, topology",
    [
        ("v4-8", "v4", "v4:2x2x1"),
        ("v4-32", "v4", "v4:2x2x4"),
        ("v5litepod-16", "v5e", "v5e:4x4"),
        ("v5e-8", "v5e", "v5e:2x4"),
        ("v5p-8", "v5p", "v5p:2x2x1"),
        ("v5p-32", "v5p", "v5p:2x2x4"),
        ("v6e-8", "v6e", "v6e:2x4"),
        ("V5E:4x4", "v5e", "v5e:4x4"),
        ("v5litepod-1", "v5e", "v5e:1x1"),
        ("v6e-1", "v6e", "v6e:1x1"),
    ],
)
def test_accelerator_types_name_their_topology(name, generation, topology):
    chip, resolved = aot.parse_topology(name)
    assert (chip.name, resolved) == (generation, topology)


@pytest.mark.parametrize("name", ["v5p-7", "v4-12", "v9-8", "tpu", "v5e:4y4", ""])
def test_unknown_topologies_are_refused_with_the_accepted_forms(name):
    with pytest.raises(aot.AotError, match="--topology"):
        aot.parse_topology(name)


@pytest.mark.parametrize(
    "name, chips, hosts",
    [("v5litepod-1", 1, 1), ("v5litepod-8", 8, 1), ("v6e-16", 16, 4), ("v4-8", 4, 1)],
)
def test_slices_have_the_chips_and_hosts_of_their_accelerator_type(
    tpu_compiler, name, chips, hosts
):
    tpu = aot.resolve_slice(name)
    assert (tpu.num_chips, tpu.num_hosts) == (chips, hosts)


def _tiny_config(batch_size: int = 8):
    config = configs.base_config()
    config.model.update(hidden_size=32, depth=1, num_heads=2, patch_size=4)
    config.batch_size = batch_size
    config.eval_batch_size = 8
    return config


def test_train_step_and_sampler_compile_for_a_v5e_slice(tpu_compiler):
    tpu = aot.resolve_slice("v5e:2x2")
    assert (tpu.num_chips, tpu.chip.name, tpu.num_hosts) == (4, "v5e", 1)
    report = aot.compile_programs(_tiny_config(), tpu, ("train", "sample"), sample_steps=4)
    assert report.mesh_shape == {"data": 4, "fsdp": 1, "tensor": 1}
    hbm = tpu.chip.hbm_gib * aot.GiB
    for program in report.programs:
        assert not program.error
        assert program.argument_bytes > 0 and program.temp_bytes > 0
        assert 0 < program.total_bytes < hbm
        assert program.flops > 0
    train, sample = report.programs
    # The state (params, Adam moments, EMA) is replicated over data=4: arguments hold it whole.
    state_bytes = 4 * 4 * report.num_params
    assert train.argument_bytes >= state_bytes
    assert train.alias_bytes >= state_bytes  # the donated state is updated in place
    assert compile_cli.fits(report)
    table = compile_cli.format_table(report, 0.4)
    assert "fits: every program fits" in table and "train" in table
    data = compile_cli.to_json(report, 0.4)
    assert data["fits"] and data["chips"] == 4
    assert data["programs"][0]["estimates"]["chip_hours"] > 0
    json.dumps(data)


def test_a_batch_too_large_for_the_chip_is_reported_with_advice_and_exit_status_1(
    tpu_compiler, tmp_path
):
    """4 Mi latents of 32x32x4 are 16 GiB per v5e chip before any activation."""
    out = tmp_path / "plan.json"
    command = [
        sys.executable,
        "-m",
        "shortcut_jax.compile",
        f"--config={ROOT}/experiments/imagenet256.py",
        "--topology=v5e:2x2",
        "--programs=train_latents",
        f"--json={out}",
        "--config.model.preset=",
        "--config.model.hidden_size=32",
        "--config.model.depth=1",
        "--config.model.num_heads=2",
        "--config.model.patch_size=2",
        "--config.batch_size=4194304",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    verdict = [line for line in result.stdout.splitlines() if line.startswith("DOES NOT FIT")]
    assert len(verdict) == 1, result.stdout
    assert "train_latents" in verdict[0] and "GiB more for temporaries than" in verdict[0]
    assert "batch_size" in verdict[0] and "remat" in verdict[0] and "fsdp" not in verdict[0]
    data = json.loads(out.read_text())
    assert not data["fits"] and data["programs"][0]["advice"]


def test_bad_input_exits_2_with_one_line(tpu_compiler):
    command = [
        sys.executable,
        "-m",
        "shortcut_jax.compile",
        f"--config={ROOT}/experiments/mnist.py",
        "--topology=v5p-7",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: --topology 'v5p-7'" in result.stderr


def test_an_unknown_override_exits_2_naming_it():
    command = [
        sys.executable,
        "-m",
        "shortcut_jax.compile",
        f"--config={ROOT}/experiments/mnist.py",
        "--topology=v5e:2x2",
        "--config.no_such_field=3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no_such_field" in result.stderr and "Traceback" not in result.stderr
