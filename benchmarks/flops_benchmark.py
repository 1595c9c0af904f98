"""Benchmark: achieved FLOP/s of the train step against this machine's float32 matmul rate.

    python benchmarks/flops_benchmark.py            # everything -> benchmarks/results/flops.json
    python benchmarks/flops_benchmark.py --quick    # tiny models, 2 steps, small matmul (smoke)

In one process it measures (a) to (d):
  (a) the machine's float32 matmul rate: a jitted 2048 x 2048 @ 2048 x 2048 `jnp.dot`
      (2 n^3 FLOPs a call), best and median over many calls; plus the rate of loops of the matmul
      shapes the MNIST and DiT-B/2 steps actually run (no per-call dispatch);
  (b) for the MNIST default (experiments/mnist.py, batch 32) and a DiT-B/2 step at a small batch
      (experiments/imagenet256.py, float32 on CPU, 32x32x4 random latents, 1000 classes), the
      FLOPs of the compiled train step (`compiled.cost_analysis()['flops']`), compile time, the
      median step time with the donated state threaded through, and achieved FLOP/s as a fraction
      of (a);
  (c) where the MNIST step time goes: forward only, targets (teacher passes), loss forward +
      backward, optimizer + EMA, full step; the matmul / convolution share of the FLOPs (from the
      HLO) and a `jax.profiler` trace of the step summarised per compiled HLO op;
  (d) parameter count and FLOPs per train step and per image of the DiT-B/2 and DiT-XL/2 ImageNet
      configs at batch 256, from the cost analysis of the lowered and of the compiled program on
      abstract arguments (nothing runs), checked against an analytic matmul count;
and in fresh processes
  (e) the MNIST and DiT-B/2 steps under glibc malloc settings (default, mallopt that keeps freed
      memory, transparent huge pages), interleaved: XLA:CPU allocates each step's temporaries
      afresh, and with the default settings the kernel maps and zeroes them again at every step
      (see shortcut_jax/allocator.py, which the product applies on import).
Per step it also records minor page faults and user / system CPU seconds (getrusage).
Random arrays stand in for data: {'image': (B, H, W, C) float32 in [-1, 1], 'label': (B,) int32}.
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# `import shortcut_jax` tunes glibc malloc (shortcut_jax/allocator.py); a worker started with
# MALLOC_TUNING_ENV=0 in its environment runs with glibc's defaults instead.
MALLOC_TUNING_ENV = "SHORTCUT_JAX_MALLOC_TUNING"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from shortcut_jax import models, objectives, optim, sharding, steps  # noqa: E402
from shortcut_jax.state import init_state, sharded_abstract_state  # noqa: E402

TARGET_FRACTIONS = {"mnist": 0.40, "dit_b2_small_batch": 0.60}


# ------------------------------------------------------------------------------------ configs


def load_experiment(name: str) -> ml_collections.ConfigDict:
    """`get_config()` of experiments/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / f"experiments/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def shrink_model(config: ml_collections.ConfigDict, patch_size: int) -> ml_collections.ConfigDict:
    """The same config with a tiny DiT (width 32, depth 1, 2 heads): for --quick smoke runs."""
    config.model.preset = ""
    config.model.hidden_size = 32
    config.model.depth = 1
    config.model.num_heads = 2
    config.model.patch_size = patch_size
    return config


def mnist_config(quick: bool = False) -> ml_collections.ConfigDict:
    """experiments/mnist.py as is (batch 32); with `quick` a tiny DiT at batch 16."""
    config = load_experiment("mnist")
    if quick:
        shrink_model(config, patch_size=7)
        config.batch_size = 16
    return config


def imagenet_config(
    preset: str, batch_size: int, dtype: str | None = None, quick: bool = False
) -> ml_collections.ConfigDict:
    """experiments/imagenet256.py with a DiT preset, a batch size and optionally a compute dtype."""
    config = load_experiment("imagenet256")
    # The denoiser's step on random 32x32x4 latents: what the train step sees after the VAE.
    config.vae.path = ""
    config.data.image_size = 32
    config.data.channels = 4
    config.model.preset = preset
    config.batch_size = batch_size
    if dtype:
        config.model.dtype = dtype
    if quick:
        shrink_model(config, patch_size=8)
    return config


def single_device_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over the first device only."""
    mesh_config = ml_collections.ConfigDict(config.to_dict())
    mesh_config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    return sharding.make_mesh(mesh_config, jax.devices()[:1])


def random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
    """{'image': (B, H, W, C) float32 uniform in [-1, 1], 'label': (B,) int32} as numpy."""
    rng = np.random.default_rng(seed)
    size, channels = config.data.image_size, config.data.channels
    num_classes = max(int(config.data.num_classes), 1)
    return {
        "image": rng.uniform(-1, 1, (batch_size, size, size, channels)).astype(np.float32),
        "label": rng.integers(0, num_classes, (batch_size,)).astype(np.int32),
    }


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
    """ShapeDtypeStructs of a global batch sharded over the batch axes of `mesh`."""
    size, channels, batch = config.data.image_size, config.data.channels, config.batch_size
    batch_sharding = sharding.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct(
            (batch, size, size, channels), jnp.float32, sharding=batch_sharding
        ),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding),
    }


# ------------------------------------------------------------------------------------ helpers


def run_meta(quick: bool) -> dict[str, Any]:
    """What every benchmark result records about its run: date, machine, jax, devices, load."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "quick": quick,
        "load_average_1_5_15_min_at_start": list(os.getloadavg()),
    }


def cost(compiled_or_lowered: Any) -> dict[str, float]:
    """flops, transcendentals and bytes accessed of a compiled or lowered program (one device)."""
    analysis = compiled_or_lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "flops": float(analysis.get("flops", 0.0)),
        "transcendentals": float(analysis.get("transcendentals", 0.0)),
        "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
    }


