"""Evaluation reports: a JSON record, a Markdown table and a plot of score versus NFE.

A report is a dict (see `make_report`) with the run, the sampling settings, one description per
metric (reference, floor, ceiling) and one row per step budget. Several reports (e.g. shortcut
and flow matching trained on the same budget) can share a table and a plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shortcut_jax import atomic_files
from shortcut_jax.evaluators import registry


def make_report(
    *,
    rows: Sequence[Mapping[str, float]],
    metrics: Mapping[str, Mapping[str, Any]],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Bundles an evaluation's results.

    Args:
      rows: one dict per step budget from `sweep.sweep` (steps, nfe, seconds, scores).
      metrics: {metric name: `Metric.describe()`}.
      settings: run and sampling settings (workdir, checkpoint_step, num, cfg_scale, ...).

    Returns:
      {'settings': ..., 'metrics': ..., 'rows': [...]}, JSON-serialisable.
    """
    return {
        "settings": dict(settings),
        "metrics": {name: dict(value) for name, value in metrics.items()},
        "rows": [dict(row) for row in rows],
    }


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


# Keys of a sweep row that describe the budget rather than score it.
ROW_KEYS = ("steps", "nfe", "cfg", "seconds")


def markdown_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table: one row per (run, step budget), one column per score.

    Args:
      reports: {run label: report}; a single run may be given as {'': report}.

    Returns:
      The table, followed by one line per metric with its floor, ceiling and reference.
    """
    columns: list[str] = []
    for report in reports.values():
        for row in report["rows"]:
            for key in row:
                if key not in ROW_KEYS and key not in columns:
                    columns.append(key)
    labelled = any(label for label in reports)
    header = (
        (["run"] if labelled else [])
        + ["steps", "NFE", "CFG"]
        + columns
        + ["seconds (sampling + features)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in reports.items():
        for row in report["rows"]:
            cells = ([label] if labelled else []) + [str(row["steps"]), str(row["nfe"])]
            cells.append(_format(row.get("cfg")))
            cells += [_format(row.get(column)) for column in columns]
            cells.append(f"{row.get('seconds', float('nan')):.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    notes = []
    described = set()
    for report in reports.values():
        for name, info in report["metrics"].items():
            if name in described:
                continue
            described.add(name)
            weights = f" (weights {info['weights_digest']})" if info.get("weights_digest") else ""
            notes.append(
                f"- {registry.label(name)}: floor {_format(info.get('floor'))} "
                f"(two halves of the real set), ceiling {_format(info.get('ceiling'))} "
                f"(clipped noise); reference: {info.get('reference')}; "
                f"{info.get('feature_dim')}-d features of {info.get('network')}{weights}."
            )
    return "\n".join(lines + [""] + notes) + "\n"


def plot(reports: Mapping[str, Mapping[str, Any]], path: str | epath.PathLike) -> None:
    """Writes a PNG with one panel per metric: score versus NFE (log scale), floor and ceiling.

    Args:
      reports: {run label: report}.
      path: output .png path (local or gs://).
    """
    names: list[str] = []
    for report in reports.values():
        for name in report["metrics"]:
            if name not in names:
                names.append(name)
    figure = Figure(figsize=(5.0 * max(len(names), 1), 3.8), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=False):
        info = None
        for label, report in reports.items():
            rows = [row for row in report["rows"] if name in row]
            if not rows:
                continue
            info = info or report["metrics"].get(name)
            nfe = [row["nfe"] for row in rows]
            ax.plot(nfe, [row[name] for row in rows], marker="o", label=label or name)
        if info:
            if info.get("floor") is not None:
                ax.axhline(info["floor"], color="green", ls="--", lw=1, label="floor (real)")
            if info.get("ceiling") is not None:
                ax.axhline(info["ceiling"], color="gray", ls=":", lw=1, label="ceiling (noise)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("function evaluations (NFE)")
        ax.set_ylabel(registry.label(name) + " (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_files.atomic_path(path) as temporary, open(temporary, "wb") as f:
        figure.savefig(f, format="png")


def write(report: Mapping[str, Any], directory: str | epath.PathLike) -> dict[str, str]:
    """Writes results.json, results.md and scores_vs_nfe.png into `directory`, each atomically.

    Returns:
      {'json': path, 'markdown': path, 'plot': path}.
    """
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "results.json",
        "markdown": directory / "results.md",
        "plot": directory / "scores_vs_nfe.png",
    }
    atomic_files.write_json(paths["json"], report)
    settings = report["settings"]
    title = ", ".join(f"{key}={value}" for key, value in settings.items())
    atomic_files.write_text(
        paths["markdown"], f"Settings: {title}\n\n" + markdown_table({"": report})
    )
    plot({"": report}, paths["plot"])
    return {key: str(value) for key, value in paths.items()}
