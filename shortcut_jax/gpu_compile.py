"""Compile-only NVIDIA GPUs: a run's programs compiled for GPUs this host does not have.

jax's CUDA plugin (`pip install -e ".[gpu-compile]"`: the `jax-cuda12-plugin` and
`jax-cuda12-pjrt` wheels of jaxlib's exact version, without NVIDIA's CUDA wheels) compiles for
a GPU that is only described. `jax.experimental.topologies.get_topology_desc(platform="cuda",
topology=..., target_config=...)` takes a text-format `stream_executor.GpuTargetConfigProto` (the
files in `shortcut_jax/gpu_targets/`) and returns compile-only devices; a Mesh over them, and
`jit(...).lower(abstract inputs).compile()` runs XLA's whole GPU pipeline (SPMD partitioning,
fusions, scheduling, PTX) with no GPU and no CUDA driver. `memory_analysis()` then gives the
per-GPU memory; the FLOPs come from `flops_of`, since the plugin has no `cost_analysis()`.

    gpu, devices = gpu_devices("h100-8")          # 8 compile-only H100s, one host
    compiled = jax.jit(step, ...).lower(...).compile()
    compiled.memory_analysis(), flops_of(compiled)

The numbers are XLA's buffer assignment for that target without autotuning (no GPU to time
kernels on), so temporaries can differ a little from a compile on the real GPU. At run time jax
preallocates 75 % of GPU memory by default (`XLA_PYTHON_CLIENT_MEM_FRACTION`): a program close
to `Gpu.hbm_gib` needs that fraction raised.

The plugin registers only when jax's platforms are restricted (otherwise its CUDA version check
needs a CUDA driver): `gpu_devices` sets `jax_platforms` to 'cpu' itself when jax has not chosen
its backends yet, and otherwise asks for `JAX_PLATFORMS=cpu`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import re
import warnings
from typing import Any

GiB = 1024**3
INSTALL = 'pip install -e ".[gpu-compile]"'
# Python modules of jax's CUDA PJRT plugins, under the `jax_plugins` namespace package.
_PLUGIN_MODULES = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
_MAX_GPUS_PER_HOST = 8
_ACCEPTED = (
    "use MODEL-N (h100-8: one host with 8 GPUs; h100-16: 2 hosts x 8; h100-4: one host with 4), "
    "NxMODEL (8xh100) or MODEL:HOSTSxGPUS (h100:2x8), with MODEL one of {models}"
)


class GpuCompileError(ValueError):
    """A GPU name that is not understood, or no GPU compiler in this environment."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU model that can be compiled for.

    The attribute names match `aot.Chip` where they mean the same (`name`, `hbm_gib`,
    `peak_bf16_tflops`, `cores_per_chip`), so reports written for TPU chips read GPUs too.

    Attributes:
      name: the model as a short key ('h100'), as in topology names.
      title: what it is ('H100 80GB SXM5').
      device_kind: the compile-only devices' `device_kind` (CUDA's device name).
      hbm_gib: GPU memory in GiB: the device_memory_size of its target config (what CUDA's
        device query reports as total global memory).
      peak_bf16_tflops: peak dense bf16 Tensor Core TFLOP/s (NVIDIA datasheet, without sparsity).
      target_file: its text-format GpuTargetConfigProto in `shortcut_jax/gpu_targets/`.
      cores_per_chip: 1 (one jax device per GPU).
    """

    name: str
    title: str
    device_kind: str
    hbm_gib: float
    peak_bf16_tflops: float
    target_file: str
    cores_per_chip: int = 1

    @property
    def target_config(self) -> str:
        """The target config text the CUDA plugin parses."""
        return _read_target(self.target_file)


@functools.cache
def _read_target(file_name: str) -> str:
    return importlib.resources.files("shortcut_jax").joinpath("gpu_targets", file_name).read_text()


# hbm_gib is the device_memory_size of each target config (a test keeps them equal).
GPUS: dict[str, Gpu] = {
    "h100": Gpu(
        name="h100",
        title="H100 80GB SXM5",
        device_kind="NVIDIA H100 80GB HBM3",
        hbm_gib=84942979072 / GiB,  # 79.11 GiB
        peak_bf16_tflops=989.0,
        target_file="h100_sxm.txtpb",
    ),
    "a100": Gpu(
        name="a100",
        title="A100 80GB SXM4",
        device_kind="NVIDIA A100-SXM4-80GB",
        hbm_gib=85198045184 / GiB,  # 79.35 GiB
        peak_bf16_tflops=312.0,
        target_file="a100_sxm.txtpb",
    ),
}

_MODEL = r"([a-z][a-z0-9]*?)"
_FORMS = (
    re.compile(rf"{_MODEL}-(?P<count>[0-9]+)"),  # h100-8
    re.compile(rf"(?P<count>[0-9]+)x{_MODEL}"),  # 8xh100
    re.compile(rf"{_MODEL}:(?P<hosts>[0-9]+)x(?P<per_host>[0-9]+)"),  # h100:2x8
)


def _match(text: str) -> tuple[str, re.Match[str]] | None:
    for form in _FORMS:
        match = form.fullmatch(text)
        if match:
            model = next(group for group in match.groups() if not group.isdigit())
            return model, match
    return None


def is_gpu_name(name: str) -> bool:
    """True when `name` names GPUs (h100-8, 8xh100, h100:2x8, or an unknown model in one of
    those forms, which `parse_gpu_topology` then rejects), False for TPU names (v5p-32,
    v5e:4x4, v5litepod-16) and anything else."""
    found = _match(str(name).strip().lower())
    if found is None:
        return False
    model = found[0]
    return model in GPUS or not re.fullmatch(r"v[0-9].*", model)


def parse_gpu_topology(name: str) -> tuple[str, int, int]:
    """A GPU topology name resolved to (model key, hosts, GPUs per host).

    'h100-8' and '8xh100' are one host with 8 GPUs, 'h100-4' one host with 4, 'h100-16' two
    hosts with 8 each (more than 8 GPUs must be whole 8-GPU hosts); 'h100:2x8' gives hosts and
    GPUs per host explicitly.

    Raises:
      GpuCompileError (a ValueError): for anything else, listing the accepted forms.
    """
    accepted = _ACCEPTED.format(models=", ".join(GPUS))
    text = str(name).strip().lower()
    found = _match(text)
    if found is None:
        raise GpuCompileError(f"GPU topology {name!r} is not understood; {accepted}")
    model, match = found
    if model not in GPUS:
        raise GpuCompileError(f"GPU topology {name!r}: unknown GPU model {model!r}; {accepted}")
    if "count" in match.groupdict() and match.group("count") is not None:
        count = int(match.group("count"))
        if count < 1:
            raise GpuCompileError(f"GPU topology {name!r} has no GPUs; {accepted}")
        if count <= _MAX_GPUS_PER_HOST:
            return model, 1, count
        if count % _MAX_GPUS_PER_HOST:
            raise GpuCompileError(
                f"GPU topology {name!r}: more than {_MAX_GPUS_PER_HOST} GPUs must be whole hosts "
                f"of {_MAX_GPUS_PER_HOST} ({model}-16, {model}-32, ...), or give hosts x GPUs "
                f"per host ({model}:{-(-count // _MAX_GPUS_PER_HOST)}x{_MAX_GPUS_PER_HOST})"
            )
        return model, count // _MAX_GPUS_PER_HOST, _MAX_GPUS_PER_HOST
    hosts, per_host = int(match.group("hosts")), int(match.group("per_host"))
    if hosts < 1 or not 1 <= per_host <= _MAX_GPUS_PER_HOST:
        raise GpuCompileError(
            f"GPU topology {name!r}: needs >= 1 host and 1 to {_MAX_GPUS_PER_HOST} GPUs per "
            f"host; {accepted}"
        )
    return model, hosts, per_host


def plugin_installed() -> bool:
    """Whether one of jax's CUDA plugins (cuda12 or cuda13) is installed."""
    for module in _PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(module) is not None:
                return True
        except ModuleNotFoundError:  # no `jax_plugins` namespace package at all
            pass
    return False