def memory(compiled: Any) -> dict[str, int]:
    """Argument, output, alias, temp and generated-code bytes of one device's program."""
    analysis = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    if analysis is None:
        return {}
    return {
        f"{field}_bytes": int(getattr(analysis, f"{field}_size_in_bytes", 0)) for field in fields
    }


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `reps` calls of fn() (each waited for), after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def summarize_times(times: list[float]) -> dict[str, float]:
    """Median, best and count of a list of durations in seconds."""
    return {
        "median_seconds": statistics.median(times),
        "best_seconds": min(times),
        "num_timed": len(times),
    }


def analytic_dit_forward_flops(
    image_size: int,
    channels: int,
    hidden: int,
    depth: int,
    patch: int,
    mlp_ratio: float = 4.0,
    frequency_size: int = 256,
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward pass of one image.

    Counts the patch embedding, the t and d embedders, per block the adaLN Dense, q/k/v, the two
    attention matmuls, the output projection and the MLP, and the final layer. Elementwise work
    (LayerNorm, GELU, softmax, modulation) is not included.
    """
    tokens = (image_size // patch) ** 2
    pixels = patch * patch * channels
    mlp = int(hidden * mlp_ratio)
    embedders = 2 * 2 * (frequency_size * hidden + hidden * hidden)
    per_block = (
        2 * hidden * 6 * hidden  # ada_ln on the conditioning vector
        + 2 * tokens * hidden * 3 * hidden  # qkv
        + 2 * 2 * tokens * tokens * hidden  # logits and weights @ v over all heads
        + 2 * tokens * hidden * hidden  # out projection
        + 2 * 2 * tokens * hidden * mlp  # fc1 and fc2
    )
    final = 2 * hidden * 2 * hidden + 2 * tokens * hidden * pixels
    return 2 * tokens * pixels * hidden + embedders + depth * per_block + final


def analytic_step_flops(config: ml_collections.ConfigDict, forward_flops: int) -> dict[str, Any]:
    """Matmul FLOPs of one shortcut train step from the per-image forward FLOPs.

    The student runs forward + backward (~3 forwards) on the whole batch; the teacher runs two
    forward half steps on the bootstrap part, each on twice the examples with CFG in the targets.
    """
    batch = int(config.batch_size)
    num_bootstrap = batch // int(config.bootstrap_every) if config.objective == "shortcut" else 0
    guided = 2 if (config.bootstrap_cfg and config.data.num_classes > 0) else 1
    teacher_forwards = 2 * guided * num_bootstrap
    return {
        "forward_flops_per_image": forward_flops,
        "teacher_forwards_per_step": teacher_forwards,
        "matmul_flops_per_step": 3 * batch * forward_flops + teacher_forwards * forward_flops,
    }


def dit_dims(config: ml_collections.ConfigDict) -> dict[str, int]:
    """hidden_size, depth, num_heads, patch_size of the config's DiT (preset resolved)."""
    if config.model.preset:
        hidden, depth, heads, patch = models.dit_preset(config.model.preset)
    else:
        hidden, depth, heads = config.model.hidden_size, config.model.depth, config.model.num_heads
        patch = config.model.patch_size
    return {"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": patch}


def analytic_forward(config: ml_collections.ConfigDict) -> int:
    """`analytic_dit_forward_flops` of the config's DiT."""
    dims = dit_dims(config)
    return analytic_dit_forward_flops(
        config.data.image_size,
        config.data.channels,
        dims["hidden_size"],
        dims["depth"],
        dims["patch_size"],
        float(config.model.mlp_ratio),
    )


# ----------------------------------------------------------------------------- HLO parsing

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*"
    r"(?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>[\w\-]+)\((?P<args>.*?)\)(?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_DIMS = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")


def _dims(shape: str) -> list[int] | None:
    match = _DIMS.match(shape)
    if not match:
        return None
    return [int(d) for d in match.group(1).split(",") if d]


def _operand_names(args: str) -> list[str]:
    """Operand names of an instruction's argument list ('%a, %b' or 'f32[2]{0} a, b')."""
    args = re.sub(r"/\*.*?\*/", "", args)
    names = []
    for part in re.split(r",\s*(?![^\[{]*[\]}])", args):
        tokens = part.strip().split()
        if tokens:
            names.append(tokens[-1].lstrip("%"))
    return names


def parse_hlo(text: str) -> dict[str, Any]:
    """Instructions of an HLO module's text.

    Returns:
      {'computations': {name: [instruction dicts]}, 'entry': name, 'shapes': {name: dims}} where
      an instruction dict has name, op, dims (None for tuples), operands, rest (attributes).
    """
    computations: dict[str, list[dict]] = {}
    shapes: dict[str, list[int] | None] = {}
    entry, current = "", None
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            dims = _dims(match.group("shape"))
            instruction = {
                "name": match.group("name"),
                "op": match.group("op"),
                "dims": dims,
                "operands": _operand_names(match.group("args")),
                "rest": match.group("rest"),
            }
            shapes[instruction["name"]] = dims
            computations[current].append(instruction)
            continue
        header = _COMPUTATION.match(line)
        if header and not match:
            current = header.group("name")
            computations[current] = []
            if header.group("entry"):
                entry = current
    return {"computations": computations, "entry": entry, "shapes": shapes}


def instruction_flops(instruction: dict, shapes: dict[str, list[int] | None]) -> int:
    """2 x multiply-adds of a dot or convolution instruction; 0 for anything else."""
    out = instruction["dims"]
    if out is None or instruction["op"] not in ("dot", "convolution"):
        return 0
    operands = [shapes.get(name) for name in instruction["operands"]]
    if instruction["op"] == "dot":
        lhs = operands[0] if operands else None
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction["rest"])
        if lhs is None or contracting is None:
            return 0
        size = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
        return 2 * math.prod(out) * size
    kernel = operands[1] if len(operands) > 1 else None
    labels = re.search(r"dim_labels=\w+_(\w+)->\w+", instruction["rest"])
    if kernel is None or labels is None:
        return 0
    out_features = kernel[labels.group(1).index("o")]
    return 2 * math.prod(out) * math.prod(kernel) // max(out_features, 1)


