"""Ahead-of-time compilation of a run's programs for a TPU slice, on any host (no TPU needed).

JAX's TPU compiler (the `libtpu` wheel, `pip install -e ".[tpu]"`) has a compile-only client:
`jax.experimental.topologies.get_topology_desc` describes the devices of any slice, a Mesh is
built over them with the run's `config.mesh`, and each program is lowered with abstract inputs
(`jax.ShapeDtypeStruct` carrying the run's shardings) and compiled for that TPU. Its
`memory_analysis()` is the per-chip HBM the program needs, its `cost_analysis()` the FLOPs each
chip runs. The programs are the run's own, from the builders the train loop and the evaluation
use (`compiled_step.build`, the sharded sampler, the VAE decoder, the fused evaluation).

    slice = resolve_slice("v5p-32")
    report = compile_programs(config, slice, ("train",))
    report.programs[0].fits, report.programs[0].total_bytes

The command line is `python -m shortcut_jax.compile`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from shortcut_jax import (
    compiled_step,
    latent_space,
    models,
    objectives,
    optim,
    sampling,
    sharding,
    steps,
)
from shortcut_jax import state as state_lib

GiB = 1024**3


class AotError(ValueError):
    """A topology, program name or config that cannot be compiled ahead of time."""


class AotRuntimeError(AotError):
    """A well-formed request the machine could not carry out (no libtpu, a compiler failure):
    a run-time failure, exit status 1 (`cli_inputs`), not a usage error."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip generation.

    Attributes:
      name: generation as in accelerator types ('v4', 'v5e', 'v5p', 'v6e').
      hbm_gib: HBM per chip (GiB), as Google's system architecture pages state it.
      usable_hbm_gib: what the TPU compiler lets one program use ("exceeds available HBM" in
        its out-of-memory message; measured with libtpu 0.0.42.1): the limit `fits` checks.
      peak_bf16_tflops: peak dense bf16 matmul TFLOP/s per chip.
      cores_per_chip: TensorCores per chip; accelerator types of megacore chips count cores.
    """

    name: str
    hbm_gib: float
    usable_hbm_gib: float
    peak_bf16_tflops: float
    cores_per_chip: int


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32.0, 30.75, 275.0, 2),
    "v5e": Chip("v5e", 16.0, 15.75, 197.0, 1),
    "v5p": Chip("v5p", 95.0, 95.74, 459.0, 2),
    "v6e": Chip("v6e", 32.0, 31.25, 918.0, 1),
}
# device_kind of the compile-only devices -> generation.
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
# Chips of a slice -> its shape: 3-D tori (v4, v5p) and 2-D (v5e, v6e) as Cloud TPU names them.
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice to compile for.

    Attributes:
      name: what the user asked for ('v5p-32' or 'v5p:2x2x4').
      chip: the chip generation.
      topology: the topology string given to the compiler ('v5p:2x2x4').
      num_slices: slices joined over the data-center network (multi-slice).
      devices: the compile-only devices (one per chip), all slices.
    """

    name: str
    chip: Chip
    topology: str
    num_slices: int
    devices: tuple[Any, ...]

    @property
    def num_chips(self) -> int:
        return len(self.devices)

    @property
    def num_hosts(self) -> int:
        return len({device.process_index for device in self.devices})


