"""Benchmark: train images/s of the MNIST default against the paper's official JAX code.

    python benchmarks/official_comparison.py --official_dir ~/shortcut-models --rounds 5 --steps 300
    python benchmarks/official_comparison.py --report      # Markdown table of the last results

The official code is a checkout of github.com/kvfrans/shortcut-models (its model.py, math_utils.py,
targets_shortcut.py, train.py and utils/); nothing of it is part of this project. Cases: the MNIST
default (experiments/mnist.py: DiT width 128, depth 4, 4 heads, patch 4, 28x28x1) class-conditional
at batch 32, and unconditional at batch 32 and 64 (or --conditional / --unconditional with
--batch_sizes). Every measurement runs in a fresh process (this script with --worker), the two
sides interleaved in each round (their order alternating between rounds), and the float32 matmul
rate (jitted 2048^3 `jnp.dot`, median) is measured at the start and at the end of the sitting.

Both sides are timed the same way: random MNIST-shaped numpy batches are put on the device each
step (as both train loops do), `--warmup` steps (the first one compiles) are not timed, then
`--steps` steps are timed with a wait for the result every `--block_every` steps; images/s is the
median over those chunks.
  ours:     the step `shortcut_jax.train` runs: `steps.make_train_step` jitted with the state and
            batch shardings and the state donated, the state from `state.init_state`.
  official: their `update` function, taken from their train.py's `main` by its syntax tree and
            executed unchanged with their `get_targets`, `DiT`, `TrainStateEma` and
            `create_sharding('dp')`; the model, optimizer (AdamW, lr, betas, weight decay) and
            bootstrap settings set from our config as their train.py's --model.* flags would set
            them (`official_flags`); unconditional follows their README (num_classes 1,
            class_dropout_prob 1, cfg_scale 0). Their other defaults stay (constant lr, the EMA
            as bootstrap teacher, no gradient clipping).
Two shims for jax 0.10 (applied in the official worker only, their files are not edited):
`jax._src.core.as_named_shape` (removed from jax; their initializer computes it and never uses
it) returns the shape, and `jax.tree_map` (removed; their EMA update calls it) is `jax.tree.map`.
Their DiT computes in bfloat16 by default; `--official_dtype ours` (default) builds it in our
config's dtype (float32) so both run the same model, `--official_dtype theirs` keeps bfloat16.
`import shortcut_jax` tunes glibc malloc (shortcut_jax/allocator.py): our worker has it, as every
user does; the official worker does not, unless --official_malloc_tuning.

Output: benchmarks/results/official_comparison.json (every round, both models' parameter counts and
compiled FLOPs per step, the matmul rates, machine meta).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "official_comparison.json"
RESULT_MARKER = "OFFICIAL_COMPARISON_RESULT "
OFFICIAL_FILES = (
    "model.py",
    "math_utils.py",
    "targets_shortcut.py",
    "train.py",
    "utils/train_state.py",
    "utils/sharding.py",
)
SIDES = ("ours", "official")
MATMUL_SIZE = 2048


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: the MNIST default model, conditional or not, at one batch size."""

    conditional: bool
    batch_size: int

    @property
    def name(self) -> str:
        """e.g. 'conditional_b32'."""
        kind = "conditional" if self.conditional else "unconditional"
        return f"{kind}_b{self.batch_size}"


# The cases: class-conditional at batch 32, unconditional at batch 32 and 64.
DEFAULT_CASES = (Case(True, 32), Case(False, 32), Case(False, 64))


def parse_cases(
    batch_sizes: str | None, conditional: bool, unconditional: bool, bootstrap_every: int = 8
) -> list[Case]:
    """The cases the flags ask for: DEFAULT_CASES, or the chosen kinds x --batch_sizes.

    Raises:
      ValueError: naming --batch_sizes when a size is not a positive multiple of bootstrap_every.
    """
    if batch_sizes is None and not conditional and not unconditional:
        return list(DEFAULT_CASES)
    sizes = []
    for text in (batch_sizes or "32").split(","):
        text = text.strip()
        if not text.isdigit() or int(text) <= 0 or int(text) % bootstrap_every:
            raise ValueError(
                f"--batch_sizes={batch_sizes!r}: {text!r} is not a positive multiple of "
                f"{bootstrap_every} (bootstrap_every); give e.g. --batch_sizes 32,64"
            )
        sizes.append(int(text))
    kinds = [kind for kind, chosen in ((True, conditional), (False, unconditional)) if chosen]
    return [Case(kind, size) for kind in (kinds or [True, False]) for size in sizes]


