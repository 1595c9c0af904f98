"""Smoke tests of the benchmark scripts (--quick): FLOPs, meshes, the VAE and the latent data.

The scripts run at once, each in its own process (tiny DiT, 2 steps, 256^3 matmul, two meshes, a
small VAE), and must write JSON with the documented keys and positive numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, dict]:
    """Runs both --quick benchmarks concurrently; returns {'flops': json, 'mesh': json}."""
    directory = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    commands = {
        "flops": [
            sys.executable,
            str(BENCHMARKS / "flops_benchmark.py"),
            "--quick",
            "--out",
            str(directory / "flops.json"),
        ],
        "mesh": [
            sys.executable,
            str(BENCHMARKS / "mesh_benchmark.py"),
            "--quick",
            "--meshes",
            "1 device,data=2 x fsdp=4",
            "--out",
            str(directory / "mesh.json"),
        ],
        "vae": [
            sys.executable,
            str(BENCHMARKS / "vae_benchmark.py"),
            "--quick",
            "--out",
            str(directory / "vae.json"),
        ],
        "latents": [
            sys.executable,
            str(BENCHMARKS / "latents_benchmark.py"),
            "--quick",
            "--out",
            str(directory / "latents.json"),
        ],
    }
    processes = {
        name: subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, command in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        with open(directory / f"{name}.json", encoding="utf-8") as file:
            results[name] = json.load(file)
    return results


def test_flops_benchmark_reports_positive_rates_flops_and_times(outputs):
    result = outputs["flops"]
    assert result["meta"]["quick"] is True
    assert result["matmul"]["gflops_median"] > 0
    assert result["matmul"]["flops_per_call"] == 2 * result["matmul"]["n"] ** 3
    for name in ("mnist", "dit_b2_small_batch"):
        step = result["steps"][name]
        assert step["cost_analysis"]["flops"] > 0
        assert step["compile_seconds"] > 0
        assert step["step_seconds"]["median_seconds"] > 0
        assert step["achieved_gflops"] > 0
        assert step["fraction_of_matmul_rate"] > 0
        assert 0 < step["matmul_share_of_flops"] <= 1
    assert all(rate["gflops_median"] > 0 for rate in result["matmul_shapes"]["mnist"])
    assert isinstance(result["limits"], list) and result["limits"]


def test_flops_benchmark_profiles_the_mnist_step(outputs):
    profile = outputs["flops"]["mnist_profile"]
    parts = profile["breakdown"]["parts"]
    assert len(parts) == 4
    assert all(part["median_seconds"] > 0 and part["flops"] > 0 for part in parts.values())
    trace = profile["trace"]
    assert trace["top_ops"], trace
    assert trace["op_seconds_per_step"] > 0
    assert abs(sum(trace["op_time_share_by_category"].values()) - 1) < 1e-6


def test_flops_benchmark_counts_imagenet_params_and_flops_without_running(outputs):
    entries = outputs["flops"]["imagenet_batch256"]
    assert set(entries) == {"DiT-B/2", "DiT-XL/2"}
    for entry in entries.values():
        assert entry["num_params"] > 0
        assert entry["flops_per_step"] > 0
        assert entry["flops_per_image"] == pytest.approx(
            entry["flops_per_step"] / entry["batch_size"]
        )
        assert entry["flops_source"] in ("compiled", "lowered")


def test_flops_benchmark_compares_allocator_settings_in_fresh_processes(outputs):
    variants = outputs["flops"]["allocator_ab"]["mnist"]
    assert len(variants) == 2
    for variant in variants.values():
        assert variant["median_seconds"] > 0
        assert variant["speedup_vs_default"] > 0
        assert variant["minor_page_faults_per_step"] >= 0
    assert next(iter(variants.values()))["speedup_vs_default"] == pytest.approx(1.0)


def test_mesh_benchmark_reports_each_mesh_relative_to_one_device(outputs):
    result = outputs["mesh"]
    assert "not a speedup" in result["meta"]["notes"]
    meshes = result["meshes"]
    assert set(meshes) == {"1 device", "data=2 x fsdp=4"}
    assert meshes["1 device"]["process_devices"] == 1
    assert meshes["data=2 x fsdp=4"]["process_devices"] == 8
    assert meshes["data=2 x fsdp=4"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    for mesh in meshes.values():
        assert mesh["compile_seconds"] > 0
        assert mesh["step_seconds"]["median_seconds"] > 0
        for key in ("argument_bytes", "output_bytes", "temp_bytes"):
            assert mesh["memory_per_device"][key] > 0
        assert mesh["memory_per_device"]["generated_code_bytes"] >= 0  # 0 on the CPU client
        assert mesh["relative_to_1_device"]["step_seconds_median"] > 0
    assert meshes["1 device"]["relative_to_1_device"]["compile_seconds"] == pytest.approx(1.0)
    # FSDP over 4 devices holds about a quarter of the parameters per device.
    assert (
        meshes["data=2 x fsdp=4"]["params_bytes_per_device_max"]
        < 0.5 * meshes["1 device"]["params_bytes_per_device_max"]
    )


def test_vae_benchmark_reports_encode_and_decode_rates_and_flops(outputs):
    result = outputs["vae"]
    assert result["matmul_before"]["gflops_median"] > 0
    for part in ("encode", "decode"):
        assert result[part]["images_per_second_median"] > 0
        assert result[part]["flops_per_image"] > 0
        assert result[part]["fraction_of_matmul_rate"] > 0
        # XLA's count and the analytic count of convolutions and attention agree within padding.
        assert 0.9 < result[part]["cost_analysis_over_analytic"] < 1.1


def test_latents_benchmark_reports_encoder_source_and_pod_needs(outputs):
    result = outputs["latents"]
    assert result["encoder"]["images_per_second"] > 0
    assert all(run["examples_per_second"] > 0 for run in result["latent_source"].values())
    rows = result["pod_consumption"]["rows"]
    assert set(rows) >= {"DiT-B/2 on v4-32", "DiT-XL/2 on v4-32"}
    assert all(row["images_per_second_per_host"] > 0 for row in rows.values())