def parse_topology(name: str) -> tuple[Chip, str]:
    """An accelerator type ('v5p-32', 'v5litepod-16', 'v4-8') or topology ('v5e:4x4') resolved.

    Returns:
      (chip, topology string for the compiler).

    Raises:
      AotError: for a name that is neither, with the accepted forms.
    """
    text = name.strip().lower()
    accepted = (
        "use an accelerator type (v4-8, v4-32, v5litepod-16 or v5e-16, v5p-8, v5p-32, v6e-8, ...) "
        "or a topology (v4:2x2x1, v5e:4x4, v5p:2x2x4, v6e:2x4)"
    )
    match = re.fullmatch(r"([a-z0-9]+)[:_=]([0-9x]+)", text)
    if match:
        generation = _ALIASES.get(match.group(1), match.group(1))
        if generation not in CHIPS:
            raise AotError(f"--topology {name!r}: unknown TPU generation; {accepted}")
        return CHIPS[generation], f"{generation}:{match.group(2)}"
    match = re.fullmatch(r"([a-z0-9]+?)-([0-9]+)", text)
    if not match:
        raise AotError(f"--topology {name!r} is not a TPU slice name; {accepted}")
    generation = _ALIASES.get(match.group(1), match.group(1))
    if generation not in CHIPS:
        raise AotError(f"--topology {name!r}: unknown TPU generation; {accepted}")
    chip = CHIPS[generation]
    count = int(match.group(2))
    if count % chip.cores_per_chip:
        raise AotError(
            f"--topology {name!r}: {generation} accelerator types count TensorCores, "
            f"{chip.cores_per_chip} per chip; {accepted}"
        )
    chips = count // chip.cores_per_chip
    shapes = _SHAPES_3D if generation in ("v4", "v5p") else _SHAPES_2D
    if chips not in shapes:
        raise AotError(
            f"--topology {name!r}: no {generation} slice has {chips} chips here; known sizes: "
            f"{', '.join(f'{generation}-{n * chip.cores_per_chip}' for n in sorted(shapes))}, "
            "or give the topology itself (e.g. v5p:4x4x8)"
        )
    return chip, f"{generation}:{shapes[chips]}"


def _gpu_slice(name: str, num_slices: int) -> Slice:
    """GPUs described by `shortcut_jax.gpu_compile` (jax's CUDA plugin, no GPU needed)."""
    from shortcut_jax import gpu_compile

    if int(num_slices) != 1:
        raise AotError(f"--num_slices={num_slices}: GPU topologies are one slice ('h100:2x8')")
    try:
        gpu, devices = gpu_compile.gpu_devices(name)
        _, hosts, per_host = gpu_compile.parse_gpu_topology(name)
    except gpu_compile.GpuCompileError as error:
        raise AotError(str(error)) from None
    # XLA's GPU compiler checks no memory limit: the whole memory is the bound.
    chip = Chip(gpu.name, gpu.hbm_gib, gpu.hbm_gib, gpu.peak_bf16_tflops, 1)
    return Slice(name, chip, gpu_compile.topology_string(hosts, per_host), 1, devices)


def resolve_slice(name: str, num_slices: int = 1) -> Slice:
    """The compile-only devices of a TPU slice (needs libtpu, not a TPU), or of GPUs ('h100-8',
    needs jax's CUDA plugin: `shortcut_jax.gpu_compile`).

    Raises:
      AotError: the compiler is missing, or the topology is unknown to it.
    """
    from shortcut_jax import gpu_compile

    if gpu_compile.is_gpu_name(name):
        return _gpu_slice(name, num_slices)
    chip, topology = parse_topology(name)
    if int(num_slices) < 1:
        raise AotError(f"--num_slices={num_slices} must be >= 1")
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise AotRuntimeError(
            "compiling for TPU needs the TPU compiler of the libtpu wheel: "
            'pip install -e ".[tpu]" (it runs on a CPU host; no TPU is used)'
        )
    # Compile-only use needs no exclusive hold on a TPU; without this a second process (or a
    # training job on a TPU VM) makes libtpu refuse to load.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    options: dict[str, Any] = {}
    dims = [int(d) for d in topology.split(":")[1].split("x")]
    if len(dims) == 2 and dims[0] * dims[1] <= 8:
        # Single-host v5e / v6e slices (1, 4 or 8 chips) have all their chips on one host.
        options["chips_per_host_bounds"] = (dims[0], dims[1], 1)
    if chip.cores_per_chip > 1:
        options["chip_config_name"] = "megacore"  # one device per chip, as JAX runs on them
    if int(num_slices) > 1:
        options["num_slices"] = int(num_slices)
    try:
        description = topologies.get_topology_desc(
            topology_name=topology, platform="tpu", **options
        )
    except Exception as error:  # noqa: BLE001 - libtpu raises plain runtime errors
        raise AotError(f"--topology {name!r} ({topology}): libtpu refused it: {error}") from None
    devices = tuple(description.devices)
    kinds = {_DEVICE_KINDS.get(device.device_kind) for device in devices}
    if kinds != {chip.name}:
        raise AotError(f"--topology {name!r}: libtpu returned devices of kind {kinds}")
    return Slice(name, chip, topology, int(num_slices), devices)


