"""Benchmark: parameters and FLOPs per train step of the ImageNet 256 DiT-B/2 and DiT-XL/2 configs.

    python benchmarks/imagenet_flops.py            # -> benchmarks/results/imagenet_flops.json
    python benchmarks/imagenet_flops.py --quick    # tiny DiT at batch 16, lowered only (smoke)

From abstract arguments (nothing runs, nothing is allocated): the train step of
experiments/imagenet256.py at batch 256 on 32x32x4 latents, built by `compiled_step.build` as
the train loop builds it, lowered and (unless --xl_compile no for DiT-XL/2, or --quick) compiled
for this machine's CPU. Reports the cost analysis of the lowered and of the compiled program, the
matmul FLOPs read from the HLO, and the analytic matmul count (`hlo_flops.analytic_step_flops`)
with their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import hlo_flops  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import timing  # noqa: E402
import workloads  # noqa: E402

from shortcut_jax import models  # noqa: E402

PRESETS = ("DiT-B/2", "DiT-XL/2")


def abstract_cost(config: ml_collections.ConfigDict, compile_program: bool) -> dict[str, Any]:
    """Params and FLOPs of one train step of `config` from abstract arguments (nothing runs)."""
    mesh = workloads.single_device_mesh(config)
    abstract_state, step, *_ = workloads.build_state_and_step(config, mesh, abstract=True)
    start = time.perf_counter()
    lowered = step.lower(abstract_state, workloads.abstract_batch(config, mesh))
    lower_seconds = time.perf_counter() - start
    batch = int(config.batch_size)
    lowered_cost = timing.cost(lowered)
    split = hlo_flops.matmul_flops(lowered.as_text(dialect="hlo"))
    result = {
        "preset": config.model.preset,
        "model": hlo_flops.dit_dims(config),
        "dtype": config.model.dtype,
        "batch_size": batch,
        "num_params": models.count_params(abstract_state.params),
        "lower_seconds": lower_seconds,
        "lowered_cost_analysis": lowered_cost,
        "lowered_flops_per_image": lowered_cost["flops"] / batch,
        "matmul_flops_in_lowered_hlo": split["dot"] + split["convolution"],
        "analytic": hlo_flops.analytic_step_flops(config, hlo_flops.analytic_forward(config)),
    }
    if compile_program:
        start = time.perf_counter()
        compiled = lowered.compile()
        result["compile_seconds"] = time.perf_counter() - start
        compiled_cost = timing.cost(compiled)
        result["compiled_cost_analysis"] = compiled_cost
        result["compiled_flops_per_image"] = compiled_cost["flops"] / batch
        result["memory_cpu_program"] = timing.memory(compiled)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Counts both presets and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny DiT at batch 16 (smoke)")
    parser.add_argument("--out", default=str(RESULTS / "imagenet_flops.json"))
    parser.add_argument(
        "--xl_compile",
        choices=("yes", "no"),
        default="yes",
        help="compile the batch-256 DiT-XL/2 program (else the lowered cost analysis is used)",
    )
    args = parser.parse_args(argv)

    from shortcut_jax import atomic_files

    if not args.quick:  # compile times are results: never read them from a persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    batch = 16 if args.quick else 256
    results: dict[str, Any] = {"meta": timing.run_meta(args.quick), "imagenet_batch256": {}}
    for preset in PRESETS:
        compile_program = not args.quick and (preset == "DiT-B/2" or args.xl_compile == "yes")
        config = workloads.imagenet_config(preset, batch, quick=args.quick)
        entry = abstract_cost(config, compile_program)
        results["imagenet_batch256"][preset] = entry
        print(
            f"{preset} batch {batch} ({entry['dtype']}): {entry['num_params'] / 1e6:.1f} M params, "
            f"{entry['flops_per_step'] / 1e12:.2f} TFLOP/step ({entry['flops_source']}), "
            f"{entry['flops_per_image'] / 1e9:.1f} GFLOP/image",
            flush=True,
        )
    results["meta"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    atomic_files.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