def matmul_flops(hlo_text: str) -> dict[str, int]:
    """FLOPs of every dot and convolution in an HLO module (fused computations included)."""
    module = parse_hlo(hlo_text)
    totals = {"dot": 0, "convolution": 0}
    for instructions in module["computations"].values():
        for instruction in instructions:
            if instruction["op"] in totals:
                totals[instruction["op"]] += instruction_flops(instruction, module["shapes"])
    return totals


def classify_entry_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
    """For each instruction of the entry computation: category, FLOPs of its dots, fused ops.

    Categories: 'matmul' (a dot or convolution, or a fusion containing one), 'elementwise/reduce'
    (other fusions and arithmetic), 'data movement' (copy, transpose, slices, concatenates, ...),
    'other'.
    """
    module = parse_hlo(hlo_text)
    computations, shapes = module["computations"], module["shapes"]

    def called(instruction: dict) -> list[dict]:
        match = re.search(r"calls=%?([\w.\-]+)", instruction["rest"])
        if not match or match.group(1) not in computations:
            return []
        inner = computations[match.group(1)]
        nested = [op for sub in inner for op in called(sub)]
        return inner + nested

    movement = {
        "copy",
        "transpose",
        "slice",
        "dynamic-slice",
        "dynamic-update-slice",
        "concatenate",
        "pad",
        "broadcast",
        "reshape",
        "bitcast",
        "gather",
        "scatter",
        "copy-start",
        "copy-done",
    }
    result = {}
    for instruction in computations.get(module["entry"], []):
        inner = called(instruction) if instruction["op"] in ("fusion", "call") else []
        ops = [instruction] + inner
        flops = sum(instruction_flops(op, shapes) for op in ops)
        kinds = {op["op"] for op in ops}
        if kinds & {"dot", "convolution"}:
            category = "matmul"
        elif instruction["op"] in movement:
            category = "data movement"
        elif instruction["op"] in ("parameter", "constant", "tuple", "get-tuple-element"):
            category = "other"
        else:
            category = "elementwise/reduce"
        fused = sorted(kinds - {"parameter", "constant", "fusion"})
        result[instruction["name"]] = {
            "category": category,
            "op": instruction["op"],
            "matmul_flops": flops,
            "fused_ops": fused[:12],
        }
    return result


# ------------------------------------------------------------------------------------ (a)


