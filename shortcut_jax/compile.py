"""Compile a run's programs for a TPU slice on this host: do they fit, before renting it?

    python -m shortcut_jax.compile --config experiments/imagenet256.py:xl --topology v5p-32 \
        [--num_slices 1] [--programs train_latents,sample] [--sample_steps 1] \
        [--peak_fraction 0.4] [--json plan.json] [--config.batch_size=512 ...]

`--topology` is a Cloud TPU accelerator type (v4-8, v5litepod-16 or v5e-16, v5p-32, v6e-8, ...)
or a topology (v5e:4x4). Needs the TPU compiler (`pip install -e ".[tpu]"`), not a TPU: each
program is compiled by libtpu's compile-only client for the slice with the config's mesh. The
table gives per chip the arguments (parameters, optimizer state, EMA, batch), outputs not aliased
to donated inputs, temporaries and code against the chip's HBM, the FLOPs per call, and at
`--peak_fraction` of the chip's bf16 peak the step time, images/s, days and chip-hours of
`config.total_steps`. NVIDIA GPUs work the same way with jax's CUDA plugin
(`pip install -e ".[gpu-compile]"`, no GPU needed): `--topology h100-8` (one host of 8 H100 80GB
SXM), `h100-16` (two hosts), `a100-8`; see `shortcut_jax.gpu_compile`.

Exit status: 0 when every program fits, 1 when one does not (one line each: how far over, and
what would help) or --json cannot be written, 2 for bad input: flags, topology, program names or a
config that cannot be compiled (`shortcut_jax.cli_inputs` has the rule every CLI follows).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from shortcut_jax import aot, cli_inputs, config_lib, sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, cli_inputs.CONFIG_FLAG_HELP, lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "TPU accelerator type (v5p-32, v5litepod-16, v4-8), TPU topology (v5e:4x4) or GPUs (h100-8).",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network.")
_PROGRAMS = flags.DEFINE_list(
    "programs",
    None,
    f"Comma-separated programs from {', '.join(aot.PROGRAMS)}; default: all the run has.",
)
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 1, "k of the sampler and the evaluation.")
_PEAK_FRACTION = flags.DEFINE_float(
    "peak_fraction", 0.4, "Fraction of the chip's bf16 peak assumed for the time estimates."
)
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
flags.mark_flags_as_required(["config", "topology"])


def estimates(report: aot.Report, program: aot.ProgramReport, fraction: float) -> dict[str, Any]:
    """Seconds per call, images/s, and for train steps days and chip-hours of total_steps."""
    chip = report.slice.chip
    if not program.flops or fraction <= 0:
        return {}
    seconds = program.flops / (chip.peak_bf16_tflops * 1e12 * fraction)
    out: dict[str, Any] = {"seconds": seconds, "images_per_second": program.batch / seconds}
    if program.name.startswith("train"):
        total = int(report.config.total_steps) * seconds
        out["days"] = total / 86_400
        out["chip_hours"] = total / 3_600 * report.slice.num_chips
    return out


def advice(report: aot.Report, program: aot.ProgramReport) -> str:
    """What would make a program that does not fit fit, from where its memory goes."""
    config = report.config
    chip = report.slice.chip
    mesh = report.mesh_shape
    hints = []
    if program.error:
        state_heavy = program.over_what != "temporaries"
    else:
        state_heavy = program.argument_bytes > 0.4 * program.total_bytes
    if program.name.startswith("train") and state_heavy:
        fsdp = mesh.get("fsdp", 1)
        larger = min(report.slice.num_chips, max(fsdp * 2, 4))
        if larger > fsdp:
            hints.append(
                f"shard parameters, Adam moments and EMA over more chips: --config.mesh.fsdp="
                f"{larger} --config.mesh.data=-1 (now fsdp={fsdp})"
            )
    if config.model.get("remat", "none") != "full" and program.name.startswith("train"):
        better = "dots" if config.model.get("remat", "none") == "none" else "full"
        hints.append(f"rematerialise activations: --config.model.remat={better}")
    per_chip = program.batch / max(mesh.get("data", 1) * mesh.get("fsdp", 1), 1)
    if per_chip > 1:
        hints.append(
            f"fewer examples per chip (now {per_chip:g}): a smaller --config."
            + ("batch_size" if program.name.startswith("train") else "eval_batch_size")
            + " or a larger slice"
        )
    if chip.name in aot.CHIPS and chip.hbm_gib < max(c.hbm_gib for c in aot.CHIPS.values()):
        hints.append("a chip with more HBM (v5p: 95 GiB)")
    return "; ".join(hints)


def chip_label(chip: aot.Chip) -> str:
    """'TPU v5e' or 'NVIDIA H100'."""
    return f"TPU {chip.name}" if chip.name in aot.CHIPS else f"NVIDIA {chip.name.upper()}"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / aot.GiB:.2f}"


def format_table(report: aot.Report, fraction: float) -> str:
    """The report as a fixed-width table with the verdict lines under it."""
    tpu = report.slice
    hbm = tpu.chip.usable_hbm_gib
    config = report.config
    lines = [
        f"{tpu.name}: {tpu.num_chips} x {chip_label(tpu.chip)} ({tpu.topology}"
        + (f", {tpu.num_slices} slices" if tpu.num_slices > 1 else "")
        + f"; {tpu.num_hosts} hosts), {tpu.chip.hbm_gib:g} GiB HBM ({hbm:g} usable by a program) "
        f"and {tpu.chip.peak_bf16_tflops:g} bf16 "
        f"TFLOP/s per chip; mesh {report.mesh_shape}; {report.num_params / 1e6:.1f} M parameters; "
        f"model.dtype {config.model.dtype}, remat {config.model.get('remat', 'none')}",
        f"estimates at {fraction:.0%} of the bf16 peak; sampler k = {report.sample_steps}; "
        "memory per chip in GiB",
        "",
    ]
    header = ["program", "batch", "args", "out", "temp", "code", "total", "of usable"]
    header += ["TFLOP", "s/call", "img/s", "days", "chip-h", "compile s"]
    rows: list[list[str]] = [header]
    problems = []
    for program in report.programs:
        cells = [program.name, str(program.batch)]
        if program.error:
            rows.append(cells)
            refusal = (
                f"{program.over_what or 'memory'} {program.over_gib:.2f} GiB over the usable HBM"
                if program.over_gib
                else program.error[:100]
            )
            cells.append(f"refused by the compiler: {refusal}")
            problems.append(program)
            continue
        est = estimates(report, program, fraction)
        share = program.total_bytes / (hbm * aot.GiB)
        cells += [
            _gib(program.argument_bytes),
            _gib(program.output_bytes - program.alias_bytes),
            _gib(program.temp_bytes),
            _gib(program.code_bytes),
            _gib(program.total_bytes),
            f"{share:.0%}",
            f"{program.flops / 1e12:.3g}",
            f"{est.get('seconds', 0):.3g}",
            f"{est.get('images_per_second', 0):,.0f}",
            f"{est['days']:.3g}" if "days" in est else "",
            f"{est['chip_hours']:,.0f}" if "days" in est else "",
            f"{program.compile_seconds:.0f}",
        ]
        rows.append(cells)
        if share > 1:
            problems.append(program)
    widths = [
        max(len(r[i]) for r in rows if len(r) > i and len(r) == len(header))
        for i in range(len(header))
    ]
    for cells in rows:
        if len(cells) != len(header):  # a refused program: its sentence after name and batch
            lines.append(f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]}")
            continue
        lines.append(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
            )
        )
    lines.append("")
    for program in problems:
        if program.error:
            what = f" for {program.over_what}" if program.over_what else ""
            over = f"at least {program.over_gib:.2f} GiB more{what} than"
        else:
            over = f"{program.total_bytes / aot.GiB - hbm:.2f} GiB more than"
        lines.append(
            f"DOES NOT FIT: {program.name} ({program.description}) needs {over} the usable HBM "
            f"of a {chip_label(tpu.chip)} ({hbm:g} GiB); try: {advice(report, program)}"
        )
    if not problems:
        lines.append(f"fits: every program fits the {hbm:g} usable GiB of a {chip_label(tpu.chip)}")
    return "\n".join(lines)


def fits(report: aot.Report) -> bool:
    """True when every program compiled and fits the chip's HBM."""
    hbm = report.slice.chip.usable_hbm_gib * aot.GiB
    return all(not p.error and p.total_bytes <= hbm for p in report.programs)


