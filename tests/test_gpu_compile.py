"""GPU compile-only support: topology names, target configs, compile-only devices and FLOPs.

The parsing tests need nothing; the compile tests need jax's CUDA plugin (`pip install -e
".[gpu-compile]"`, no GPU) and skip without it, or fail when SHORTCUT_JAX_REQUIRE_GPU_COMPILE=1
(CI installs the extra and sets it).
"""

import importlib.resources
import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shortcut_jax import gpu_compile

# --- Names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("h100-8", ("h100", 1, 8)),
        ("h100-16", ("h100", 2, 8)),
        ("h100-4", ("h100", 1, 4)),
        ("h100-1", ("h100", 1, 1)),
        ("8xh100", ("h100", 1, 8)),
        ("32xH100", ("h100", 4, 8)),
        ("a100-8", ("a100", 1, 8)),
        (" A100-64 ", ("a100", 8, 8)),
        ("h100:2x8", ("h100", 2, 8)),
        ("a100:3x4", ("a100", 3, 4)),
    ],
)
def test_gpu_topology_names_resolve_to_model_hosts_and_gpus_per_host(name, expected):
    assert gpu_compile.parse_gpu_topology(name) == expected
    assert gpu_compile.is_gpu_name(name)


@pytest.mark.parametrize(
    "name, says",
    [
        ("h100-12", "whole hosts of 8"),
        ("h100-0", "no GPUs"),
        ("b200-8", "unknown GPU model 'b200'"),
        ("h100:1x16", "1 to 8 GPUs per host"),
        ("h100", "not understood"),
        ("v5p-32", "unknown GPU model 'v5p'"),
        ("", "not understood"),
    ],
)
def test_a_bad_gpu_topology_is_a_value_error_listing_the_accepted_forms(name, says):
    with pytest.raises(ValueError, match=re.escape(says)) as raised:
        gpu_compile.parse_gpu_topology(name)
    message = str(raised.value)
    if "whole hosts" not in message:
        assert "h100-8" in message and "8xh100" in message and "h100:2x8" in message
        assert "h100, a100" in message


@pytest.mark.parametrize("name", ["v5p-32", "v5e:4x4", "v5litepod-16", "v4-8", "v6e-8", "", "x"])
def test_tpu_names_are_not_gpu_names(name):
    assert not gpu_compile.is_gpu_name(name)


def test_an_unknown_gpu_model_is_still_a_gpu_name_so_the_gpu_parser_explains_it():
    assert gpu_compile.is_gpu_name("b200-8") and gpu_compile.is_gpu_name("16xh200")


# --- Target configs ------------------------------------------------------------------------------


def _field(text: str, name: str) -> str:
    match = re.search(rf"^\s*{name}: (\S+)", text, re.MULTILINE)
    assert match, f"{name} missing"
    return match.group(1).strip('"')


@pytest.mark.parametrize("key", sorted(gpu_compile.GPUS))
def test_each_gpu_ships_a_target_config_whose_memory_and_name_match_the_table(key):
    gpu = gpu_compile.GPUS[key]
    packaged = importlib.resources.files("shortcut_jax") / "gpu_targets" / gpu.target_file
    assert packaged.is_file()
    text = gpu.target_config
    assert text.startswith("# proto-file:") and "datasheet" in text  # where the figures come from
    assert int(_field(text, "device_memory_size")) / gpu_compile.GiB == pytest.approx(gpu.hbm_gib)
    assert 78 < gpu.hbm_gib < 80  # "80 GB" boards: 80 GB minus what the driver reserves
    assert text.count(f'"{gpu.device_kind}"') == 2  # gpu_device_info.name, device_description_str
    assert gpu.peak_bf16_tflops > 0 and gpu.cores_per_chip == 1


def test_setup_packages_the_target_configs():
    import tomllib  # the package metadata is pyproject.toml's (setup.py is the thin file)

    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "gpu_targets/*.txtpb" in pyproject["tool"]["setuptools"]["package-data"]["shortcut_jax"]
    assert "gpu-compile" in pyproject["project"]["optional-dependencies"]


# --- Without the plugin, or with no cost analysis ------------------------------------------------


def test_without_the_plugin_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(gpu_compile, "plugin_installed", lambda: False)
    with pytest.raises(
        gpu_compile.GpuCompileError, match=re.escape('pip install -e ".[gpu-compile]"')
    ):
        gpu_compile.gpu_devices("h100-8")


class _Compiled:
    def __init__(self, cost, executable=None):
        self._cost, self._executable = cost, executable

    def cost_analysis(self):
        return self._cost

    def runtime_executable(self):
        if self._executable is None:
            raise AttributeError("no runtime executable")
        return self._executable


def test_flops_come_from_cost_analysis_when_the_backend_has_it():
    assert gpu_compile.flops_of(_Compiled({"flops": 12.0})) == 12.0
    assert gpu_compile.flops_of(_Compiled([{"flops": 7.0}])) == 7.0