# ------------------------------------------------------------------------------ configuration


def our_config(case: Case) -> Any:
    """experiments/mnist.py with the case's batch size (and num_classes 0 when unconditional)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("mnist_config", ROOT / "experiments/mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = case.batch_size
    if not case.conditional:
        config.data.num_classes = 0
    return config


def official_flags(config: Any, case: Case) -> dict[str, Any]:
    """Their train.py flags (--batch_size, --model.*) for the model and step of our `config`.

    Returns:
      {'batch_size': B, 'model': {their model_config key: value}, 'image_shape': (H, W, C)}.
    """
    model = {
        "lr": float(config.optim.learning_rate),
        "beta1": float(config.optim.beta1),
        "beta2": float(config.optim.beta2),
        "weight_decay": float(config.optim.weight_decay),
        "hidden_size": int(config.model.hidden_size),
        "patch_size": int(config.model.patch_size),
        "depth": int(config.model.depth),
        "num_heads": int(config.model.num_heads),
        "mlp_ratio": float(config.model.mlp_ratio),
        "denoise_timesteps": int(config.denoise_timesteps),
        "bootstrap_every": int(config.bootstrap_every),
        "bootstrap_cfg": int(bool(config.bootstrap_cfg)),
        "target_update_rate": float(config.ema_rate),
        "use_stable_vae": 0,
        "train_type": "shortcut",
    }
    if case.conditional:
        # Their update treats cfg_scale 0 as unconditional; with bootstrap_cfg 0 it has no effect.
        model.update(
            num_classes=int(config.data.num_classes),
            class_dropout_prob=float(config.class_dropout_prob),
            cfg_scale=float(config.cfg_scale) or 1.0,
        )
    else:  # their README's unconditional (CelebA-HQ) recipe
        model.update(num_classes=1, class_dropout_prob=1.0, cfg_scale=0.0)
    size, channels = int(config.data.image_size), int(config.data.channels)
    return {"batch_size": case.batch_size, "model": model, "image_shape": [size, size, channels]}


def check_official_dir(directory: str) -> Path:
    """The checkout of the official code, checked to hold every file the worker imports.

    Raises:
      ValueError: naming --official_dir and the missing file.
    """
    path = Path(directory).expanduser()
    for name in OFFICIAL_FILES:
        if not (path / name).is_file():
            raise ValueError(
                f"--official_dir={directory!r} has no {name}: give a checkout of "
                "github.com/kvfrans/shortcut-models (git clone it and pass its folder)"
            )
    return path.resolve()


def official_fingerprint(directory: Path) -> dict[str, str]:
    """sha256 of each official file, so the results say which version was measured."""
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in OFFICIAL_FILES
    }


def extract_model_config(train_source: str) -> dict[str, Any]:
    """The literal dict behind `model_config = ml_collections.ConfigDict({...})` in train.py.

    Raises:
      ValueError: when train.py has no such assignment.
    """
    for node in ast.parse(train_source).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "model_config" for t in node.targets)
            and isinstance(node.value, ast.Call)
            and node.value.args
            and isinstance(node.value.args[0], ast.Dict)
        ):
            return ast.literal_eval(node.value.args[0])
    raise ValueError("train.py has no `model_config = ml_collections.ConfigDict({...})`")


def extract_update_source(train_source: str) -> str:
    """Source of the `update` function defined inside train.py's `main`, decorators included.

    Raises:
      ValueError: when train.py has no main() with an update() inside.
    """
    tree = ast.parse(train_source)
    for main in tree.body:
        if isinstance(main, ast.FunctionDef) and main.name == "main":
            for node in ast.walk(main):
                if isinstance(node, ast.FunctionDef) and node.name == "update":
                    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    lines = train_source.splitlines()[start - 1 : node.end_lineno]
                    return textwrap.dedent("\n".join(lines)) + "\n"
    raise ValueError("train.py has no update() inside main()")


def merged_model_config(defaults: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Their model_config defaults with our flags on top (as --model.key=value would set them).

    Raises:
      ValueError: naming a flag their model_config does not have (another train.py version).
    """
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(f"their train.py model_config has no {unknown}: another version?")
    return {**defaults, **flags}