def to_json(report: aot.Report, fraction: float) -> dict[str, Any]:
    """The report as plain JSON data."""
    tpu = report.slice
    return {
        "topology": tpu.name,
        "compiler_topology": tpu.topology,
        "num_slices": tpu.num_slices,
        "chips": tpu.num_chips,
        "hosts": tpu.num_hosts,
        "chip": vars(tpu.chip),
        "mesh": report.mesh_shape,
        "num_params": report.num_params,
        "peak_fraction": fraction,
        "sample_steps": report.sample_steps,
        "fits": fits(report),
        "config": json.loads(config_lib.to_json(report.config)),
        "programs": [
            {
                **{k: v for k, v in vars(p).items()},
                "total_bytes": p.total_bytes,
                "total_gib": p.total_bytes / aot.GiB,
                "estimates": estimates(report, p, fraction),
                "advice": ""
                if p.total_bytes <= tpu.chip.usable_hbm_gib * aot.GiB and not p.error
                else advice(report, p),
            }
            for p in report.programs
        ],
    }


def run(config: Any, topology: str, **options: Any) -> tuple[aot.Report, str]:
    """Validates, resolves the slice, compiles; returns the report and its table."""
    num_slices = int(options.get("num_slices", 1))
    tpu = aot.resolve_slice(topology, num_slices)
    config_lib.validate(config, device_count=tpu.num_chips, check_files=False)
    fraction = float(options.get("peak_fraction", 0.4))

    def progress(name: str) -> None:
        print(f"compiling {name} for {tpu.name} ...", file=sys.stderr, flush=True)

    report = aot.compile_programs(
        config,
        tpu,
        options.get("programs"),
        sample_steps=int(options.get("sample_steps", 1)),
        progress=progress,
    )
    return report, format_table(report, fraction)


