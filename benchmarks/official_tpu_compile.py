"""Benchmark: the official code's ImageNet train step compiled for a TPU slice, beside ours.

    python benchmarks/official_tpu_compile.py --official_dir ~/shortcut-models --topology v5e:4x4
    python benchmarks/official_tpu_compile.py --official_dir ~/shortcut-models --topology v5p:2x2x1
    python benchmarks/official_tpu_compile.py --official_dir ~/shortcut-models --topology v5e:4x4 \
        --sides ours --layouts fsdp      # recompile one entry, keeping the others of the file
    python benchmarks/official_tpu_compile.py --report     # Markdown tables of every results file

Needs the TPU compiler (`pip install -e ".[tpu]"`), not a TPU: both train steps are lowered with
abstract inputs (`jax.ShapeDtypeStruct` carrying their shardings on a mesh over the slice's
compile-only devices, `shortcut_jax.aot.resolve_slice`) and compiled by libtpu; per chip,
`memory_analysis()` gives the arguments, outputs, aliased bytes, temporaries and code, and
`cost_analysis()` the FLOPs of one step. Each side compiles in its own process (this script with
--worker), ours then theirs, one mesh layout after the other:
  dp:    pure data parallel over every chip (ours: --config.mesh.data=-1; theirs:
         --model.sharding dp, their params, Adam moments and EMA replicated);
  fsdp:  the state sharded over every chip (ours: --config.mesh.fsdp=N --config.mesh.data=1;
         theirs: --model.sharding fsdp, each array over 4 MiB split along its largest axis).
  ours:     `experiments/imagenet256.py` (DiT-B/2, batch 256, bfloat16 compute, 32x32x4 latents,
            bootstrap 1/8 with CFG in the targets, EMA teacher), program 'train_latents' of
            `shortcut_jax.aot.compile_programs` (the step `shortcut_jax.train` runs, state donated).
  official: their `update` from their train.py, unchanged (`official_comparison.build_official_
            update`: their DiT at its bfloat16 default, TrainStateEma, create_sharding laid over
            the slice), with the flags of their README's ImageNet-256 DiT-B command line
            (`readme_command_flags`: hidden 768, patch 2, depth 12, heads 12, mlp_ratio 4,
            cfg_scale 1.5, class_dropout_prob 0.1, bootstrap_cfg 1, batch 256, shortcut) and
            their train.py defaults for the rest (bootstrap_every 8, bootstrap_ema 1, lr 1e-4,
            AdamW, 1000 classes, denoise_timesteps 128); images are the 32x32x4 latents their
            loop passes to update after the VAE encode.
The official code is a checkout of github.com/kvfrans/shortcut-models, run from where it is;
nothing of it is part of this project. `--hlo_dir DIR` also writes each compiled program's HLO
text, `--xla_dump_dir DIR` the compiler's dumps (its `*live-range.txt` lists the buffers live at
the peak of the temporaries, with the jax operation that made each), to compare the two programs.

Output: benchmarks/results/official_tpu_compile_<topology>.json (written atomically), one entry
per side and layout. A run compiles the --sides x --layouts it is given and keeps the file's other
entries (`merge_results`); every entry records the commit (and uncommitted changes) of our tree it
was compiled at, date and versions, shown in the report's 'commit' column.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import official_comparison as oc  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULT_PREFIX = "official_tpu_compile_"
DEFAULT_TOPOLOGY = "v5e:4x4"
LAYOUTS = ("dp", "fsdp")
SIDES = ("ours", "official")
IMAGE_SHAPE = (32, 32, 4)  # SD-VAE latents of 256x256 images, what both steps train on
GiB = 1024**3
# Their README's ImageNet-256 command line for the DiT-B model is the one with this width.
README_HIDDEN_SIZE = 768
MEMORY_FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes")


# ------------------------------------------------------------------------------ pure helpers


def _literal(text: str) -> Any:
    """A command-line value as Python would read it ('810_000' -> 810000), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def readme_command_flags(
    readme: str, dataset: str = "imagenet256", hidden_size: int = README_HIDDEN_SIZE
) -> dict[str, Any]:
    """The flags of the README's `python train.py ...` line for `dataset` at `hidden_size`.

    Returns:
      {'batch_size': B, 'model': {their model_config key: value}, 'other': {flag: value}}.

    Raises:
      ValueError: when the README has no such command line.
    """
    for line in readme.splitlines():
        words = shlex.split(line.strip()) if "train.py" in line else []
        if "train.py" not in words:
            continue
        pairs, index = {}, words.index("train.py") + 1
        while index < len(words):
            word = words[index]
            if not word.startswith("--"):
                index += 1
                continue
            if "=" in word:
                name, value = word[2:].split("=", 1)
                index += 1
            else:
                name = word[2:]
                value = words[index + 1] if index + 1 < len(words) else ""
                index += 2
            pairs[name] = _literal(value)
        if pairs.get("dataset_name") != dataset or pairs.get("model.hidden_size") != hidden_size:
            continue
        model = {k[len("model.") :]: v for k, v in pairs.items() if k.startswith("model.")}
        other = {k: v for k, v in pairs.items() if not k.startswith("model.")}
        if "batch_size" not in other:
            raise ValueError(f"the README's {dataset} command line sets no --batch_size")
        return {"batch_size": int(other.pop("batch_size")), "model": model, "other": other}
    raise ValueError(
        f"their README has no `python train.py` line with --dataset_name {dataset} and "
        f"--model.hidden_size {hidden_size}: another version?"
    )


