"""Pod planning: the paper configs' train step compiled for real TPU slices on this CPU host.

    python benchmarks/pod_plan.py --rows b2-v5e-16,xl-v5e-16     # compile those rows
    python benchmarks/pod_plan.py --rows all                     # every row not yet measured
    python benchmarks/pod_plan.py --report                       # Markdown table of the results

Each row runs `python -m shortcut_jax.compile` (the command users run) for one config, slice and
settings, program `train_latents` (the train step on precomputed latents; `--programs` for
others), and keeps its JSON in benchmarks/results/pod_plan/ROW.json with the commit, the exact
command and the wall time. A row whose file exists is skipped (`--force` recompiles), so the study
runs over several sittings. The report adds:
  - the analytic matmul FLOPs of the step (`hlo_flops.analytic_step_flops`: student forward +
    backward ~ 3 forwards of the batch, the teacher's forwards on the bootstrap part) beside XLA's
    TPU count times the chips (XLA also counts the elementwise work);
  - the largest batch that would fit, estimated linearly from the row's own compile: the state
    (arguments less the batch) stays, temporaries and the batch grow with examples per chip.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OUT_DIR = ROOT / "benchmarks" / "results" / "pod_plan"
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Row:
    """One compile: a config (file:variant), a slice and the overrides that differ."""

    name: str
    config: str
    topology: str
    overrides: tuple[str, ...] = ()
    programs: str = "train_latents"
    num_slices: int = 1


_IN = "experiments/imagenet256.py"
ROWS: tuple[Row, ...] = (
    # The shipped variants at batch 256 on the slices of the README.
    Row("b2-v5e-16", f"{_IN}:b2", "v5litepod-16"),
    Row("xl-v5e-16", f"{_IN}:xl", "v5litepod-16"),
    Row("b2-v5p-8", f"{_IN}:b2", "v5p-8"),
    Row("xl-v5p-8", f"{_IN}:xl", "v5p-8"),
    Row("b2-v4-8", f"{_IN}:b2", "v4-8"),
    Row("xl-v4-8", f"{_IN}:xl", "v4-8"),
    Row("b2-v6e-8", f"{_IN}:b2", "v6e-8"),
    Row("xl-v6e-8", f"{_IN}:xl", "v6e-8"),
    Row("b2-v5p-32", f"{_IN}:b2", "v5p-32"),
    Row("xl-v5p-32", f"{_IN}:xl", "v5p-32"),
    # What the shipped settings replace: XL/2 data parallel (state replicated on every chip).
    Row(
        "xl-v5e-16-data",
        f"{_IN}:xl",
        "v5litepod-16",
        ("--config.mesh.data=-1", "--config.mesh.fsdp=1"),
    ),
    # Smaller slices, with the settings that make them fit.
    Row("b2-v5e-4", f"{_IN}:b2", "v5litepod-4"),
    Row("xl-v5e-8", f"{_IN}:xl", "v5litepod-8"),
    Row("xl-v5e-4-remat", f"{_IN}:xl", "v5litepod-4", ("--config.model.remat=full",)),
    Row("b2-v5e-1-remat", f"{_IN}:b2", "v5litepod-1", ("--config.model.remat=full",)),
    Row("b2-v6e-1", f"{_IN}:b2", "v6e-1"),
    Row("xl-v6e-1-remat", f"{_IN}:xl", "v6e-1", ("--config.model.remat=full",)),
    Row("xl-v6e-4", f"{_IN}:xl", "v6e-4"),
    # Every program of a run (train steps on latents and with the VAE encode, the sampler at the
    # config's eval batch, the VAE decode), for one variant of each paper config.
    Row(
        "b2-v5e-16-programs",
        f"{_IN}:b2",
        "v5litepod-16",
        programs="train_latents,train_online,sample,decode",
    ),
    Row(
        "celebahq-xl-v5p-8-programs",
        "experiments/celebahq256.py:xl",
        "v5p-8",
        programs="train_latents,train_online,sample,decode",
    ),
    # Two v5e-16 slices over the data-center network.
    Row(
        "b2-2xv5e-16",
        f"{_IN}:b2",
        "v5litepod-16",
        ("--config.mesh.data=2", "--config.mesh.fsdp=-1"),
        num_slices=2,
    ),
)


def git_commit() -> str:
    """The commit of the checkout, with '+dirty' when tracked files differ from it."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def command(row: Row, out: Path) -> list[str]:
    """The `python -m shortcut_jax.compile` command of a row."""
    return [
        sys.executable,
        "-m",
        "shortcut_jax.compile",
        f"--config={row.config}",
        f"--topology={row.topology}",
        f"--num_slices={row.num_slices}",
        f"--programs={row.programs}",
        f"--json={out}",
        *row.overrides,
    ]