# ------------------------------------------------------------------------------ timing


def chunk_throughput(chunks: Sequence[tuple[int, float]], batch_size: int) -> dict[str, Any]:
    """images/s of each (steps, seconds) chunk; median, and overall over all chunks."""
    rates = [steps * batch_size / seconds for steps, seconds in chunks]
    total_steps = sum(steps for steps, _ in chunks)
    total_seconds = sum(seconds for _, seconds in chunks)
    return {
        "images_per_second_median": statistics.median(rates),
        "images_per_second_overall": total_steps * batch_size / total_seconds,
        "chunk_images_per_second": rates,
        "timed_steps": total_steps,
    }


def time_train_steps(
    step: Callable[[Any, Any], tuple[Any, Any]],
    state: Any,
    batches: Sequence[Any],
    put: Callable[[Any], Any],
    warmup: int,
    steps: int,
    block_every: int,
) -> tuple[list[tuple[int, float]], float]:
    """Runs `warmup` untimed steps, then `steps` timed ones, waiting every `block_every` steps.

    Args:
      step: (state, device batch) -> (state, metrics).
      batches: host batches, cycled; `put` moves one to the device inside the timed loop.

    Returns:
      ([(steps, seconds) per chunk], seconds of the first step, compilation included).
    """
    import jax

    start = time.perf_counter()
    first_step_seconds = 0.0
    for index in range(max(warmup, 1)):
        state, metrics = step(state, put(batches[index % len(batches)]))
        jax.block_until_ready((state, metrics))
        if index == 0:
            first_step_seconds = time.perf_counter() - start
    chunks, pending = [], 0
    tick = time.perf_counter()
    for index in range(steps):
        state, metrics = step(state, put(batches[index % len(batches)]))
        pending += 1
        if pending == block_every or index + 1 == steps:
            jax.block_until_ready((state, metrics))
            now = time.perf_counter()
            chunks.append((pending, now - tick))
            tick, pending = now, 0
    return chunks, first_step_seconds


def random_batches(batch_size: int, shape: Sequence[int], num_classes: int, count: int = 4):
    """`count` numpy batches: images uniform in [-1, 1] (B, H, W, C), labels (B,) int32."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.uniform(-1, 1, (batch_size, *shape)).astype(np.float32),
            "label": rng.integers(0, max(num_classes, 1), (batch_size,)).astype(np.int32),
        }
        for _ in range(count)
    ]


def compiled_flops(jitted: Any, *args: Any) -> float:
    """FLOPs of one call from XLA's cost analysis of the compiled program."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def count_leaves(tree: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    import jax

    return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------ workers