def topology_slug(topology: str) -> str:
    """'v5e:4x4' -> 'v5e_4x4' (for file names)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", topology).strip("_")


def results_path(topology: str, directory: Path = RESULTS_DIR) -> Path:
    """benchmarks/results/official_tpu_compile_<topology>.json."""
    return directory / f"{RESULT_PREFIX}{topology_slug(topology)}.json"


def our_mesh(layout: str, chips: int) -> dict[str, int]:
    """Our config.mesh for a layout: all chips on 'data' (dp) or on 'fsdp'."""
    if layout == "dp":
        return {"data": chips, "fsdp": 1, "tensor": 1}
    if layout == "fsdp":
        return {"data": 1, "fsdp": chips, "tensor": 1}
    raise ValueError(f"layout {layout!r}: choose from {', '.join(LAYOUTS)}")


def _parse_choices(text: str, choices: Sequence[str], flag: str) -> list[str]:
    """'b, a' -> ['a', 'b'] in the order of `choices`; ValueError naming `flag` otherwise."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or any(part not in choices for part in parts):
        raise ValueError(f"{flag}={text!r}: choose from {', '.join(choices)}")
    return [choice for choice in choices if choice in parts]


def parse_layouts(text: str) -> list[str]:
    """'dp,fsdp' -> ['dp', 'fsdp'].

    Raises:
      ValueError: naming --layouts and the unknown layout.
    """
    return _parse_choices(text, LAYOUTS, "--layouts")


def parse_sides(text: str) -> list[str]:
    """'ours,official' -> ['ours', 'official'].

    Raises:
      ValueError: naming --sides and the unknown side.
    """
    return _parse_choices(text, SIDES, "--sides")