def measure(row: Row, out_dir: Path, force: bool = False) -> dict[str, Any] | None:
    """Compiles one row (unless its result exists) and returns its result."""
    out = out_dir / f"{row.name}.json"
    if out.exists() and not force:
        print(f"{row.name}: kept {out}", flush=True)
        return json.loads(out.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = command(row, out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    print(f"{row.name}: {' '.join(argv[1:])}", flush=True)
    start = time.time()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode not in (0, 1) or not out.exists():
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
        raise RuntimeError(f"{row.name}: the compile command failed ({result.returncode})")
    print(result.stdout, flush=True)
    data = json.loads(out.read_text())
    data["row"] = dataclasses.asdict(row)
    data["commit"] = git_commit()
    data["command"] = " ".join(["python", *argv[1:]]).replace(f" --json={out}", "")
    data["wall_seconds"] = wall
    from shortcut_jax import atomic_files

    atomic_files.write_json(out, data)
    return data


def analytic_tflop_per_step(config: dict[str, Any]) -> float:
    """Matmul TFLOP of one shortcut train step of the config (whole slice)."""
    import hlo_flops

    from shortcut_jax import config_lib, latent_space

    full = config_lib.from_json(json.dumps(config))
    dims = hlo_flops.dit_dims(full)
    height, _, channels = latent_space.model_shape(full)
    forward = hlo_flops.analytic_dit_forward_flops(
        height,
        channels,
        dims["hidden_size"],
        dims["depth"],
        dims["patch_size"],
        float(full.model.mlp_ratio),
    )
    return hlo_flops.analytic_step_flops(full, forward)["matmul_flops_per_step"] / 1e12


def largest_batch(data: dict[str, Any]) -> int:
    """The largest global batch that fits, by a linear fit of memory in examples per chip.

    The state (arguments less the batch) and the code stay; the batch input and the temporaries
    grow in proportion to the examples per chip. Rounded down to a multiple of 8 per batch shard.
    """
    program = data["programs"][0]
    if program["error"]:
        return 0
    config = data["config"]
    shards = data["mesh"]["data"] * data["mesh"]["fsdp"]
    per_chip = config["batch_size"] / shards
    latent = config["data"]["image_size"] // config["vae"]["downsample_factor"]
    example_input = latent * latent * config["vae"]["latent_channels"] * 4 + 4
    fixed = (
        program["argument_bytes"]
        - per_chip * example_input
        + program["code_bytes"]
        + program["output_bytes"]
        - program["alias_bytes"]
    )
    per_example = program["temp_bytes"] / per_chip + example_input
    usable = data["chip"]["usable_hbm_gib"] * GIB
    fit = math.floor((usable - fixed) / per_example)
    return max(fit // 8 * 8, 0) * shards


def report(out_dir: Path) -> str:
    """A Markdown table of every row measured."""
    lines = [
        "| row | slice | mesh (data x fsdp) | remat | params | batch | args GiB | temp GiB | "
        "total GiB / usable | fits | TFLOP/chip/step | XLA / analytic | img/s at 40 % | "
        "days / chip-h (steps) | largest batch (est.) | compile |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        path = out_dir / f"{row.name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        config, program = data["config"], data["programs"][0]
        mesh = data["mesh"]
        slices = f" x {data['num_slices']}" if data.get("num_slices", 1) > 1 else ""
        usable = data["chip"]["usable_hbm_gib"]
        head = (
            f"| {row.name} | {row.topology}{slices} ({data['chips']} chips) | "
            f"{mesh['data']} x {mesh['fsdp']} | {config['model'].get('remat', 'none')} | "
            f"{data['num_params'] / 1e6:.1f} M | {config['batch_size']} |"
        )
        if program["error"]:
            lines.append(
                f"{head} - | - | over by >= {program['over_gib']:.1f} "
                f"({program.get('over_what') or 'memory'}) / {usable:g} | no | - | - | - | - | - |"
                f" {data.get('wall_seconds', 0) / 60:.1f} min |"
            )
            continue
        est = program["estimates"]
        flops_total = program["flops"] * data["chips"] / 1e12
        analytic = analytic_tflop_per_step(config)
        lines.append(
            f"{head} {program['argument_bytes'] / GIB:.2f} | {program['temp_bytes'] / GIB:.2f} | "
            f"{program['total_gib']:.2f} / {usable:g} | "
            f"{'yes' if program['total_gib'] <= usable else 'no'} | "
            f"{program['flops'] / 1e12:.2f} | {flops_total:.1f} / {analytic:.1f} "
            f"({flops_total / analytic - 1:+.1%}) | {est['images_per_second']:,.0f} | "
            f"{est['days']:.1f} / {est['chip_hours']:,.0f} ({config['total_steps']:,}) | "
            f"{largest_batch(data):,} | {data.get('wall_seconds', 0) / 60:.1f} min |"
        )
    programs = [
        "",
        "Every program of a run (memory per chip in GiB; FLOPs per chip per call; the sampler at "
        "k = 1 step, at the config's eval batch):",
        "",
        "| row | slice | program | batch | args | outputs not aliased | temp | total / usable | "
        "TFLOP/chip/call | compile |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        path = out_dir / f"{row.name}.json"
        if "," not in row.programs or not path.exists():
            continue
        data = json.loads(path.read_text())
        for program in data["programs"]:
            memory = (
                f"{program['argument_bytes'] / GIB:.2f} | "
                f"{(program['output_bytes'] - program['alias_bytes']) / GIB:.2f} | "
                f"{program['temp_bytes'] / GIB:.2f} | {program['total_gib']:.2f} / "
                f"{data['chip']['usable_hbm_gib']:g}"
                if not program["error"]
                else f"- | - | - | over by >= {program['over_gib']:.1f}"
            )
            programs.append(
                f"| {row.name} | {row.topology} | {program['name']} | {program['batch']} | "
                f"{memory} | {program['flops'] / 1e12:.3g} | {program['compile_seconds']:.0f} s |"
            )
    if len(programs) > 6:
        lines += programs
    commits = sorted({json.loads(p.read_text()).get("commit", "?") for p in out_dir.glob("*.json")})
    lines.append("")
    lines.append(f"Measured at commit(s) {', '.join(commits)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated row names, or 'all'")
    parser.add_argument("--out_dir", default=str(OUT_DIR))
    parser.add_argument("--force", action="store_true", help="recompile rows already measured")
    parser.add_argument("--report", action="store_true", help="print the Markdown table")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    by_name = {row.name: row for row in ROWS}
    names = list(by_name) if args.rows == "all" else [n for n in args.rows.split(",") if n]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(by_name)}")
    for name in names:
        measure(by_name[name], out_dir, args.force)
    if args.report or not names:
        print(report(out_dir))


if __name__ == "__main__":
    main()