def _cuda_registered() -> bool:
    """Registers jax's plugins if not done yet; whether the CUDA one registered."""
    from jax._src import xla_bridge

    xla_bridge._discover_and_register_pjrt_plugins()
    return "cuda" in xla_bridge._backend_factories


def _ensure_plugin() -> None:
    """The CUDA plugin registered for compile-only use, or a GpuCompileError saying why not."""
    if not plugin_installed():
        raise GpuCompileError(
            "compiling for GPUs needs jax's CUDA plugin (no GPU or CUDA install is used): "
            f"{INSTALL} (the jax-cuda12-plugin and jax-cuda12-pjrt wheels of jaxlib's version)"
        )
    import jax
    from jax._src import xla_bridge

    platforms = jax.config.jax_platforms
    if not platforms and not xla_bridge.backends_are_initialized():
        # Without a platform list the plugin checks the CUDA install and, finding no driver,
        # does not register. jax has not picked its backends yet: restrict it to the CPU (this
        # process then runs nothing on a local GPU, which compiling does not need).
        jax.config.update("jax_platforms", "cpu")
        platforms = "cpu"
    if _cuda_registered():
        return
    why = (
        f"JAX_PLATFORMS={platforms!r} asks for CUDA"
        if platforms
        else "jax chose its backends before the GPU compiler was asked for"
    )
    raise GpuCompileError(
        "jax's CUDA plugin is installed but did not register: without a GPU its CUDA version "
        f"check fails unless jax's platforms exclude CUDA ({why}). Run the command with "
        "JAX_PLATFORMS=cpu (e.g. JAX_PLATFORMS=cpu python -m shortcut_jax.compile ...)"
    )