def main(argv: list[str]) -> None:
    """Compiles, prints the table, writes --json; exit 1 when something does not fit."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with cli_inputs.errors_as_one_line(
        OSError,  # --json cannot be written
        usage=(aot.AotError, config_lib.ConfigError, sharding.ShardingError),
    ):
        fits_all = _compile()
    sys.exit(0 if fits_all else 1)


def _compile() -> bool:
    """Checks the flags, compiles, prints the table, writes --json; True when all fits."""
    if _PEAK_FRACTION.value <= 0 or _PEAK_FRACTION.value > 1:
        raise cli_inputs.InputError(f"--peak_fraction={_PEAK_FRACTION.value} must be in (0, 1]")
    if _SAMPLE_STEPS.value < 1:
        raise cli_inputs.InputError(f"--sample_steps={_SAMPLE_STEPS.value} must be >= 1")
    # A compile-only client cannot load executables from the persistent cache: never use it here.
    jax.config.update("jax_enable_compilation_cache", False)
    report, table = run(
        _CONFIG.value,
        _TOPOLOGY.value,
        num_slices=_NUM_SLICES.value,
        programs=_PROGRAMS.value,
        sample_steps=_SAMPLE_STEPS.value,
        peak_fraction=_PEAK_FRACTION.value,
    )
    print(table)
    if _JSON.value:
        from shortcut_jax import atomic_files

        atomic_files.write_json(_JSON.value, to_json(report, _PEAK_FRACTION.value))
    return fits(report)


if __name__ == "__main__":
    cli_inputs.run(main)