def matmul_rate(n: int, reps: int) -> dict[str, Any]:
    """float32 n x n @ n x n with jnp.dot: seconds per call and GFLOP/s (2 n^3 per call)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    times = time_calls(lambda: dot(a, b), reps, warmup=3)
    flops = 2 * n**3
    compiled_flops = cost(dot.lower(a, b).compile())["flops"]
    return {
        "n": n,
        "dtype": "float32",
        "flops_per_call": flops,
        "cost_analysis_flops": compiled_flops,
        **summarize_times(times),
        "gflops_best": flops / min(times) / 1e9,
        "gflops_median": flops / statistics.median(times) / 1e9,
    }


def shape_rate(
    name: str, x_shape: tuple, w1_shape: tuple, w2_shape: tuple, iterations: int, reps: int
) -> dict[str, Any]:
    """GFLOP/s of `iterations` chained (x @ w1) @ w2 products inside one jitted loop.

    x: (..., M, K), w1: (..., K, N), w2: (..., N, K); each iteration updates x += 1e-6 (x w1) w2
    so the loop cannot be hoisted. Per-call dispatch is amortised over the iterations.
    """
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(keys[0], x_shape, jnp.float32)
    w1 = jax.random.normal(keys[1], w1_shape, jnp.float32)
    w2 = jax.random.normal(keys[2], w2_shape, jnp.float32)

    @jax.jit
    def loop(x, w1, w2):
        def body(_, x):
            return x + 1e-6 * jnp.matmul(jnp.matmul(x, w1), w2)

        return jax.lax.fori_loop(0, iterations, body, x)

    times = time_calls(lambda: loop(x, w1, w2), reps, warmup=2)
    batch = math.prod(x_shape[:-2])
    m, k = x_shape[-2:]
    n = w1_shape[-1]
    flops = iterations * 2 * (2 * batch * m * k * n)
    return {
        "name": name,
        "x": list(x_shape),
        "w1": list(w1_shape),
        "w2": list(w2_shape),
        "flops_per_call": flops,
        **summarize_times(times),
        "gflops_median": flops / statistics.median(times) / 1e9,
    }


def matmul_shape_rates(config: ml_collections.ConfigDict, quick: bool) -> list[dict[str, Any]]:
    """Rates of the matmul shapes of a step of `config` (MLP, q/k/v + out, attention)."""
    dims = dit_dims(config)
    hidden, heads = dims["hidden_size"], dims["num_heads"]
    tokens = (config.data.image_size // dims["patch_size"]) ** 2
    rows = config.batch_size * tokens
    mlp = int(hidden * config.model.mlp_ratio)
    head_dim = hidden // heads
    iterations, reps = (2, 2) if quick else (20, 15)
    prefix = f"B={config.batch_size} x {tokens} tokens, width {hidden}"
    return [
        shape_rate(
            f"MLP fc1+fc2 ({prefix})",
            (rows, hidden),
            (hidden, mlp),
            (mlp, hidden),
            iterations,
            reps,
        ),
        shape_rate(
            f"qkv-sized + back ({prefix})",
            (rows, hidden),
            (hidden, 3 * hidden),
            (3 * hidden, hidden),
            iterations,
            reps,
        ),
        shape_rate(
            f"attention q k^T, p v per head ({prefix}, {heads} heads)",
            (config.batch_size * heads, tokens, head_dim),
            (config.batch_size * heads, head_dim, tokens),
            (config.batch_size * heads, tokens, head_dim),
            iterations,
            reps,
        ),
    ]


# ------------------------------------------------------------------------------------ (b)


def lower_and_compile(step: Any, *args: Any) -> tuple[Any, Any, float, float]:
    """Lowers and compiles a jitted function for `args`; returns (lowered, compiled, s, s)."""
    start = time.perf_counter()
    lowered = step.lower(*args)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return lowered, compiled, lower_seconds, time.perf_counter() - start


def build_state_and_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """Initial train state on `mesh` and the jitted, donating train step of `config`.

    Returns:
      (state, jitted_step, model, optimizer, state_sharding).
    """
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    _, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    state = jax.jit(
        functools.partial(init_state, config, model, optimizer), out_shardings=state_sharding
    )()
    step = jax.jit(
        steps.make_train_step(config, model, optimizer),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return state, step, model, optimizer, state_sharding


def run_steps(compiled: Any, state: Any, batch: dict, num_steps: int, warmup: int):
    """Runs `warmup` then `num_steps` timed steps, threading the donated state through.

    Returns:
      (final state, list of step seconds, last metrics).
    """
    metrics = None
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return state, times, metrics


def run_steps_with_usage(compiled: Any, state: Any, batch: dict, num_steps: int, warmup: int):
    """`run_steps` plus this process's page faults and user / system CPU seconds per timed step.

    Returns:
      (final state, step seconds, last metrics, {'minor_page_faults', 'user_cpu_seconds',
      'system_cpu_seconds'} per step).
    """
    import resource

    state, _, _ = run_steps(compiled, state, batch, 0, warmup)
    before = resource.getrusage(resource.RUSAGE_SELF)
    state, times, metrics = run_steps(compiled, state, batch, num_steps, 0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage = {
        "minor_page_faults": (after.ru_minflt - before.ru_minflt) / num_steps,
        "user_cpu_seconds": (after.ru_utime - before.ru_utime) / num_steps,
        "system_cpu_seconds": (after.ru_stime - before.ru_stime) / num_steps,
    }
    return state, times, metrics, usage


def benchmark_step(
    name: str,
    config: ml_collections.ConfigDict,
    num_steps: int,
    warmup: int,
    matmul_gflops: float,
    keep: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """FLOPs, compile time, median step time and fraction of the matmul rate of one config.

    Returns:
      (JSON-able results, dict of the live objects when `keep` for the profile section).
    """
    mesh = single_device_mesh(config)
    state, step, model, optimizer, _ = build_state_and_step(config, mesh)
    batch = sharding.global_batch(mesh, random_batch(config, config.batch_size))
    lowered, compiled, lowered_seconds, compile_seconds = lower_and_compile(step, state, batch)
    step_cost = cost(compiled)
    lowered_text = lowered.as_text(dialect="hlo")
    split = matmul_flops(lowered_text)
    state, times, metrics, usage = run_steps_with_usage(compiled, state, batch, num_steps, warmup)
    loss = float(np.asarray(metrics["loss"][0]) / max(float(np.asarray(metrics["loss"][1])), 1.0))
    median = statistics.median(times)
    achieved = step_cost["flops"] / median / 1e9
    forward = analytic_forward(config)
    result = {
        "name": name,
        "config": {
            "objective": config.objective,
            "batch_size": int(config.batch_size),
            "image": [config.data.image_size, config.data.image_size, config.data.channels],
            "num_classes": int(config.data.num_classes),
            "model": {
                **dit_dims(config),
                "preset": config.model.preset,
                "dtype": config.model.dtype,
            },
            "bootstrap_every": int(config.bootstrap_every),
            "bootstrap_teacher": config.bootstrap_teacher,
            "bootstrap_cfg": bool(config.bootstrap_cfg),
        },
        "num_params": models.count_params(state.params),
        "trace_and_lower_seconds": lowered_seconds,
        "compile_seconds": compile_seconds,
        "cost_analysis": step_cost,
        "matmul_flops_in_lowered_hlo": split["dot"] + split["convolution"],
        "matmul_share_of_flops": (split["dot"] + split["convolution"]) / max(step_cost["flops"], 1),
        "analytic": analytic_step_flops(config, forward),
        "memory": memory(compiled),
        "step_seconds": summarize_times(times),
        "step_seconds_all": times,
        "per_step_os": usage,
        "images_per_second": config.batch_size / median,
        "achieved_gflops": achieved,
        "achieved_gflops_best_step": step_cost["flops"] / min(times) / 1e9,
        "fraction_of_matmul_rate": achieved / matmul_gflops,
        "final_loss": loss,
    }
    live = {}
    if keep:
        live = dict(
            config=config,
            mesh=mesh,
            state=state,
            batch=batch,
            compiled=compiled,
            model=model,
            optimizer=optimizer,
        )
    return result, live


# ------------------------------------------------------------------------------------ (c)


def time_jitted(fn: Callable, args: tuple, reps: int) -> dict[str, Any]:
    """Compile `fn` on `args`, then its FLOPs, median seconds and GFLOP/s over `reps` calls."""
    compiled = jax.jit(fn).lower(*args).compile()
    flops = cost(compiled)["flops"]
    times = time_calls(lambda: compiled(*args), reps, warmup=3)
    median = statistics.median(times)
    return {
        "flops": flops,
        "median_seconds": median,
        "best_seconds": min(times),
        "gflops": flops / median / 1e9,
    }


def step_breakdown(live: dict[str, Any], reps: int, full_step_seconds: float) -> dict[str, Any]:
    """Times the parts of the train step of `live['config']` as separate programs.

    Parts: student forward on the whole regression batch, targets (objective.build_targets: noise,
    times and the teacher passes), student loss forward + backward (value_and_grad), optimizer +
    EMA update on given gradients. Shares are relative to the measured full step.
    """
    config, model, optimizer = live["config"], live["model"], live["optimizer"]
    state, batch = live["state"], live["batch"]
    objective = objectives.get(config.objective)
    objective_config = objectives.ObjectiveConfig.from_config(config)
    apply_fn = steps.make_apply_fn(model)
    rng = jax.random.PRNGKey(3)
    del model

    def targets(params, batch):
        return objective.build_targets(apply_fn, params, batch, rng, objective_config)[0]

    regression = jax.jit(targets)(state.params, batch)

    def forward(params, regression):
        x = (regression.x_t, regression.t, regression.d, regression.labels)
        return apply_fn(params, *x)

    def loss_fn(params, regression):
        prediction = forward(params, regression)
        return jnp.mean(jnp.square(prediction - regression.target))

    def forward_backward(params, regression):
        return jax.value_and_grad(loss_fn)(params, regression)

    grads = jax.jit(jax.grad(loss_fn))(state.params, regression)
    ema_rate = float(config.ema_rate)

    def update(params, opt_state, ema, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = optax.incremental_update(params, ema, 1.0 - ema_rate)
        return params, opt_state, ema, optax.global_norm(grads), optax.global_norm(params)

    parts = {
        "forward (student, whole batch)": time_jitted(forward, (state.params, regression), reps),
        "targets (noise, t, teacher passes)": time_jitted(targets, (state.params, batch), reps),
        "loss forward + backward": time_jitted(forward_backward, (state.params, regression), reps),
        "optimizer + EMA + norms": time_jitted(
            update, (state.params, state.opt_state, state.ema_params, grads), reps
        ),
    }
    for part in parts.values():
        part["share_of_full_step"] = part["median_seconds"] / full_step_seconds
    parts_sum = sum(
        parts[name]["median_seconds"]
        for name in (
            "targets (noise, t, teacher passes)",
            "loss forward + backward",
            "optimizer + EMA + norms",
        )
    )
    return {
        "parts": parts,
        "full_step_median_seconds": full_step_seconds,
        "targets + fwd/bwd + optimizer, run separately (seconds)": parts_sum,
        "backward / forward time ratio": (
            parts["loss forward + backward"]["median_seconds"]
            / parts["forward (student, whole batch)"]["median_seconds"]
        ),
    }


def profile_step(live: dict[str, Any], num_steps: int, top: int = 25) -> dict[str, Any]:
    """A jax.profiler trace of `num_steps` train steps, summarised per compiled HLO op.

    The trace's per-op events (CPU thunks, named like the entry instructions of the optimised
    HLO) are summed per op and per category (matmul-bearing ops vs the rest).
    """
    compiled = live["compiled"]
    state, batch = live["state"], live["batch"]
    ops = classify_entry_ops(compiled.as_text())
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(num_steps):
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
            wall = time.perf_counter() - start
        traces = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
        traces = [path for path in traces if "perfetto" not in os.path.basename(path)] or traces
        if not traces:
            return {"error": "the profiler wrote no trace.json.gz"}
        with gzip.open(traces[0], "rt") as file:
            trace = json.load(file)
    live["state"] = state
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event in events:
        name = event.get("name")
        if event.get("ph") == "X" and name in ops:
            per_op[name] = per_op.get(name, 0.0) + float(event.get("dur", 0.0)) * 1e-6
            counts[name] = counts.get(name, 0) + 1
    total = sum(per_op.values())
    if not total:
        return {"error": "no trace event matched an HLO op", "wall_seconds": wall}
    by_category: dict[str, float] = {}
    for name, seconds in per_op.items():
        category = ops[name]["category"]
        by_category[category] = by_category.get(category, 0.0) + seconds
    ranked = sorted(per_op.items(), key=lambda item: -item[1])
    top_ops = []
    for name, seconds in ranked[:top]:
        info = ops[name]
        per_step = seconds / num_steps
        top_ops.append(
            {
                "op": name,
                "category": info["category"],
                "ms_per_step": per_step * 1e3,
                "share_of_op_time": seconds / total,
                "calls_per_step": counts[name] / num_steps,
                "matmul_gflops": info["matmul_flops"] / per_step / 1e9
                if info["matmul_flops"]
                else 0.0,
                "fused_ops": info["fused_ops"],
            }
        )
    matmul_flops_total = sum(info["matmul_flops"] for info in ops.values())
    matmul_seconds = by_category.get("matmul", 0.0) / num_steps
    return {
        "steps_traced": num_steps,
        "wall_seconds_per_step_under_trace": wall / num_steps,
        "op_seconds_per_step": total / num_steps,
        "num_entry_ops": len(ops),
        "num_ops_run_per_step": sum(counts.values()) / num_steps,
        "op_time_share_by_category": {k: v / total for k, v in sorted(by_category.items())},
        "matmul_ops_gflops": (matmul_flops_total / matmul_seconds / 1e9 if matmul_seconds else 0.0),
        "top_ops": top_ops,
    }


# ------------------------------------------------------------------------------------ (d)


def abstract_cost(config: ml_collections.ConfigDict, compile_program: bool) -> dict[str, Any]:
    """Params and FLOPs of one train step of `config` from abstract arguments (nothing runs)."""
    mesh = single_device_mesh(config)
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    abstract_state, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    step = jax.jit(
        steps.make_train_step(config, model, optimizer),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    start = time.perf_counter()
    lowered = step.lower(abstract_state, abstract_batch(config, mesh))
    lower_seconds = time.perf_counter() - start
    batch = int(config.batch_size)
    num_params = models.count_params(abstract_state.params)
    lowered_cost = cost(lowered)
    split = matmul_flops(lowered.as_text(dialect="hlo"))
    forward = analytic_forward(config)
    result = {
        "preset": config.model.preset,
        "model": dit_dims(config),
        "dtype": config.model.dtype,
        "batch_size": batch,
        "num_params": num_params,
        "lower_seconds": lower_seconds,
        "lowered_cost_analysis": lowered_cost,
        "lowered_flops_per_image": lowered_cost["flops"] / batch,
        "matmul_flops_in_lowered_hlo": split["dot"] + split["convolution"],
        "analytic": analytic_step_flops(config, forward),
    }
    if compile_program:
        start = time.perf_counter()
        compiled = lowered.compile()
        result["compile_seconds"] = time.perf_counter() - start
        compiled_cost = cost(compiled)
        result["compiled_cost_analysis"] = compiled_cost
        result["compiled_flops_per_image"] = compiled_cost["flops"] / batch
        result["memory_cpu_program"] = memory(compiled)
        result["flops_source"] = "compiled"
        result["flops_per_step"] = compiled_cost["flops"]
    else:
        result["flops_source"] = "lowered"
        result["flops_per_step"] = lowered_cost["flops"]
    result["flops_per_image"] = result["flops_per_step"] / batch
    result["analytic_matmul_flops_ratio"] = (
        result["flops_per_step"] / result["analytic"]["matmul_flops_per_step"]
    )
    return result


# ------------------------------------------------------------------------------------ (e)

ALLOCATORS: dict[str, dict[str, str]] = {
    "glibc default": {MALLOC_TUNING_ENV: "0"},
    "mallopt: arena_max=1, mmap_max=0, trim_threshold=-1, top_pad=256 MiB (in-process)": {
        MALLOC_TUNING_ENV: "1"
    },
    "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages)": {
        MALLOC_TUNING_ENV: "0",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    },
    "both": {MALLOC_TUNING_ENV: "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}


def allocator_worker(model: str, num_steps: int, quick: bool) -> dict[str, Any]:
    """Median step time, page faults and CPU seconds of one config in this process."""
    config = (
        mnist_config(quick)
        if model == "mnist"
        else imagenet_config("DiT-B/2", 2 if quick else 8, dtype="float32", quick=quick)
    )
    mesh = single_device_mesh(config)
    state, step, *_ = build_state_and_step(config, mesh)
    batch = sharding.global_batch(mesh, random_batch(config, config.batch_size))
    compiled = step.lower(state, batch).compile()
    _, times, _, usage = run_steps_with_usage(
        compiled, state, batch, num_steps, warmup=1 if model != "mnist" else 5
    )
    return {"median_seconds": statistics.median(times), **usage}


def allocator_ab(models_steps: dict[str, int], rounds: int, quick: bool) -> dict[str, Any]:
    """Step time under each allocator setting, each in a fresh process, variants interleaved.

    Returns:
      {model: {variant: {'runs': [...], 'median_seconds', 'speedup_vs_default', ...}}}.
    """
    import subprocess

    results: dict[str, Any] = {}
    variants = list(ALLOCATORS)[:2] if quick else list(ALLOCATORS)
    for model, num_steps in models_steps.items():
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name in variants:
                env = {
                    key: value
                    for key, value in os.environ.items()
                    if key not in (MALLOC_TUNING_ENV, "GLIBC_TUNABLES")
                }
                env.update(ALLOCATORS[name])
                command = [
                    sys.executable,
                    __file__,
                    "--allocator_worker",
                    model,
                    "--allocator_steps",
                    str(num_steps),
                ] + (["--quick"] if quick else [])
                process = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=900, check=False
                )
                if process.returncode != 0:
                    raise RuntimeError(f"allocator worker failed:\n{process.stderr[-3000:]}")
                runs[name].append(json.loads(process.stdout.strip().splitlines()[-1]))
        base = statistics.median(run["median_seconds"] for run in runs[variants[0]])
        results[model] = {}
        for name in variants:
            median = statistics.median(run["median_seconds"] for run in runs[name])
            results[model][name] = {
                "median_seconds": median,
                "speedup_vs_default": base / median,
                "minor_page_faults_per_step": statistics.median(
                    run["minor_page_faults"] for run in runs[name]
                ),
                "system_cpu_seconds_per_step": statistics.median(
                    run["system_cpu_seconds"] for run in runs[name]
                ),
                "runs": runs[name],
            }
    return results


AB_STEP_NAMES = {"mnist": "mnist", "dit": "dit_b2_small_batch"}

# What the measurements above mean (qualitative; the numbers are in the notes that follow).
INTERPRETATION = [
    "Page faults: XLA:CPU allocates the step's temporaries (memory.temp_bytes) at every execution "
    "and frees them at its end. glibc serves blocks over 32 MB with mmap and trims per-thread "
    "heaps, so every step the kernel maps and zeroes that memory again, one minor fault per 4 KiB "
    "page (per_step_os.minor_page_faults, system_cpu_seconds). On the MNIST step this kernel time "
    "is the largest single cost; elementwise ops that write fresh buffers (GELU, bias adds, "
    "LayerNorm) look several times slower in the trace than the same op run alone. Keeping freed "
    "memory (mallopt, or GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=<huge>) or huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) "
    "removes it without touching the model: see allocator_ab.",
    "MNIST beyond the allocator: ~1,300 XLA ops per step, mostly small (49 tokens x width 128, "
    "batch 32); elementwise/reduce ops (LayerNorm, adaLN modulate, GELU-tanh, softmax, residuals "
    "and their VJPs) are ~3% of the FLOPs but about half of the op time; the per-head attention "
    "matmuls (49 x 32 @ 32 x 49) run at a quarter of the matmul rate even without dispatch "
    "(matmul_shapes). Forward + backward of the student is ~90% of the step; the bootstrap "
    "teacher passes (4 examples, 2 sequential forwards) ~5-8% and optimizer + EMA ~3-4%.",
    "Profile caveat: XLA:CPU runs independent ops concurrently on its threads, so per-op trace "
    "durations overlap and include waiting for the other thread; use them for ranking, and the "
    "separately compiled parts (breakdown) for shares of the step.",
    "Tried without gain: attention with heads before tokens (einsum 'bhqd,bhkd->bhqk' after one "
    "transpose of the fused q/k/v; same parameters and loss) ran at the same speed as the "
    "current 'bqhd,bkhd->bhqk' layout on the MNIST step.",
]

# ------------------------------------------------------------------------------------ limits


def findings(results: dict[str, Any]) -> list[str]:
    """Text notes on what limits each step, derived from the measured numbers."""
    notes = []
    matmul = results["matmul"]["gflops_median"]
    for name, target in TARGET_FRACTIONS.items():
        step = results["steps"].get(name)
        if step is None:
            continue
        verdict = "meets" if step["fraction_of_matmul_rate"] >= target else "misses"
        notes.append(
            f"{name}: {step['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * step['fraction_of_matmul_rate']:.1f}% of the {matmul:.0f} GFLOP/s matmul "
            f"rate; {verdict} the {100 * target:.0f}% target. Matmuls are "
            f"{100 * step['matmul_share_of_flops']:.0f}% of its FLOPs."
        )
    for name, rates in results.get("matmul_shapes", {}).items():
        for rate in rates:
            notes.append(
                f"{name} shapes: {rate['name']} runs at {rate['gflops_median']:.1f} GFLOP/s "
                f"({100 * rate['gflops_median'] / matmul:.0f}% of the 2048^3 matmul) in a "
                "dispatch-free loop."
            )
    for name, step in results["steps"].items():
        usage = step.get("per_step_os")
        if usage:
            notes.append(
                f"{name}: {usage['minor_page_faults']:.0f} minor page faults and "
                f"{1e3 * usage['system_cpu_seconds']:.1f} ms of kernel CPU time per step (user "
                f"{1e3 * usage['user_cpu_seconds']:.1f} ms, wall "
                f"{1e3 * step['step_seconds']['median_seconds']:.1f} ms); the program's temp "
                f"buffers are {step['memory'].get('temp_bytes', 0) / 2**20:.0f} MiB."
            )
    for model, variants in results.get("allocator_ab", {}).items():
        step = results["steps"].get(AB_STEP_NAMES[model])
        if step is not None:
            best_name, best = min(variants.items(), key=lambda item: item[1]["median_seconds"])
            fraction = step["cost_analysis"]["flops"] / best["median_seconds"] / 1e9 / matmul
            target = TARGET_FRACTIONS[AB_STEP_NAMES[model]]
            step["with_best_allocator_setting"] = {
                "setting": best_name,
                "median_seconds": best["median_seconds"],
                "achieved_gflops": step["cost_analysis"]["flops"] / best["median_seconds"] / 1e9,
                "fraction_of_matmul_rate": fraction,
                "meets_target": fraction >= target,
            }
            notes.append(
                f"{AB_STEP_NAMES[model]} with '{best_name}': {100 * fraction:.1f}% of the matmul "
                f"rate ({'meets' if fraction >= target else 'misses'} the {100 * target:.0f}% "
                "target)."
            )
        text = "; ".join(
            f"{name}: {1e3 * v['median_seconds']:.1f} ms/step (x{v['speedup_vs_default']:.2f}, "
            f"{v['minor_page_faults_per_step']:.0f} faults/step)"
            for name, v in variants.items()
        )
        notes.append(f"{model} step under allocator settings (fresh processes): {text}.")
    profile = results.get("mnist_profile", {})
    trace = profile.get("trace", {})
    if "op_time_share_by_category" in trace:
        shares = ", ".join(
            f"{category} {100 * share:.0f}%"
            for category, share in trace["op_time_share_by_category"].items()
        )
        notes.append(
            f"MNIST step op time by category (profiler): {shares}; matmul-bearing ops run at "
            f"{trace['matmul_ops_gflops']:.1f} GFLOP/s; {trace['num_ops_run_per_step']:.0f} ops "
            f"per step, op time {1e3 * trace['op_seconds_per_step']:.1f} ms of a "
            f"{1e3 * trace['wall_seconds_per_step_under_trace']:.1f} ms step under trace."
        )
    breakdown = profile.get("breakdown", {}).get("parts", {})
    if breakdown:
        parts = "; ".join(
            f"{name}: {1e3 * part['median_seconds']:.1f} ms, {part['gflops']:.1f} GFLOP/s "
            f"({100 * part['share_of_full_step']:.0f}% of the step)"
            for name, part in breakdown.items()
        )
        notes.append(f"MNIST parts run as separate programs: {parts}.")
    return notes


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 steps (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "flops.json"))
    parser.add_argument("--matmul_n", type=int, default=2048)
    parser.add_argument("--matmul_reps", type=int, default=30)
    parser.add_argument("--mnist_steps", type=int, default=200)
    parser.add_argument("--dit_batch", type=int, default=8)
    parser.add_argument("--dit_steps", type=int, default=5)
    parser.add_argument(
        "--xl_compile",
        choices=("yes", "no"),
        default="yes",
        help="compile the batch-256 DiT-XL/2 program (else the lowered cost analysis is used)",
    )
    parser.add_argument(
        "--sections",
        default="matmul,mnist,dit,profile,imagenet,allocator",
        help="comma-separated subset of matmul,mnist,dit,profile,imagenet,allocator",
    )
    parser.add_argument("--allocator_rounds", type=int, default=2)
    parser.add_argument("--allocator_worker", choices=("mnist", "dit"), help=argparse.SUPPRESS)
    parser.add_argument("--allocator_steps", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allocator_worker:
        if not args.quick:
            jax.config.update("jax_enable_compilation_cache", False)
        worker = allocator_worker(args.allocator_worker, args.allocator_steps, args.quick)
        print(json.dumps(worker), flush=True)
        return worker
    sections = set(args.sections.split(","))
    quick = args.quick
    if not quick:  # compile times are results: never read them from a persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    if quick:
        args.matmul_n, args.matmul_reps = min(args.matmul_n, 256), 3
        args.mnist_steps, args.dit_steps, args.dit_batch = 2, 2, 8

    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            **run_meta(quick),
            "notes": (
                "FLOPs are XLA cost-analysis FLOPs of one device's program (a multiply-add is 2). "
                "Step times are medians after compilation, the donated state threaded through, "
                "random data. Achieved GFLOP/s = step FLOPs / median step time; the fraction is "
                "relative to the median 2048^3 float32 matmul rate measured in the same process. "
                "The machine drifts by +-20% over minutes: compare ratios within one run."
            ),
        },
        "targets": {name: {"fraction_of_matmul_rate": f} for name, f in TARGET_FRACTIONS.items()},
        "steps": {},
    }

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    results["matmul"] = matmul_rate(args.matmul_n, args.matmul_reps)
    matmul = results["matmul"]["gflops_median"]
    say(
        f"(a) matmul {args.matmul_n}^3 float32: median {matmul:.1f} GFLOP/s, best "
        f"{results['matmul']['gflops_best']:.1f} GFLOP/s"
    )

    mnist = mnist_config(quick)
    dit = imagenet_config("DiT-B/2", args.dit_batch, dtype="float32", quick=quick)
    if "matmul" in sections:
        results["matmul_shapes"] = {
            "mnist": matmul_shape_rates(mnist, quick),
            "dit_b2_small_batch": matmul_shape_rates(dit, quick),
        }
        for name, rates in results["matmul_shapes"].items():
            for rate in rates:
                say(f"    {name}: {rate['name']}: {rate['gflops_median']:.1f} GFLOP/s")

    live = {}
    if "mnist" in sections or "profile" in sections:
        step, live = benchmark_step(
            "mnist", mnist, args.mnist_steps, warmup=5, matmul_gflops=matmul, keep=True
        )
        results["steps"]["mnist"] = step
        say(
            f"(b) MNIST step: {step['cost_analysis']['flops'] / 1e9:.3f} GFLOP, compile "
            f"{step['compile_seconds']:.1f} s, median "
            f"{1e3 * step['step_seconds']['median_seconds']:.1f} ms -> "
            f"{step['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * step['fraction_of_matmul_rate']:.1f}% of matmul"
        )
    if "profile" in sections and live:
        reps = 3 if quick else 100
        profile = {
            "breakdown": step_breakdown(
                live, reps, results["steps"]["mnist"]["step_seconds"]["median_seconds"]
            )
        }
        profile["trace"] = profile_step(live, 2 if quick else 30)
        results["mnist_profile"] = profile
        for name, part in profile["breakdown"]["parts"].items():
            say(
                f"(c) {name}: {1e3 * part['median_seconds']:.2f} ms, {part['flops'] / 1e9:.3f} "
                f"GFLOP, {part['gflops']:.1f} GFLOP/s"
            )
        trace = profile["trace"]
        if "top_ops" in trace:
            say(f"(c) op time by category: {trace['op_time_share_by_category']}")
            for op in trace["top_ops"][:10]:
                say(
                    f"    {op['op']:28s} {op['category']:20s} {op['ms_per_step']:7.3f} ms "
                    f"{op['matmul_gflops']:7.1f} GFLOP/s {','.join(op['fused_ops'][:6])}"
                )
    live.clear()

    if "dit" in sections:
        step, _ = benchmark_step(
            "dit_b2_small_batch", dit, args.dit_steps, warmup=1, matmul_gflops=matmul
        )
        results["steps"]["dit_b2_small_batch"] = step
        say(
            f"(b) DiT-B/2 batch {args.dit_batch} step: {step['cost_analysis']['flops'] / 1e9:.1f} "
            f"GFLOP, compile {step['compile_seconds']:.1f} s, median "
            f"{step['step_seconds']['median_seconds']:.2f} s -> {step['achieved_gflops']:.1f} "
            f"GFLOP/s = {100 * step['fraction_of_matmul_rate']:.1f}% of matmul"
        )

    if "imagenet" in sections:
        results["imagenet_batch256"] = {}
        batch = 16 if quick else 256
        for preset in ("DiT-B/2", "DiT-XL/2"):
            compile_program = not quick and (preset == "DiT-B/2" or args.xl_compile == "yes")
            config = imagenet_config(preset, batch, quick=quick)
            entry = abstract_cost(config, compile_program)
            results["imagenet_batch256"][preset] = entry
            say(
                f"(d) {preset} batch {batch} ({entry['dtype']}): {entry['num_params'] / 1e6:.1f} M "
                f"params, {entry['flops_per_step'] / 1e12:.2f} TFLOP/step ({entry['flops_source']}"
                f"), {entry['flops_per_image'] / 1e9:.1f} GFLOP/image; lowered "
                f"{entry['lowered_cost_analysis']['flops'] / 1e12:.2f} TFLOP; compile "
                f"{entry.get('compile_seconds', float('nan')):.1f} s"
            )

    if "allocator" in sections:
        steps_per_model = {"mnist": 2} if quick else {"mnist": 100, "dit": 3}
        rounds = 1 if quick else args.allocator_rounds
        results["allocator_ab"] = allocator_ab(steps_per_model, rounds, quick)
        for model, variants in results["allocator_ab"].items():
            for name, variant in variants.items():
                say(
                    f"(e) {model} {name}: {1e3 * variant['median_seconds']:.1f} ms/step, "
                    f"x{variant['speedup_vs_default']:.2f}, "
                    f"{variant['minor_page_faults_per_step']:.0f} page faults/step"
                )

    results["limits"] = findings(results)
    results["interpretation"] = INTERPRETATION
    results["meta"]["total_seconds"] = time.perf_counter() - started
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    print("\nLimits:\n  " + "\n  ".join(results["limits"]))
    say(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