# --------------------------------------------------------------------------------------------
# Programs.
# --------------------------------------------------------------------------------------------

PROGRAMS = ("train", "train_latents", "train_online", "sample", "decode", "features", "evaluate")
_DESCRIPTIONS = {
    "train": "train step as the config runs it",
    "train_latents": "train step on precomputed latents",
    "train_online": "train step encoding images with the VAE",
    "sample": "k-step sampler (EMA params)",
    "decode": "VAE decode of samples",
    "features": "FID Inception features",
    "evaluate": "fused evaluation: sample, decode, Inception",
}


@dataclasses.dataclass
class ProgramReport:
    """What one compiled program needs per chip.

    Attributes:
      name, description: the program.
      batch: examples per call (global).
      argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: per chip, from
        `memory_analysis()`; outputs aliased to donated arguments are not counted twice.
      flops: per chip per call, from `cost_analysis()` with the loops it counts once counted per
        trip: the sampler's k steps, and FSDP's collective-matmul loops (`hlo_loops`).
      collective_matmul_loops: how many such FSDP loops were counted per trip.
      compile_seconds: wall time of lowering + compiling on this host.
      error: the compiler's message when it refused the program (e.g. out of memory).
      over_gib: GiB above the chip's HBM that the compiler reported, when it refused for memory
        (a lower bound: it stops at the first kind of memory that does not fit).
      over_what: that kind ('temporaries', 'arguments', ...) when the compiler named it.
    """

    name: str
    description: str
    batch: int
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    flops: float = 0.0
    compile_seconds: float = 0.0
    error: str = ""
    over_gib: float = 0.0
    over_what: str = ""
    collective_matmul_loops: int = 0

    @property
    def total_bytes(self) -> int:
        """Peak HBM per chip: arguments + outputs not aliased + temporaries + code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )


# e.g. "the total memory required for HLO temporaries (927.09G) exceeds available HBM (15.75G)"
_HBM_EXCEEDED = re.compile(
    r"(?:required for (?P<what>[\w ]+?) )?\(?(?P<need>[\d.]+)(?P<need_unit>[GMK])?\)? exceeds "
    r"available HBM \(?(?P<have>[\d.]+)(?P<have_unit>[GMK])?\)?"
)


def _gib(value: str, unit: str | None) -> float:
    return float(value) * {"G": 1.0, "M": 1 / 1024, "K": 1 / 1024**2, None: 1 / GiB}[unit]


def _analyse(report: ProgramReport, lower: Callable[[], Any], loop_flops: Callable[[Any], float]):
    """Lowers and compiles, filling `report` from the compiled program (or the refusal)."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as error:  # noqa: BLE001 - XLA raises XlaRuntimeError subclasses
        message = " ".join(str(error).split())
        report.error = message[:600]
        match = _HBM_EXCEEDED.search(message)
        if match:
            needed = _gib(match.group("need"), match.group("need_unit"))
            report.over_gib = needed - _gib(match.group("have"), match.group("have_unit"))
            report.over_what = (match.group("what") or "").replace("HLO ", "")
        report.compile_seconds = time.perf_counter() - start
        if not ("RESOURCE_EXHAUSTED" in message or match):
            raise AotRuntimeError(
                f"program {report.name!r}: the compiler failed (not for memory): {message[:600]}"
            ) from None
        return
    report.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    report.argument_bytes = int(memory.argument_size_in_bytes)
    report.output_bytes = int(memory.output_size_in_bytes)
    report.alias_bytes = int(memory.alias_size_in_bytes)
    report.temp_bytes = int(memory.temp_size_in_bytes)
    report.code_bytes = int(memory.generated_code_size_in_bytes)
    from shortcut_jax import gpu_compile, hlo_loops

    cost = gpu_compile.cost_analysis(compiled)  # cost_analysis(), or XLA's count on GPUs
    # FSDP's collective matmuls are loops whose bodies cost_analysis() counts once.
    flops, loops = hlo_loops.loop_corrected_flops(compiled, cost)
    report.collective_matmul_loops = sum(1 for loop in loops if loop["trip"])
    report.flops = flops + loop_flops(cost)