def topology_string(hosts: int, gpus_per_host: int) -> str:
    """The plugin's topology: '<partitions>x<hosts per partition>x<GPUs per host>'."""
    return f"1x{int(hosts)}x{int(gpus_per_host)}"


def gpu_devices(name: str) -> tuple[Gpu, tuple[Any, ...]]:
    """The compile-only devices of `name` ('h100-8', '8xh100', 'a100-16', 'h100:2x8').

    Needs the CUDA plugin (`pip install -e ".[gpu-compile]"`), not a GPU. Sets jax's platforms
    to 'cpu' when jax has not initialised its backends yet (see the module docstring).

    Returns:
      (the GPU model, its devices: hosts x GPUs per host, process_index = host).

    Raises:
      GpuCompileError: a bad name, no plugin, a plugin that could not register (with what to
        do), or one that refused the topology.
    """
    model, hosts, per_host = parse_gpu_topology(name)
    gpu = GPUS[model]
    _ensure_plugin()
    from jax.experimental import topologies

    topology = topology_string(hosts, per_host)
    try:
        description = topologies.get_topology_desc(
            platform="cuda", topology=topology, target_config=gpu.target_config
        )
    except Exception as error:  # noqa: BLE001 - the plugin raises plain runtime errors
        message = " ".join(str(error).split())
        raise GpuCompileError(
            f"GPU topology {name!r} ({topology}, {gpu.target_file}): the CUDA plugin refused it: "
            f"{message}"
        ) from None
    devices = tuple(description.devices)
    kinds = {device.device_kind for device in devices}
    if len(devices) != hosts * per_host or kinds != {gpu.device_kind}:
        raise GpuCompileError(
            f"GPU topology {name!r}: the CUDA plugin returned {len(devices)} devices of kind "
            f"{sorted(kinds)}, expected {hosts * per_host} of {gpu.device_kind!r}"
        )
    return gpu, devices


def cost_analysis(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program, per device: 'flops', 'bytes accessed', ...

    `compiled.cost_analysis()` where the backend has it (TPU, CPU). The CUDA plugin's
    compile-only executables have none ('GetCostAnalysis is not supported'); then XLA's
    HloCostAnalysis is run through the CPU client on the optimized per-device HLO module, with
    jax-internal API (`jax._src.lib._jax.hlo_module_cost_analysis`, checked with jax 0.10.2).
    If that API is missing or fails, warns and returns {}. As on TPU, a while loop's body is
    counted once.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost:
        return dict(cost)
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        return dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))
    except Exception as error:  # noqa: BLE001 - jax-internal API: fail soft
        warnings.warn(
            "no FLOPs for this program: it has no cost_analysis() and XLA's HloCostAnalysis "
            f"(jax-internal API) failed: {type(error).__name__}: {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return {}


def flops_of(compiled: Any) -> float:
    """FLOPs per device per call of a compiled program (0.0, with a warning, when unknown).

    See `cost_analysis` for where the number comes from on compile-only GPUs.
    """
    return float(cost_analysis(compiled).get("flops", 0.0))
