"""Meshes on 8 CPU devices: every mesh trains like one device; FSDP splits the state 8 ways;
checkpoints move between meshes. Each run is its own process (the device count is fixed when
jax starts), driven through tests/mesh_worker.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from shortcut_jax import checkpoint, configs, sharding

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STEPS = 3


def run_worker(
    mesh: str, workdir: Path, devices: int = 8, steps: int = STEPS, extra: tuple[str, ...] = ()
) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    result = subprocess.run(
        [
            sys.executable,
            str(TESTS / "mesh_worker.py"),
            "--mesh",
            mesh,
            "--workdir",
            str(workdir),
            "--steps",
            str(steps),
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """One training run per mesh, from the same seed and data."""
    root = tmp_path_factory.mktemp("meshes")
    meshes = {
        "single": ("data=1", 1),
        "data8": ("data=8", 8),
        "fsdp8": ("data=1,fsdp=8", 8),
        "data2_fsdp4": ("data=2,fsdp=4", 8),
        "data4_tensor2": ("data=4,tensor=2", 8),
    }
    return {
        name: (run_worker(mesh, root / name, devices), root / name)
        for name, (mesh, devices) in meshes.items()
    }


# AdamW's first updates are about lr * sign(gradient) per coordinate, so a gradient coordinate
# that is ~0 can flip sign under a different reduction order and move a parameter by up to
# ~2 lr per step: after STEPS steps at the warm-up learning rates (lr <= 5e-4) a parameter can
# legitimately differ by 2 * 5e-4 * STEPS = 3e-3 while the losses agree to float32 round-off.
PARAM_ATOL = 2 * 5e-4 * STEPS
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("name", ["data8", "fsdp8", "data2_fsdp4", "data4_tensor2"])
def test_mesh_trains_like_one_device(runs, name):
    reference, reference_dir = runs["single"]
    result, workdir = runs[name]
    assert sorted(result["losses"]) == sorted(reference["losses"])
    for step, loss in reference["losses"].items():
        np.testing.assert_allclose(result["losses"][step], loss, rtol=LOSS_RTOL)
    # The checkpoint written under this mesh restores onto the single device of this process.
    _, state = checkpoint.load_run(str(workdir))
    _, reference_state = checkpoint.load_run(str(reference_dir))
    for leaf, reference_leaf in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(reference_leaf), atol=PARAM_ATOL)
    mean_abs_difference = np.mean(
        [
            np.mean(np.abs(np.asarray(a) - np.asarray(b)))
            for a, b in zip(
                jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params), strict=True
            )
        ]
    )
    assert mean_abs_difference < 1e-4


def test_fsdp_holds_an_eighth_of_the_state_on_each_device(runs):
    result, _ = runs["fsdp8"]
    sizes = result["bytes"]
    per_device = sizes["params_per_device"]
    assert len(per_device) == 8
    # Biases and normalisation-free layers are small and replicated; kernels are split 8 ways.
    for device_bytes in per_device.values():
        assert device_bytes < sizes["params_total"] / 8 * 1.15, (device_bytes, sizes)
    for device_bytes in sizes["state_per_device"].values():
        assert device_bytes < sizes["state_total"] / 8 * 1.15, (device_bytes, sizes)
    data_parallel = runs["data8"][0]["bytes"]
    for device_bytes in data_parallel["params_per_device"].values():
        assert device_bytes == data_parallel["params_total"]


def test_checkpoint_from_fsdp_resumes_on_another_mesh(runs, tmp_path):
    _, fsdp_dir = runs["fsdp8"]
    workdir = tmp_path / "continued"
    shutil.copytree(fsdp_dir, workdir)
    continued = run_worker("data=2,fsdp=4", workdir, steps=STEPS + 2)
    assert sorted(continued["losses"], key=int) == [str(STEPS + 1), str(STEPS + 2)]
    uninterrupted = run_worker("data=2,fsdp=4", tmp_path / "straight", steps=STEPS + 2)
    for step in (str(STEPS + 1), str(STEPS + 2)):
        np.testing.assert_allclose(
            continued["losses"][step], uninterrupted["losses"][step], rtol=1e-4
        )


OBJECTIVES = (
    "meanflow",
    "diffusion",
    "live_reflow",
    "consistency_training",
    "progressive_distillation",
    "consistency_distillation",
    "reflow",
)


@pytest.fixture(scope="module")
def objective_runs(tmp_path_factory) -> dict[str, dict]:
    """Every newer objective trained on one device and on a data x fsdp x tensor mesh."""
    root = tmp_path_factory.mktemp("objective_meshes")
    # The distillation objectives share one teacher run and its pairs, made by the first worker.
    extra = ("--objectives", ",".join(OBJECTIVES), "--teacher_dir", str(root / "teacher"))
    return {
        name: run_worker(mesh, root / name, devices, extra=extra)["objective_losses"]
        for name, (mesh, devices) in {
            "single": ("data=1", 1),
            "mixed": ("data=2,fsdp=2,tensor=2", 8),
        }.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_on_a_mesh_like_one_device(objective_runs, objective):
    reference, result = objective_runs["single"][objective], objective_runs["mixed"][objective]
    assert sorted(result) == sorted(reference) == [str(step) for step in range(1, STEPS + 1)]
    for step, loss in reference.items():
        np.testing.assert_allclose(result[step], loss, rtol=LOSS_RTOL)


def test_mesh_shape_resolves_the_rest_of_the_devices():
    config = configs.base_config()
    config.mesh.update({"data": -1, "fsdp": 4, "tensor": 1})
    assert sharding.mesh_shape(config, 8) == (2, 4, 1)
    config.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.mesh_shape(config, 8) == (2, 2, 2)
    with pytest.raises(sharding.ShardingError, match="config.mesh"):
        sharding.mesh_shape(config, 4)


def test_parameter_dimension_not_divisible_by_its_mesh_axis_is_named():
    from shortcut_jax import models, optim
    from shortcut_jax.state import init_state

    config = configs.base_config()
    config.model.hidden_size = 36  # 'embed' over fsdp=8: 36 % 8 != 0
    config.model.num_heads = 4
    model = models.get_model(config)
    boxed = jax.eval_shape(
        lambda: init_state(config, model, optim.make_optimizer(config), boxed=True)
    )
    rules = sharding.logical_rules(config)
    sharding.check_divisibility(boxed, {"data": 8, "fsdp": 1, "tensor": 1}, rules)
    with pytest.raises(sharding.ShardingError, match="size 36 over fsdp = 8"):
        sharding.check_divisibility(boxed, {"data": 1, "fsdp": 8, "tensor": 1}, rules)