def _with_latents(config: ml_collections.ConfigDict, precomputed: bool) -> Any:
    """A copy of `config` training on precomputed latents, or encoding images in the step."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.latent_dir = "(precomputed latents)" if precomputed else ""
    return config


def abstract_vae(config: ml_collections.ConfigDict) -> Any:
    """The run's VAE with abstract parameters: the architecture of config.vae.path if that file
    is here, else the Stable Diffusion VAE's (with config.vae's channels)."""
    from shortcut_jax.models import vae as vae_lib

    path = str(config.vae.path)
    if path and os.path.isfile(path):
        arch = vae_lib.load_vae(path, scaling_factor=float(config.vae.scaling_factor)).arch
    else:
        if int(config.vae.downsample_factor) != vae_lib.SD_ARCH.downsample_factor:
            raise AotError(
                f"config.vae.path = {path!r} is not here, and without it only the Stable Diffusion "
                f"VAE's architecture (downsample factor 8) is known; config.vae.downsample_factor "
                f"= {config.vae.downsample_factor}: give the weights file"
            )
        arch = dataclasses.replace(
            vae_lib.SD_ARCH,
            in_channels=int(config.data.channels),
            out_channels=int(config.data.channels),
            latent_channels=int(config.vae.latent_channels),
        )
    flat = {
        path: jax.ShapeDtypeStruct(shape, jnp.float32)
        for path, shape in vae_lib.param_shapes(arch).items()
    }
    params = traverse_util.unflatten_dict(flat, sep="/")
    return vae_lib.Vae(
        arch,
        params,
        float(config.vae.scaling_factor),
        "abstract",
        "(abstract parameters for compilation)",
        str(config.vae.get("dtype", "float32")),
    )


def _replicated_abstract(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), tree
    )


def _batch_abstract(mesh: jax.sharding.Mesh, shape: tuple[int, ...], dtype: Any) -> Any:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))


@dataclasses.dataclass
class _Run:
    """What every program of one config on one mesh shares."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: Any
    optimizer: Any
    abstract_state: Any
    state_sharding: Any

    @functools.cached_property
    def vae(self) -> Any:
        return abstract_vae(self.config) if latent_space.uses_vae(self.config) else None


def _train(run: _Run, online: bool) -> tuple[int, Callable[[], Any]]:
    config = _with_latents(run.config, precomputed=not online)
    step = compiled_step.build(
        config,
        run.mesh,
        run.model,
        run.optimizer,
        run.state_sharding,
        vae=run.vae if online else None,
    )
    batch_size = int(config.batch_size)
    shape = latent_space.pixel_shape(config) if online else latent_space.model_shape(config)
    if config.model.name != "dit":
        shape = models.example_inputs(config, 1)[0].shape[1:]
    batch = {
        "image": _batch_abstract(run.mesh, (batch_size, *shape), jnp.float32),
        "label": _batch_abstract(run.mesh, (batch_size,), jnp.int32),
    }
    return batch_size, lambda: step.lower(run.abstract_state, batch)


def _sample_settings(config: ml_collections.ConfigDict, num_steps: int) -> dict[str, Any]:
    return {
        "num_steps": int(num_steps),
        "denoise_timesteps": int(config.denoise_timesteps),
        "cfg_scale": float(latent_space.guidance_scale(config, num_steps)),
        "num_classes": int(config.data.num_classes),
        "objective": objectives.ObjectiveConfig.from_config(config),
    }


