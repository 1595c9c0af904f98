"""Smoke tests of the benchmark scripts (--quick): FLOPs, matmul rates, the step's profile, the
allocator and loop A/Bs, meshes, the VAE, the latent data and the evaluation's throughput.

The scripts run a few at a time, each in its own process (tiny DiT, 2 steps, 256^3 matmul, two
meshes, a small VAE), and must write JSON with the documented keys and positive numbers.
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


def _script(name: str, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", *args, "--out", str(out)]


# At most this many benchmark processes at once (the machine has two cores).
CONCURRENT = 3


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, dict]:
    """Runs every --quick benchmark, a few at a time; returns {name: its JSON}."""
    directory = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    commands = {
        "flops": ("flops_benchmark",),
        "matmul": ("matmul_benchmark",),
        "step_profile": ("step_profile",),
        "imagenet_flops": ("imagenet_flops",),
        "allocator": (
            "allocator_benchmark",
            "--rounds",
            "1",
            "--workloads",
            "train_step",
            "--settings",
            "glibc defaults,shortcut_jax tuning",
        ),
        "step_loop": ("step_loop_benchmark", "--scan", "2"),
        "mesh": ("mesh_benchmark", "--meshes", "1 device,data=2 x fsdp=4"),
        "vae": ("vae_benchmark",),
        "latents": ("latents_benchmark",),
        "eval_throughput": ("eval_throughput",),
    }
    pending = list(commands.items())
    running: dict[str, subprocess.Popen] = {}
    results = {}
    try:
        while pending or running:
            while pending and len(running) < CONCURRENT:
                name, (script, *args) = pending.pop(0)
                running[name] = subprocess.Popen(
                    _script(script, directory / f"{name}.json", *args),
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            name = next(iter(running))
            process = running.pop(name)
            stdout, stderr = process.communicate(timeout=900)
            assert process.returncode == 0, f"{name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
            with open(directory / f"{name}.json", encoding="utf-8") as file:
                results[name] = json.load(file)
    finally:
        for process in running.values():
            process.kill()
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
        assert step["meets_target"] == (step["fraction_of_matmul_rate"] >= step["target_fraction"])


def test_matmul_benchmark_reports_the_rate_and_the_steps_shapes(outputs):
    result = outputs["matmul"]
    assert result["matmul"]["flops_per_call"] == 2 * result["matmul"]["n"] ** 3
    assert result["matmul"]["gflops_median"] > 0
    for name in ("mnist", "dit_b2_small_batch"):
        rates = result["matmul_shapes"][name]
        assert len(rates) == 3 and all(rate["gflops_median"] > 0 for rate in rates)


def test_step_profile_times_the_parts_and_traces_the_mnist_step(outputs):
    profile = outputs["step_profile"]
    assert profile["full_step"]["median_seconds"] > 0
    parts = profile["breakdown"]["parts"]
    assert len(parts) == 4
    assert all(part["median_seconds"] > 0 and part["flops"] > 0 for part in parts.values())
    trace = profile["trace"]
    assert trace["top_ops"], trace
    assert trace["op_seconds_per_step"] > 0
    assert abs(sum(trace["op_time_share_by_category"].values()) - 1) < 1e-6


def test_imagenet_flops_counts_params_and_flops_without_running(outputs):
    entries = outputs["imagenet_flops"]["imagenet_batch256"]
    assert set(entries) == {"DiT-B/2", "DiT-XL/2"}
    for entry in entries.values():
        assert entry["num_params"] > 0
        assert entry["flops_per_step"] > 0
        assert entry["flops_per_image"] == pytest.approx(
            entry["flops_per_step"] / entry["batch_size"]
        )
        assert entry["flops_source"] in ("compiled", "lowered")


def test_allocator_benchmark_compares_settings_in_fresh_processes(outputs):
    result = outputs["allocator"]["workloads"]["train_step"]
    for setting in ("glibc defaults", "shortcut_jax tuning"):
        variant = result[setting]
        assert variant["median_seconds"] > 0
        assert variant["speedup_vs_glibc_defaults"] > 0
        assert variant["minor_page_faults_per_call"] >= 0
        assert [run["malloc_tuned"] for run in variant["runs"]] == [setting != "glibc defaults"]
    assert result["glibc defaults"]["speedup_vs_glibc_defaults"] == pytest.approx(1.0)
    assert (
        result["speedup_per_round"]
        == result["shortcut_jax tuning"]["speedup_vs_glibc_defaults_per_round"]
    )


def test_step_loop_benchmark_runs_every_variant_for_the_same_steps(outputs):
    result = outputs["step_loop"]
    (row,) = result["rounds"]
    assert set(row) == {"host_sums", "device_sums", "device_sums_prefetch", "scan_2"}
    assert row["host_sums"]["time_over_first_variant"] == pytest.approx(1.0)
    # Warm-up and timed steps alike, whatever the steps per call: the same number of updates.
    assert len({run["final_step"] for run in row.values()}) == 1
    assert all(run["seconds_per_step"] > 0 for run in row.values())
    costs = result["host_costs"]
    assert set(costs["median_seconds"]) == {
        "next_host_batch",
        "global_batch",
        "eager_metric_adds",
        "zero_sums",
    }
    assert all(seconds > 0 for seconds in costs["median_seconds"].values())
    assert costs["metric_leaves"] > 10  # (total, count) of every metric


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
        assert [r["step_seconds_median"] for r in mesh["rounds"]] == [
            mesh["step_seconds"]["median_seconds"]
        ]
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


def test_eval_throughput_rates_inception_fd_mnist_and_sampling(outputs):
    result = outputs["eval_throughput"]
    inception = result["inception"]
    # The FID graph is about 5.7 G multiply-adds per 299x299 image: about 11 GFLOP.
    assert 10.0e9 < inception["flops_per_image"] < 12.5e9
    assert inception["images_per_second"] > 0 and inception["fraction_of_matmul_rate"] > 0
    assert inception["meets_target"] == (
        inception["fraction_of_matmul_rate"] >= inception["target_fraction"]
    )
    assert result["fd_mnist"]["images_per_second"] > 0
    assert sorted(result["sampling"]) == ["1", "2"]
    shares = result["periodic_eval"]
    assert 0 < shares["fd_mnist_share"] < 1 and shares["eval_steps"] == [1, 2]


def test_matmul_rate_only_prints_the_rate_and_writes_nothing(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    import matmul_benchmark

    out = tmp_path / "matmul.json"
    result = matmul_benchmark.main(["--quick", "--rate_only", "--out", str(out)])
    assert result["matmul"]["gflops_median"] > 0 and not out.exists()
    assert "GFLOP/s" in capsys.readouterr().out
