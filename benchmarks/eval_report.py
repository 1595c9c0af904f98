"""Combine `python -m shortcut_jax.evaluate` results of several runs into one table and plot.

    python -m shortcut_jax.evaluate --workdir runs/benchmark/shortcut --num 2000 \
        --metrics fd_mnist,fid --out benchmarks/results/eval_mnist_shortcut
    python -m shortcut_jax.evaluate --workdir runs/benchmark/flow_matching --num 2000 \
        --metrics fd_mnist,fid --out benchmarks/results/eval_mnist_flow_matching
    python benchmarks/eval_report.py shortcut=benchmarks/results/eval_mnist_shortcut \
        flow_matching=benchmarks/results/eval_mnist_flow_matching \
        --plot docs/benchmarks/mnist_scores_vs_nfe.png

Prints the Markdown table (one row per run and step budget, floors and ceilings below it) and
writes the plot of every score against the number of function evaluations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortcut_jax.evaluators import report


def load(specs: list[str]) -> dict[str, dict]:
    """{label: report} from 'label=DIR' arguments (DIR holds an evaluate results.json)."""
    reports = {}
    for spec in specs:
        label, _, directory = spec.partition("=")
        if not directory:
            raise SystemExit(f"expected LABEL=DIR, got {spec!r}")
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no evaluate results (run python -m shortcut_jax.evaluate)")
        reports[label] = json.loads(path.read_text())
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=DIR with DIR/results.json")
    parser.add_argument("--plot", default=None, help="write the score-vs-NFE plot here (.png)")
    args = parser.parse_args()
    reports = load(args.runs)
    print(report.markdown_table(reports))
    for label, result in reports.items():
        settings = result["settings"]
        print(f"- {label}: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    if args.plot:
        report.plot(reports, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