def test_flops_fail_soft_with_a_warning_when_the_internal_cost_analysis_fails():
    with pytest.warns(RuntimeWarning, match="no FLOPs for this program"):
        assert gpu_compile.flops_of(_Compiled(None)) == 0.0


# --- With the plugin: compile-only GPUs -----------------------------------------------------------


def _gpu_compiler_unavailable(reason: str):
    """Skips, or fails when CI requires GPU compiling (SHORTCUT_JAX_REQUIRE_GPU_COMPILE=1)."""
    how = f"to run: {gpu_compile.INSTALL}"
    if os.environ.get("SHORTCUT_JAX_REQUIRE_GPU_COMPILE") == "1":
        pytest.fail(f"{reason} (SHORTCUT_JAX_REQUIRE_GPU_COMPILE=1); {how}")
    pytest.skip(f"{reason}; {how}")


@pytest.fixture(scope="module")
def h100_8():
    """(gpu, devices) of 'h100-8'; the persistent compilation cache off meanwhile (a compile-only
    client has no executables to store or load)."""
    if not gpu_compile.plugin_installed():
        _gpu_compiler_unavailable("jax's CUDA plugin is not installed")
    try:
        gpu, devices = gpu_compile.gpu_devices("h100-8")
    except gpu_compile.GpuCompileError as error:
        _gpu_compiler_unavailable(f"no compile-only GPUs: {error}")
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield gpu, devices
    jax.config.update("jax_enable_compilation_cache", cache)


def _matmul(devices, m: int, k: int, n: int):
    """bf16 (m, k) @ (k, n), rows split over a ('data',) mesh of `devices`, compiled."""
    mesh = Mesh(devices, ("data",))
    a = jax.ShapeDtypeStruct(
        (m, k), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data"))
    )
    b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
        return jax.jit(lambda a, b: a @ b).lower(a, b).compile()


def test_h100_8_is_eight_compile_only_h100s_on_one_host(h100_8):
    gpu, devices = h100_8
    assert gpu is gpu_compile.GPUS["h100"]
    assert len(devices) == 8
    assert {device.device_kind for device in devices} == {"NVIDIA H100 80GB HBM3"}
    assert {device.process_index for device in devices} == {0}
    assert jax.devices()[0].platform == "cpu"  # the process itself stays on the CPU


def test_a_sharded_matmul_compiles_for_h100s_with_its_memory_and_flops(h100_8):
    gpu, devices = h100_8
    m, k, n = 8192, 2048, 2048
    compiled = _matmul(devices, m, k, n)
    memory = compiled.memory_analysis()
    per_device_arguments = (m // 8) * k * 2 + k * n * 2  # a's rows split 8 ways, b replicated
    assert memory.argument_size_in_bytes == per_device_arguments
    assert memory.output_size_in_bytes == (m // 8) * n * 2
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    assert 0 < total < gpu.hbm_gib * gpu_compile.GiB
    assert compiled.cost_analysis() is None  # the plugin has none: flops_of works around it
    # Per device; where XLA splits K (smaller shapes) its partial-sum reduce adds < 1 %.
    assert gpu_compile.flops_of(compiled) == pytest.approx(2 * m * k * n / 8, rel=1e-2)
    assert gpu_compile.flops_of(compiled) >= 2 * m * k * n / 8


def test_multi_host_a100s_compile_too(h100_8):
    gpu, devices = gpu_compile.gpu_devices("a100-16")
    assert gpu.name == "a100" and len(devices) == 16
    assert {device.process_index for device in devices} == {0, 1}
    assert {device.device_kind for device in devices} == {"NVIDIA A100-SXM4-80GB"}
    compiled = _matmul(devices, 4096, 1024, 1024)
    assert gpu_compile.flops_of(compiled) == pytest.approx(2 * 4096 * 1024 * 1024 / 16, rel=1e-2)


def test_the_compile_command_plans_a_train_step_for_h100s(h100_8):
    """`shortcut_jax.compile --topology h100-8`: the run's own train step, per-GPU memory, FLOPs."""
    from shortcut_jax import aot, configs
    from shortcut_jax import compile as compile_cli

    config = configs.base_config()
    # Widths of 32 hit a Triton tiling error in XLA's deviceless GPU compile; 128 compiles.
    config.model.update(hidden_size=128, depth=1, num_heads=4, patch_size=4)
    config.batch_size = 16
    gpus = aot.resolve_slice("h100-8")
    assert gpus.num_chips == 8 and gpus.chip.name == "h100"
    report = aot.compile_programs(config, gpus, ("train",))
    (train,) = report.programs
    assert report.mesh_shape == {"data": 8, "fsdp": 1, "tensor": 1}
    assert not train.error and 0 < train.total_bytes < gpus.chip.usable_hbm_gib * aot.GiB
    assert train.flops > 0
    table = compile_cli.format_table(report, 0.4)
    assert "8 x NVIDIA H100" in table and "fits: every program fits" in table