def stamp(entry: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The entry with the run record of `meta` where it has none of its own: our commit, the
    uncommitted changes of our tree, date, jax and libtpu (files written before entries carried
    their own record have it only in their meta)."""
    record = {
        "commit": meta.get("our_commit", ""),
        "tree_changes": list(meta.get("our_tree_changes") or []),
        "date": meta.get("date", ""),
        "jax": (meta.get("versions") or {}).get("jax"),
        "libtpu": meta.get("libtpu"),
    }
    return {**record, **entry}


def commit_text(entry: dict[str, Any]) -> str:
    """'51ac9f8', or '51ac9f8+changes' when our tree had uncommitted changes."""
    return (entry.get("commit") or "?")[:7] + ("+changes" if entry.get("tree_changes") else "")


def merge_results(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new` with the entries of `previous` it did not recompile (another side or layout).

    Kept entries carry their own run record (`stamp` with the previous meta); meta and command
    are the new run's; settings' layouts and sides are those of the merged entries.

    Raises:
      ValueError: when the files are of other settings (topology, batch, image shape, or, while
        official entries are kept, another official checkout).
    """
    if previous is None:
        return new
    old, now = previous["settings"], new["settings"]
    compiled = {(entry["side"], entry["layout"]) for entry in new["runs"]}
    kept = [
        stamp(entry, previous["meta"])
        for entry in previous["runs"]
        if (entry["side"], entry["layout"]) not in compiled
    ]
    keys = ["topology", "batch_size", "image_shape"]
    if any(entry["side"] == "official" for entry in kept):
        keys.append("official_fingerprint")
    for key in keys:
        if old.get(key) != now.get(key):
            raise ValueError(
                f"the results file has {key} {old.get(key)!r}, this run {now.get(key)!r}: "
                "recompile every side and layout (--sides ours,official --layouts dp,fsdp) "
                "or use another --results_dir"
            )
    runs = kept + list(new["runs"])
    runs.sort(key=lambda entry: (LAYOUTS.index(entry["layout"]), SIDES.index(entry["side"])))
    layouts = [layout for layout in LAYOUTS if any(e["layout"] == layout for e in runs)]
    sides = [side for side in SIDES if any(e["side"] == side for e in runs)]
    settings = {**now, "layouts": layouts, "sides": sides}
    merged = {**previous, **new, "runs": runs, "settings": settings}
    for key in ("chips", "chip"):
        if key not in new and key in previous:
            merged[key] = previous[key]
    return merged


def not_aliased_bytes(entry: dict[str, Any]) -> int:
    """Output bytes that need their own HBM (outputs minus those aliased to donated inputs)."""
    return int(entry["output_bytes"]) - int(entry["alias_bytes"])


def mesh_text(entry: dict[str, Any]) -> str:
    """'data=16' / 'fsdp=16' (ours) or "'devices'=16, dp" (theirs), sizes > 1 only."""
    sizes = {k: v for k, v in entry["mesh"].items() if v > 1} or dict(entry["mesh"])
    text = ", ".join(f"{axis}={size}" for axis, size in sizes.items())
    return f"{text}, {entry['sharding']}" if entry.get("sharding") else text


def report(results: dict[str, Any]) -> str:
    """The Markdown table of one results file: per layout ours and theirs, then their ratios."""
    settings = results["settings"]
    lines = [
        f"### {settings['topology']} ({results['chips']} chips, TPU {results['chip']}), "
        f"DiT-B/2, batch {settings['batch_size']} of {'x'.join(map(str, IMAGE_SHAPE))} latents",
        "",
        "| side | mesh | arguments GiB | outputs not aliased GiB | temporaries GiB | total GiB "
        "| TFLOP / chip / step | parameters | commit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    runs = [stamp(entry, results["meta"]) for entry in results["runs"]]
    for layout in settings["layouts"]:
        entries = {e["side"]: e for e in runs if e["layout"] == layout}
        for side in SIDES:
            entry = entries.get(side)
            if entry is None:
                continue
            if entry.get("error"):
                lines.append(
                    f"| {side} | {mesh_text(entry)} | refused by the compiler: "
                    f"{entry['error'][:120]} |||||| {commit_text(entry)} |"
                )
                continue
            lines.append(
                f"| {side} | {mesh_text(entry)} | {entry['argument_bytes'] / GiB:.2f} "
                f"| {not_aliased_bytes(entry) / GiB:.2f} | {entry['temp_bytes'] / GiB:.2f} "
                f"| {entry['total_bytes'] / GiB:.2f} | {entry['flops'] / 1e12:.3f} "
                f"| {entry['params']:,} | {commit_text(entry)} |"
            )
        ours, official = entries.get("ours"), entries.get("official")
        if ours and official and not ours.get("error") and not official.get("error"):
            notes.append(
                f"{layout}: official / ours: total memory "
                f"{official['total_bytes'] / max(ours['total_bytes'], 1):.2f}x, temporaries "
                f"{official['temp_bytes'] / max(ours['temp_bytes'], 1):.2f}x, FLOPs "
                f"{official['flops'] / max(ours['flops'], 1):.2f}x."
            )
    lines += ["", *notes, ""]
    compiles: dict[str, list[str]] = {}
    for e in runs:
        when = f"{e['date']}, jax {e['jax']}, libtpu {e['libtpu']}"
        compiles.setdefault(when, []).append(f"{e['side']} {e['layout']}")
    lines.append(
        "commit: the commit of this project a row was compiled at. Compiled "
        + "; ".join(f"{when}: {', '.join(rows)}" for when, rows in compiles.items())
        + ". Compile seconds "
        + ", ".join(f"{e['side']} {e['layout']} {e.get('compile_seconds', 0):.0f}" for e in runs)
        + "."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ workers


def _memory(compiled: Any) -> dict[str, Any]:
    """Per-chip memory and FLOPs of a compiled program, read as shortcut_jax.aot reads them."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    values = {
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "code_bytes": int(memory.generated_code_size_in_bytes),
        "flops": float((cost or {}).get("flops", 0.0)),
    }
    values["total_bytes"] = (
        values["argument_bytes"] + not_aliased_bytes(values) + values["temp_bytes"]
    ) + values["code_bytes"]
    return values


def _program_name(spec: dict[str, Any], side: str) -> str:
    return f"{topology_slug(spec['topology'])}_{spec['layout']}_{side}"


def _compiler_options(spec: dict[str, Any], side: str) -> dict[str, Any]:
    """With --xla_dump_dir: the compiler's dumps, among them the buffer assignment and the
    buffers live at the peak (`*live-range.txt`); they do not change the program."""
    if not spec.get("xla_dump_dir"):
        return {}
    path = Path(spec["xla_dump_dir"]) / _program_name(spec, side)
    return {"xla_dump_to": str(path), "xla_dump_hlo_as_text": True}


def _write_hlo(spec: dict[str, Any], compiled: Any, side: str) -> None:
    if spec.get("hlo_dir"):
        path = Path(spec["hlo_dir"]) / f"{_program_name(spec, side)}.hlo.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(compiled.as_text())


def _load_experiment(path: Path, variant: str = "") -> Any:
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant)


def ours_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Our 'train_latents' program of experiments/imagenet256.py compiled for the slice."""
    import jax

    from shortcut_jax import aot, config_lib

    jax.config.update("jax_enable_compilation_cache", False)  # as shortcut_jax.compile does
    tpu = aot.resolve_slice(spec["topology"])
    config = _load_experiment(ROOT / "experiments" / "imagenet256.py", spec.get("variant", ""))
    with config.unlocked():
        config.mesh.update(our_mesh(spec["layout"], tpu.num_chips))
    # As shortcut_jax.compile validates (no VAE weights file is read for train_latents); a
    # config_lib without check_files would insist on the file, so it is skipped there.
    if "check_files" in inspect.signature(config_lib.validate).parameters:
        config_lib.validate(config, device_count=tpu.num_chips, check_files=False)
    compiled_programs = []
    analyse = aot._analyse

    def keep_compiled(report: Any, lower: Any, loop_flops: Any) -> None:
        def lower_and_keep() -> Any:
            lowered = lower()

            class Keeping:
                def compile(self) -> Any:
                    compiled_programs.append(lowered.compile(_compiler_options(spec, "ours")))
                    return compiled_programs[-1]

            return Keeping()

        analyse(report, lower_and_keep, loop_flops)

    aot._analyse = keep_compiled  # the same analysis, keeping the program for --hlo_dir
    try:
        report = aot.compile_programs(config, tpu, ("train_latents",))
    finally:
        aot._analyse = analyse
    program = report.programs[0]
    if compiled_programs:
        _write_hlo(spec, compiled_programs[0], "ours")
    return {
        **{name: getattr(program, name) for name in MEMORY_FIELDS},
        "total_bytes": program.total_bytes,
        "flops": program.flops,
        "compile_seconds": program.compile_seconds,
        "error": program.error,
        "params": int(report.num_params),
        "mesh": report.mesh_shape,
        "sharding": "",
        "batch_size": int(config.batch_size),
        "compute_dtype": str(config.model.dtype),
        "chips": tpu.num_chips,
        "chip": tpu.chip.name,
    }


def official_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Their update step (train.py's, unchanged) lowered abstractly on the slice and compiled."""
    import jax
    import jax.numpy as jnp

    from shortcut_jax import aot

    jax.config.update("jax_enable_compilation_cache", False)
    tpu = aot.resolve_slice(spec["topology"])
    built = oc.build_official_update(spec, devices=tpu.devices, materialize=False)
    abstract, shardings = built["abstract_state"], built["state_sharding"]
    if isinstance(shardings, jax.sharding.Sharding):  # 'dp': one sharding for the whole state
        shardings = jax.tree.map(lambda _: built["state_sharding"], abstract)
    state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
    batch_size = int(built["flags"].batch_size)
    data = built["data_sharding"]
    images = jax.ShapeDtypeStruct((batch_size, *built["shape"]), jnp.float32, sharding=data)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data)
    start = time.perf_counter()
    error, values = "", dict.fromkeys(MEMORY_FIELDS, 0)
    values.update(total_bytes=0, flops=0.0)
    try:
        lowered = built["update"].lower(state, None, images, labels)
        compiled = lowered.compile(_compiler_options(spec, "official"))
        values = _memory(compiled)
        _write_hlo(spec, compiled, "official")
    except Exception as exception:  # noqa: BLE001 - XLA raises XlaRuntimeError subclasses
        message = " ".join(str(exception).split())
        if "RESOURCE_EXHAUSTED" not in message and "exceeds available HBM" not in message:
            raise
        error = message[:600]
    mesh = next(iter(jax.tree.leaves(shardings))).mesh
    return {
        **values,
        "compile_seconds": time.perf_counter() - start,
        "error": error,
        "params": oc.count_leaves(abstract.params),
        "mesh": {str(axis): int(size) for axis, size in mesh.shape.items()},
        "sharding": built["flags"].model.sharding,
        "batch_size": batch_size,
        "compute_dtype": str(jnp.dtype(built["model_def"].dtype)),
        "param_dtypes": sorted({str(leaf.dtype) for leaf in jax.tree.leaves(abstract.params)}),
        "shims": built["shims"],
        "chips": tpu.num_chips,
        "chip": tpu.chip.name,
    }


WORKERS = {"ours": ours_worker, "official": official_worker}


# ------------------------------------------------------------------------------ orchestration


def official_spec(official_dir: Path, layout: str) -> dict[str, Any]:
    """The official worker's spec: their README's ImageNet DiT-B flags with --model.sharding."""
    readme = readme_command_flags((official_dir / "README.md").read_text())
    model = {**readme["model"], "sharding": layout}
    return {
        "official_dir": str(official_dir),
        "flags": {
            "batch_size": readme["batch_size"],
            "model": model,
            "image_shape": list(IMAGE_SHAPE),
        },
        "official_dtype": "theirs",
        "readme_other_flags": readme["other"],
    }


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one worker in a fresh process (TPU compiler on a CPU host); returns its result."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    command += ["--worker_spec", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{kind} worker failed (exit {done.returncode}):\n{tail}")
    return oc.parse_worker_output(done.stdout)


def results_header(args: argparse.Namespace) -> dict[str, Any]:
    """Meta (machine, versions, our commit and uncommitted changes) and settings of a run."""
    import importlib.metadata

    official_dir = oc.check_official_dir(args.official_dir)
    meta = oc.machine_meta()
    try:
        meta["libtpu"] = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        meta["libtpu"] = None
    # Uncommitted changes to the library make "ours" another program than our_commit's.
    meta["our_tree_changes"] = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "shortcut_jax", "experiments"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")[:-1]
    readme = readme_command_flags((official_dir / "README.md").read_text())
    results: dict[str, Any] = {
        "meta": meta,
        "settings": {
            "topology": args.topology,
            "layouts": args.layouts,
            "sides": args.sides,
            "batch_size": readme["batch_size"],
            "image_shape": list(IMAGE_SHAPE),
            "official_dir": str(official_dir),
            "official_fingerprint": {
                **oc.official_fingerprint(official_dir),
                "README.md": hashlib.sha256((official_dir / "README.md").read_bytes()).hexdigest(),
            },
            "official_readme_flags": readme,
            "our_config": "experiments/imagenet256.py (b2), program train_latents",
            "command": " ".join(sys.argv),
        },
        "runs": [],
    }
    return results


def measure(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """The --sides for every --layouts on one topology, each compile in its own process; the
    entries go to `results` (from `results_header`), each with its run record."""
    official_dir = oc.check_official_dir(args.official_dir)
    for layout in args.layouts:
        specs = {
            "ours": {"topology": args.topology, "layout": layout},
            "official": {**official_spec(official_dir, layout), "topology": args.topology},
        }
        for side in args.sides:
            specs[side].update(
                layout=layout, hlo_dir=args.hlo_dir or "", xla_dump_dir=args.xla_dump_dir or ""
            )
            print(f"compiling {side} {layout} for {args.topology} ...", flush=True)
            result = run_worker(side, specs[side])
            results["chips"], results["chip"] = result["chips"], result["chip"]
            entry = {"side": side, "layout": layout, **result}
            results["runs"].append(stamp(entry, results["meta"]))
            print(
                f"  {side:<8} {layout:<4} total {result['total_bytes'] / GiB:.2f} GiB, temporaries "
                f"{result['temp_bytes'] / GiB:.2f} GiB, {result['flops'] / 1e12:.3f} TFLOP, "
                f"{result['compile_seconds']:.0f} s" + (" REFUSED" if result["error"] else ""),
                flush=True,
            )
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official_dir", help="a checkout of github.com/kvfrans/shortcut-models")
    parser.add_argument("--topology", default=DEFAULT_TOPOLOGY, help="e.g. v5e:4x4, v5p:2x2x1")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="dp, fsdp or dp,fsdp")
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help="ours, official or both; the file's entries of other sides and layouts are kept",
    )
    parser.add_argument("--hlo_dir", default=None, help="also write each program's HLO text here")
    parser.add_argument(
        "--xla_dump_dir", default=None, help="also dump the compiler's buffer assignment here"
    )
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    parser.add_argument("--report", action="store_true", help="print the tables of results_dir")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.report:
        return args
    if not args.official_dir:
        parser.error("--official_dir is required: a checkout of github.com/kvfrans/shortcut-models")
    try:
        args.layouts = parse_layouts(args.layouts)
        args.sides = parse_sides(args.sides)
        official_dir = oc.check_official_dir(args.official_dir)
        readme_command_flags((official_dir / "README.md").read_text())
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Runs a worker, prints the reports, or compiles the sides and merges them into the
    topology's results file."""
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.worker_spec))
        print(oc.RESULT_MARKER + json.dumps(result), flush=True)
        return
    directory = Path(args.results_dir)
    if args.report:
        files = sorted(directory.glob(f"{RESULT_PREFIX}*.json"))
        if not files:
            sys.exit(f"--results_dir={args.results_dir}: no {RESULT_PREFIX}*.json; run it first")
        print("\n\n".join(report(json.loads(path.read_text())) for path in files))
        return
    from shortcut_jax import atomic_files

    out = results_path(args.topology, directory)

    def previous() -> dict[str, Any] | None:
        return json.loads(out.read_text()) if out.exists() else None

    header = results_header(args)
    try:
        planned = [
            {"side": side, "layout": layout} for side in args.sides for layout in args.layouts
        ]
        merge_results(previous(), {**header, "runs": planned})  # refused before compiling
    except ValueError as error:
        sys.exit(f"{out}: {error}")
    results = merge_results(previous(), measure(args, header))
    atomic_files.write_json(out, results)
    print(f"wrote {out}\n")
    print(report(results))


if __name__ == "__main__":
    main()
