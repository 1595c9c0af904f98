"""Benchmark: variants of the MNIST default's training budget, trained and scored as a user would.

    python benchmarks/budget_sweep.py --workdir /tmp/sweep \
        --variant 'lr1e-3:total_steps=7000,optim.learning_rate=1e-3' \
        --variant 'boot4:total_steps=7000,bootstrap_every=4' --parallel 2
    python benchmarks/budget_sweep.py --quick --workdir /tmp/sweep_quick   # smoke run

Each variant is `name:field=value,...`: overrides of `experiments/mnist.py` passed to
`python -m shortcut_jax.main` as `--config.field=value`. Its run is then scored by
`python -m shortcut_jax.evaluate` (FD-MNIST of `--num` samples at `--steps`, the EMA parameters,
seed 0, the run's CFG), so every number is what those two commands print for a user.

Periodic evaluation is off (`eval_every_steps=0`) unless a variant sets it, as a timed run of the
shipped config does. Per variant the JSON holds the overrides, the training wall time, CPU time and
peak resident memory of the main process, the median train images/s of its log intervals, and the
scores. With `--parallel 2` two variants train at once on the machine's cores: their quality is
unaffected but their wall times are not the time of a run alone (`concurrent` records it); time
a chosen variant alone.
Results: benchmarks/results/budget_sweep.json (merged by variant name across invocations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_runs import (  # noqa: E402
    ROOT,
    config_commit,
    evaluate_command,
    evaluation_rows,
    images_per_second,
    run_timed,
    train_command,
)

RESULTS = ROOT / "benchmarks" / "results"
__all__ = ["images_per_second", "main", "parse_variant", "run_variant"]
QUICK_OVERRIDES = (
    "total_steps=40,optim.warmup_steps=5,model.hidden_size=32,model.depth=1,model.num_heads=2,"
    "log_every_steps=10,checkpoint_every_steps=40,sample_every_steps=0,sample_num=8"
)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name:a=1,b.c=2' -> ('name', {'a': '1', 'b.c': '2'})."""
    name, _, body = text.partition(":")
    if not name or not body:
        raise ValueError(f"--variant {text!r}: expected 'name:field=value,...'")
    overrides = {}
    for part in body.split(","):
        field, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--variant {text!r}: {part!r} is not field=value")
        overrides[field.strip()] = value.strip()
    return name, overrides


def run_variant(
    name: str, overrides: dict[str, str], args: argparse.Namespace, concurrent: bool
) -> dict[str, Any]:
    """Trains one variant with shortcut_jax.main, scores it with shortcut_jax.evaluate."""
    workdir = Path(args.workdir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    all_overrides = {"eval_every_steps": "0", **overrides}
    train = train_command(workdir, all_overrides)
    print(f"[{name}] training: {' '.join(train[2:])}", flush=True)
    training = run_timed(train, workdir / "train.log")
    out = workdir / "scores"
    steps = [int(count) for count in args.steps.split(",")]
    cache_dir = Path(args.workdir) / "reference_cache"
    evaluate = evaluate_command(workdir, out, steps, args.num, cache_dir)
    print(f"[{name}] scoring", flush=True)
    scoring = run_timed(evaluate, workdir / "evaluate.log")
    scores = {
        str(count): {key: row[key] for key in ("fd_mnist", "fd_mnist/precision", "fd_mnist/recall")}
        for count, row in evaluation_rows(out).items()
    }
    result = {
        "base_config": f"experiments/mnist.py of commit {config_commit()}",
        "overrides": all_overrides,
        "concurrent": concurrent,
        "train": training,
        "train_images_per_second_median": images_per_second(workdir / "train.log"),
        "evaluate": scoring,
        "fd_mnist_by_steps": scores,
    }
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the variants, merges them into the JSON results file and returns its content."""
    sys.path.insert(0, str(ROOT))
    from shortcut_jax import atomic_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="where the runs go (outside the repo)")
    parser.add_argument("--variant", action="append", default=[], help="name:field=value,...")
    parser.add_argument("--parallel", type=int, default=1, help="variants trained at once")
    parser.add_argument("--num", type=int, default=1000, help="samples per step budget")
    parser.add_argument("--steps", default="1,128", help="step budgets scored")
    parser.add_argument("--quick", action="store_true", help="one tiny variant (smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "budget_sweep.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.variant = [f"quick:{QUICK_OVERRIDES}"]
        args.num, args.steps = 16, "1,2"
    variants = dict(parse_variant(text) for text in args.variant)
    if not variants:
        parser.error("give at least one --variant (or --quick)")
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = {
            name: pool.submit(run_variant, name, overrides, args, args.parallel > 1)
            for name, overrides in variants.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    output: dict[str, Any] = {"variants": {}}
    if os.path.exists(args.out) and not args.quick:
        output = json.loads(Path(args.out).read_text())
    output["variants"].update(results)
    output.setdefault("runs", []).append(
        {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "variants": list(variants),
            "parallel": args.parallel,
            "load_average_at_end": list(os.getloadavg()),
        }
    )
    atomic_files.write_json(args.out, output)
    print(f"wrote {args.out}")
    return output


if __name__ == "__main__":
    main()