def ours_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Times our train step as shortcut_jax.train builds it; returns throughput, params, FLOPs."""
    case = Case(spec["conditional"], spec["batch_size"])
    config = our_config(case)  # imports shortcut_jax first, so its malloc tuning is in place
    import functools

    import jax

    from shortcut_jax import allocator, config_lib, models, optim, sharding, steps, teacher
    from shortcut_jax.state import init_state, sharded_abstract_state

    config_lib.validate(config)
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = sharding.make_mesh(config)
    _, state_sharding = sharded_abstract_state(config, model, optimizer, mesh)
    init_fn = functools.partial(init_state, config, model, optimizer)
    state = jax.jit(init_fn, out_shardings=state_sharding)()
    jitted = jax.jit(
        steps.make_train_step(config, model, optimizer, None),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), teacher.shardings(None)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    # As our data sources give them: labels all 0 when unconditional.
    batches = random_batches(case.batch_size, shape, int(config.data.num_classes))
    flops = compiled_flops(jitted, state, sharding.global_batch(mesh, batches[0]), None)
    chunks, first = time_train_steps(
        teacher.bind(jitted, None),
        state,
        batches,
        lambda batch: sharding.global_batch(mesh, batch),
        spec["warmup"],
        spec["steps"],
        spec["block_every"],
    )
    return {
        **chunk_throughput(chunks, case.batch_size),
        "first_step_seconds": first,
        "params": models.count_params(state.params),
        "flops_per_step": flops,
        "malloc_tuned": allocator.is_tuned(),
        "devices": jax.device_count(),
    }


def apply_official_shims() -> list[str]:
    """Restores the two jax APIs the official code calls that jax 0.10 removed; returns which."""
    import jax
    from jax._src import core

    applied = []
    if not hasattr(core, "as_named_shape"):
        core.as_named_shape = tuple  # their initializer computes it and never uses the result
        applied.append("jax._src.core.as_named_shape = tuple")
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map  # their TrainStateEma.update_ema and shard_data call it
        applied.append("jax.tree_map = jax.tree.map")
    return applied


@contextlib.contextmanager
def official_devices(sharding_module: Any, devices: Sequence[Any] | None) -> Iterator[None]:
    """Their `create_sharding` laid over `devices` (e.g. compile-only TPU devices) while inside.

    Their utils/sharding.py builds its mesh from `jax.device_count()` and
    `mesh_utils.create_device_mesh` over the default devices; inside this context its module's
    `jax` and `mesh_utils` see `devices` instead (their file is not edited). None: unchanged.
    """
    if devices is None:
        yield
        return
    import types

    from shortcut_jax import sharding as our_sharding

    devices = list(devices)
    real_jax = sharding_module.jax

    class _Jax(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(real_jax, name)

    fake_jax = _Jax("jax")
    fake_jax.device_count = lambda: len(devices)
    fake_jax.local_devices = lambda: devices
    fake_jax.local_device_count = lambda: len(devices)

    def create_device_mesh(shape: Sequence[int], **options: Any) -> Any:
        return our_sharding.device_grid(shape, devices, **options)

    fake_mesh_utils = types.SimpleNamespace(create_device_mesh=create_device_mesh)
    saved = sharding_module.jax, sharding_module.mesh_utils
    sharding_module.jax, sharding_module.mesh_utils = fake_jax, fake_mesh_utils
    try:
        yield
    finally:
        sharding_module.jax, sharding_module.mesh_utils = saved


def build_official_update(
    spec: dict[str, Any], devices: Sequence[Any] | None = None, materialize: bool = True
) -> dict[str, Any]:
    """Their update step (train.py's update, unchanged) on their DiT, state and sharding.

    Args:
      spec: 'official_dir', 'flags' (from `official_flags`), 'official_dtype' ('theirs' keeps
        their DiT's bfloat16 default, else 'our_dtype' is used).
      devices: lay their `create_sharding` over these (e.g. a TPU slice's compile-only devices)
        instead of the default devices.
      materialize: also initialise the state on the devices (False for compile-only devices).

    Returns:
      dict with 'update' (jitted: (state, teacher, images, labels) -> (state, info)), 'init',
      'abstract_state', 'state', 'state_sharding' (their train_state_sharding: one sharding for
      'dp', a tree for 'fsdp'), 'data_sharding', 'shard_data', 'model_def', 'flags' (FLAGS),
      'shape' (H, W, C), 'shims'.
    """
    from functools import partial

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import optax

    shims = apply_official_shims()
    directory = check_official_dir(spec["official_dir"])
    sys.path.insert(0, str(directory))
    import utils.sharding as sharding_module
    from model import DiT
    from utils.train_state import TrainStateEma

    train_source = (directory / "train.py").read_text()
    flags = spec["flags"]
    model_flags = ml_collections.ConfigDict(
        merged_model_config(extract_model_config(train_source), flags["model"])
    )
    FLAGS = argparse.Namespace(batch_size=flags["batch_size"], model=model_flags)  # noqa: N806
    shape = tuple(flags["image_shape"])
    dtype = {} if spec["official_dtype"] == "theirs" else {"dtype": jnp.dtype(spec["our_dtype"])}
    model_def = DiT(
        patch_size=model_flags.patch_size,
        hidden_size=model_flags.hidden_size,
        depth=model_flags.depth,
        num_heads=model_flags.num_heads,
        mlp_ratio=model_flags.mlp_ratio,
        out_channels=shape[-1],
        class_dropout_prob=model_flags.class_dropout_prob,
        num_classes=model_flags.num_classes,
        dropout=model_flags.dropout,
        ignore_dt=False,
        **dtype,
    )
    learning_rate = float(model_flags.lr)
    tx = optax.chain(
        optax.adamw(
            learning_rate=learning_rate,
            b1=model_flags.beta1,
            b2=model_flags.beta2,
            weight_decay=model_flags.weight_decay,
        )
    )

    def init(rng: Any) -> Any:
        param_key, label_key, dropout_key = jax.random.split(rng, 3)
        zeros = jnp.zeros((1,))
        variables = model_def.init(
            {"params": param_key, "label_dropout": label_key, "dropout": dropout_key},
            jnp.zeros((1, *shape)),
            zeros,
            zeros,
            jnp.zeros((1,), jnp.int32),
        )
        params = variables["params"]
        return TrainStateEma.create(model_def, params, rng=rng, tx=tx, opt_state=tx.init(params))

    rng = jax.random.PRNGKey(10)  # their --seed default
    abstract_state = jax.eval_shape(init, rng)
    with official_devices(sharding_module, devices):
        data_sharding, state_sharding, no_shard, shard_data, _ = sharding_module.create_sharding(
            model_flags.sharding, abstract_state
        )
    state = jax.jit(init, out_shardings=state_sharding)(rng) if materialize else None
    namespace = {
        "partial": partial,
        "jax": jax,
        "jnp": jnp,
        "np": np,
        "optax": optax,
        "FLAGS": FLAGS,
        "lr_schedule": lambda _: learning_rate,  # their schedule without cosine or warm-up
        "data_sharding": data_sharding,
        "train_state_sharding": state_sharding,
        "no_shard": no_shard,
    }
    code = compile(extract_update_source(train_source), str(directory / "train.py"), "exec")
    exec(code, namespace)  # their update(), unchanged
    return {
        "update": namespace["update"],
        "init": init,
        "abstract_state": abstract_state,
        "state": state,
        "state_sharding": state_sharding,
        "data_sharding": data_sharding,
        "shard_data": shard_data,
        "model_def": model_def,
        "flags": FLAGS,
        "shape": shape,
        "shims": shims,
    }


def official_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Times the official update step (their train.py's update, unchanged) on our model."""
    malloc_tuned = False
    if spec["official_malloc_tuning"]:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from shortcut_jax import allocator  # the import applies the tuning

        malloc_tuned = allocator.is_tuned()
    import jax
    import jax.numpy as jnp

    built = build_official_update(spec)
    update, state, shard_data = built["update"], built["state"], built["shard_data"]
    flags, shape, model_def = spec["flags"], built["shape"], built["model_def"]

    def put(batch: dict[str, Any]) -> tuple[Any, Any]:
        return shard_data(batch["image"], batch["label"])

    def step(train_state: Any, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        return update(train_state, None, *batch)

    batches = random_batches(flags["batch_size"], shape, 10)  # MNIST labels (unused if uncond.)
    flops = compiled_flops(update, state, None, *put(batches[0]))
    chunks, first = time_train_steps(
        step, state, batches, put, spec["warmup"], spec["steps"], spec["block_every"]
    )
    return {
        **chunk_throughput(chunks, flags["batch_size"]),
        "first_step_seconds": first,
        "params": count_leaves(state.params),
        "flops_per_step": flops,
        "malloc_tuned": malloc_tuned,
        "shims": built["shims"],
        "compute_dtype": str(jnp.dtype(model_def.dtype)),
        "devices": jax.device_count(),
    }


def matmul_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """float32 rate of a jitted n x n @ n x n jnp.dot: median and best over `reps` calls."""
    import jax
    import jax.numpy as jnp

    size, reps = spec["size"], spec["reps"]
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    for _ in range(2):
        dot(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return {
        "size": size,
        "reps": reps,
        "gflops_median": flops / statistics.median(times) / 1e9,
        "gflops_best": flops / min(times) / 1e9,
    }


WORKERS = {"ours": ours_worker, "official": official_worker, "matmul": matmul_worker}


# ------------------------------------------------------------------------------ orchestration


def parse_worker_output(stdout: str) -> dict[str, Any]:
    """The result a worker printed on its RESULT_MARKER line (the last one).

    Raises:
      ValueError: when there is no such line.
    """
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        raise ValueError("the worker printed no result line")
    return json.loads(lines[-1][len(RESULT_MARKER) :])


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one worker in a fresh process and returns its result (its stderr tail on failure)."""
    env = {**os.environ}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    command += ["--worker_spec", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{kind} worker failed (exit {done.returncode}):\n{tail}")
    return parse_worker_output(done.stdout)


def side_order(round_index: int) -> tuple[str, str]:
    """ours first in even rounds, official first in odd ones (cancels drift within a sitting)."""
    return SIDES if round_index % 2 == 0 else SIDES[::-1]


def machine_meta() -> dict[str, Any]:
    """CPU, cores, Python and package versions, load and niceness (no jax import here)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
        "our_commit": commit,
        "niceness": os.getpriority(os.PRIO_PROCESS, 0),
        "load_average_1_5_15_min_at_start": list(os.getloadavg()),
    }


def summarize_case(rounds: list[dict[str, Any]], case_name: str) -> dict[str, Any]:
    """Per-round ours/official ratios and the medians of one case's rounds."""
    per_round = {}
    for entry in rounds:
        if entry["case"] == case_name:
            per_round.setdefault(entry["round"], {})[entry["side"]] = entry
    ratios, ours, official = [], [], []
    for _, sides in sorted(per_round.items()):
        if set(sides) == set(SIDES):
            ours.append(sides["ours"]["images_per_second_median"])
            official.append(sides["official"]["images_per_second_median"])
            ratios.append(ours[-1] / official[-1])
    if not ratios:
        return {"rounds": 0}
    return {
        "rounds": len(ratios),
        "ours_images_per_second_median": statistics.median(ours),
        "official_images_per_second_median": statistics.median(official),
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
    }


def measure(args: argparse.Namespace, cases: list[Case]) -> dict[str, Any]:
    """Matmul rate, R interleaved rounds of every case on both sides, matmul rate again."""
    official_dir = check_official_dir(args.official_dir)
    timing = {"warmup": args.warmup, "steps": args.steps, "block_every": args.block_every}
    matmul_spec = {"size": MATMUL_SIZE, "reps": args.matmul_reps}
    results: dict[str, Any] = {
        "meta": machine_meta(),
        "settings": {
            **timing,
            "rounds": args.rounds,
            "official_dir": str(official_dir),
            "official_fingerprint": official_fingerprint(official_dir),
            "official_dtype": args.official_dtype,
            "official_malloc_tuning": args.official_malloc_tuning,
            "command": " ".join(sys.argv),
        },
        "matmul": {"start": run_worker("matmul", matmul_spec)},
        "cases": {},
        "rounds": [],
    }
    start_rate = results["matmul"]["start"]["gflops_median"]
    print(f"matmul float32 {MATMUL_SIZE}^3: {start_rate:.1f} GFLOP/s")
    specs = {}
    for case in cases:
        config = our_config(case)
        flags = official_flags(config, case)
        results["cases"][case.name] = {"official_flags": flags}
        base = {**timing, "conditional": case.conditional, "batch_size": case.batch_size}
        specs[case.name] = {
            "ours": base,
            "official": {
                **timing,
                "flags": flags,
                "official_dir": str(official_dir),
                "official_dtype": args.official_dtype,
                "our_dtype": str(config.model.dtype),
                "official_malloc_tuning": args.official_malloc_tuning,
            },
        }
    for round_index in range(args.rounds):
        for case in cases:
            for side in side_order(round_index):
                result = run_worker(side, specs[case.name][side])
                entry = {"round": round_index, "case": case.name, "side": side, **result}
                results["rounds"].append(entry)
                results["cases"][case.name].setdefault(side, {}).update(
                    {key: result[key] for key in ("params", "flops_per_step", "malloc_tuned")}
                )
                print(
                    f"round {round_index} {case.name:<18} {side:<8} "
                    f"{result['images_per_second_median']:8.1f} img/s  "
                    f"params {result['params']:,}  GFLOP/step {result['flops_per_step'] / 1e9:.3f}"
                )
    results["matmul"]["end"] = run_worker("matmul", matmul_spec)
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    for case in cases:
        results["cases"][case.name]["summary"] = summarize_case(results["rounds"], case.name)
    return results


def report(results: dict[str, Any]) -> str:
    """The Markdown table of a results file: per case both medians and the per-round ratios."""
    lines = [
        "| case | ours img/s | official img/s | ours / official per round | median ratio "
        "| params ours / official | GFLOP/step ours / official |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, case in results["cases"].items():
        summary = case.get("summary", {})
        if not summary.get("rounds"):
            continue
        ours, official = case["ours"], case["official"]
        per_round = ", ".join(f"{ratio:.2f}" for ratio in summary["ratio_per_round"])
        lines.append(
            f"| {name} | {summary['ours_images_per_second_median']:.0f} "
            f"| {summary['official_images_per_second_median']:.0f} | {per_round} "
            f"| **{summary['ratio_median']:.2f}x** "
            f"| {ours['params']:,} / {official['params']:,} "
            f"| {ours['flops_per_step'] / 1e9:.3f} / {official['flops_per_step'] / 1e9:.3f} |"
        )
    matmul = results["matmul"]
    meta, settings = results["meta"], results["settings"]
    lines += [
        "",
        f"Matmul (float32 {MATMUL_SIZE}^3 jnp.dot, median): "
        f"{matmul['start']['gflops_median']:.1f} GFLOP/s at the start, "
        f"{matmul.get('end', {}).get('gflops_median', float('nan')):.1f} at the end.",
        f"{meta['date']}; {meta['cpu']}, {meta['cores']} cores; jax {meta['versions']['jax']}; "
        f"{settings['rounds']} rounds x {settings['steps']} timed steps "
        f"(after {settings['warmup']} untimed, waits every {settings['block_every']}); load "
        f"{meta['load_average_1_5_15_min_at_start']} at the start, "
        f"{meta.get('load_average_1_5_15_min_at_end')} at the end; "
        f"official dtype: {settings['official_dtype']}, official malloc tuning: "
        f"{settings['official_malloc_tuning']}.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official_dir", help="a checkout of github.com/kvfrans/shortcut-models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (the first compiles)")
    parser.add_argument("--block_every", type=int, default=10, help="wait every this many steps")
    parser.add_argument("--batch_sizes", default=None, help="e.g. 32,64 (with the kinds below)")
    parser.add_argument("--conditional", action="store_true", help="class-conditional cases")
    parser.add_argument("--unconditional", action="store_true", help="unconditional cases")
    parser.add_argument("--official_dtype", choices=("ours", "theirs"), default="ours")
    parser.add_argument("--official_malloc_tuning", action="store_true")
    parser.add_argument("--matmul_reps", type=int, default=20)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--report", action="store_true", help="print the table of --out")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.report:
        return args
    if not args.official_dir:
        parser.error("--official_dir is required: a checkout of github.com/kvfrans/shortcut-models")
    for name in ("rounds", "steps", "block_every", "matmul_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be at least 1")
    if args.warmup < 1:
        parser.error(f"--warmup={args.warmup}: must be at least 1 (the first step compiles)")
    try:
        bootstrap_every = int(our_config(DEFAULT_CASES[0]).bootstrap_every)
        args.cases = parse_cases(
            args.batch_sizes, args.conditional, args.unconditional, bootstrap_every
        )
        check_official_dir(args.official_dir)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Runs a worker, prints the report, or measures and writes --out."""
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.worker_spec))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    out = Path(args.out)
    if args.report:
        if not out.is_file():
            sys.exit(f"--out={args.out}: no results file; run the measurement first")
        print(report(json.loads(out.read_text())))
        return
    results = measure(args, args.cases)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}\n")
    print(report(results))


if __name__ == "__main__":
    main()