def _eval_chunk(run: _Run) -> int:
    return sharding.round_up_to_shards(int(run.config.eval_batch_size), run.mesh)


def _sample(run: _Run, num_steps: int) -> tuple[int, Callable[[], Any]]:
    params = run.abstract_state.ema_params
    program = sampling.mesh_sampler(
        steps.make_apply_fn(run.model),
        params,
        run.mesh,
        sharding_rules=sharding.logical_rules(run.config),
        **_sample_settings(run.config, num_steps),
    )
    chunk = _eval_chunk(run)
    shape = tuple(models.example_inputs(run.config, 1)[0].shape[1:])
    noise = _batch_abstract(run.mesh, (chunk, *shape), jnp.float32)
    labels = _batch_abstract(run.mesh, (chunk,), jnp.int32)
    return chunk, lambda: program.lower(params, noise, labels)


def _decode(run: _Run) -> tuple[int, Callable[[], Any]]:
    if run.vae is None:
        raise AotError("program 'decode' needs a VAE (config.vae.path): this run works on pixels")
    pixels = latent_space.pixel_fn(run.vae)
    replicated, batch = sharding.replicated(run.mesh), sharding.batch_sharding(run.mesh)
    program = jax.jit(pixels, in_shardings=(replicated, batch), out_shardings=batch)
    chunk = _eval_chunk(run)
    latents = _batch_abstract(run.mesh, (chunk, *latent_space.model_shape(run.config)), jnp.float32)
    vae_params = _replicated_abstract(run.vae.decoder_params, run.mesh)
    return chunk, lambda: program.lower(vae_params, latents)


def _inception(run: _Run) -> Any:
    from shortcut_jax.evaluators import features, inception

    flat = {
        path: jax.ShapeDtypeStruct(shape, jnp.float32)
        for path, shape in inception.param_shapes().items()
    }
    return features.FeatureNet(
        name=inception.NAME,
        dim=inception.FEATURE_DIM,
        params=traverse_util.unflatten_dict(flat, sep="/"),
        apply=inception.inception_features,
        batch_size=32,
    )


def _features(run: _Run) -> tuple[int, Callable[[], Any]]:
    from shortcut_jax.evaluators import features

    net = _inception(run)
    replicated, batch = sharding.replicated(run.mesh), sharding.batch_sharding(run.mesh)
    program = jax.jit(
        lambda params, images: net.apply(params, features.quantize(images)),
        in_shardings=(replicated, batch),
        out_shardings=batch,
    )
    chunk = sharding.round_up_to_shards(net.batch_size * sharding.batch_shards(run.mesh), run.mesh)
    images = _batch_abstract(run.mesh, (chunk, *latent_space.pixel_shape(run.config)), jnp.float32)
    return chunk, lambda: program.lower(_replicated_abstract(net.params, run.mesh), images)


def _evaluate(run: _Run, num_steps: int) -> tuple[int, Callable[[], Any]]:
    from shortcut_jax.evaluators import on_device

    net = _inception(run)
    chunk = _eval_chunk(run)
    pixels = latent_space.pixel_fn(run.vae)
    pixel_params = (
        None if run.vae is None else _replicated_abstract(run.vae.decoder_params, run.mesh)
    )
    params = run.abstract_state.ema_params
    program = on_device.chunk_program(
        steps.make_apply_fn(run.model),
        params,
        (net,),
        sampler_settings=_sample_settings(run.config, num_steps),
        shape=tuple(models.example_inputs(run.config, 1)[0].shape[1:]),
        chunk=chunk,
        pixels=pixels,
        mesh=run.mesh,
        sharding_rules=sharding.logical_rules(run.config),
        decode_batch_size=int(run.config.vae.get("decode_batch_size", 0)),
    )
    scalar = functools.partial(jax.ShapeDtypeStruct, sharding=sharding.replicated(run.mesh))
    args = (
        params,
        pixel_params,
        (_replicated_abstract(net.params, run.mesh),),
        scalar((2,), jnp.uint32),
        scalar((), jnp.int32),
        scalar((), jnp.int32),
    )
    return chunk, lambda: program.lower(*args)


def default_programs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The programs a run of `config` has: both train steps for latent runs, the sampler, the VAE
    decoder. 'features' and 'evaluate' (Inception) only when asked: their TPU compile takes
    many minutes on a small host."""
    names = ["train_latents", "train_online"] if latent_space.uses_vae(config) else ["train"]
    names.append("sample")
    if latent_space.uses_vae(config):
        names.append("decode")
    return tuple(names)


@dataclasses.dataclass
class Report:
    """Every compiled program of one config on one slice."""

    config: ml_collections.ConfigDict
    slice: Slice
    mesh_shape: dict[str, int]
    num_params: int
    programs: list[ProgramReport]
    sample_steps: int


def build_run(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> _Run:
    """Model, optimizer and abstract sharded state of `config` on a mesh over `devices`."""
    if objectives.get(config.objective).needs_teacher_run:
        raise AotError(
            f"config.objective = {config.objective!r} trains from a teacher run, whose parameters "
            "compile cannot describe without its checkpoint; compile its teacher's config instead"
        )
    mesh = sharding.make_mesh(config, devices)
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    abstract_state, state_sharding = state_lib.sharded_abstract_state(
        config, model, optimizer, mesh
    )
    return _Run(config, mesh, model, optimizer, abstract_state, state_sharding)


def compile_programs(
    config: ml_collections.ConfigDict,
    tpu: Slice,
    programs: Sequence[str] | None = None,
    sample_steps: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Compiles the named programs of `config` for `tpu` and reports what each chip needs.

    Args:
      config: a validated run config (its mesh is laid over the slice's devices).
      tpu: from `resolve_slice`.
      programs: names from `PROGRAMS`; None = `default_programs(config)`.
      sample_steps: k of the sampler and the evaluation.
      progress: called with each program's name before it compiles.

    Raises:
      AotError: an unknown program, or one the config does not have.
      sharding.ShardingError: the mesh does not fit the slice or the parameters.
    """
    names = list(default_programs(config) if programs is None else programs)
    unknown = [name for name in names if name not in PROGRAMS]
    if unknown:
        raise AotError(f"unknown program(s) {unknown}: choose from {', '.join(PROGRAMS)}")
    if not latent_space.uses_vae(config):
        latent_only = [n for n in names if n in ("train_latents", "train_online", "decode")]
        if latent_only:
            raise AotError(
                f"program(s) {latent_only} need a latent-space run (config.vae.path); "
                "this run works on pixels: use 'train'"
            )
    run = build_run(config, tpu.devices)
    step_flops: dict[str, float] = {}
    reports = []
    for name in names:
        if progress is not None:
            progress(name)
        loop_flops: Callable[[Any], float] = lambda cost: 0.0  # noqa: E731
        if name == "train":
            batch, lower = _train(run, online=latent_space.is_online(config))
        elif name in ("train_latents", "train_online"):
            batch, lower = _train(run, online=name == "train_online")
        elif name == "sample":
            batch, lower = _sample(run, sample_steps)

            def loop_flops(cost: Any) -> float:  # XLA counts a while loop's body once
                step_flops["sample"] = float(cost.get("flops", 0.0))
                return (sample_steps - 1) * step_flops["sample"]
        elif name == "decode":
            batch, lower = _decode(run)
        elif name == "features":
            batch, lower = _features(run)
        else:
            batch, lower = _evaluate(run, sample_steps)
            if sample_steps > 1 and "sample" in step_flops:
                loop_flops = lambda cost: (sample_steps - 1) * step_flops["sample"]  # noqa: E731
        report = ProgramReport(name, _DESCRIPTIONS[name], batch)
        _analyse(report, lower, loop_flops)
        reports.append(report)
    num_params = models.count_params(run.abstract_state.params)
    return Report(config, tpu, dict(run.mesh.shape), num_params, reports, int(sample_steps))
