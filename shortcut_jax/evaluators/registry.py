"""The evaluation metrics, one entry per name: a feature network and what it needs.

Each `MetricSpec` says how reports label the metric, how its feature network is loaded, which data
it can score, which file it needs on disk (and the command that makes it), whether reference
statistics from a file may replace the reference taken from the data, and whether 'auto' picks
it. Config validation (`config_lib`), the sweep (`sweep.metric_names`, `sweep.build_metrics`,
`sweep.load_feature_net`), the reports and the CLIs (`evaluate`, `tools.fid_stats`) read this
table and nothing else, so a new metric is one entry in `METRICS` (plus its network's module).

The feature network modules are imported only when a network is loaded, so reading the table
(as config validation does) costs nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import ml_collections

if TYPE_CHECKING:
    from shortcut_jax.evaluators import features

Config = ml_collections.ConfigDict


class EvaluationError(RuntimeError):
    """The evaluation cannot run as configured (unknown metric, missing weights, wrong data)."""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One evaluation metric.

    Attributes:
      name: the name in config.eval_metrics, --metrics, result rows and scalar tags.
      label: the name in report tables and plot axes.
      load: ``load(config) -> features.FeatureNet``; raises a `features.WeightsError` naming the
        file when the network's weights are missing or broken.
      data_problem: ``data_problem(config) -> None`` when the metric can score the run's data,
        else a sentence saying why not and what to use instead.
      weights_field: the config field holding the path of the file the network needs ('' = it
        needs none; the path '' in that field means `default_weights_path()`).
      default_weights_path: ``() -> str``, the file used when the field is ''.
      weights_command: the command that makes that file.
      uses_ref_stats: whether config.eval_ref_stats (--ref_stats), mu and sigma of this network's
        features in a file, replaces the reference computed from the run's data.
      auto: whether 'auto' picks the metric when its data fits and its file exists.
    """

    name: str
    label: str
    load: Callable[[Config], features.FeatureNet]
    data_problem: Callable[[Config], str | None]
    weights_field: str = ""
    default_weights_path: Callable[[], str] | None = None
    weights_command: str = ""
    uses_ref_stats: bool = False
    auto: bool = True


def _image_problem(config: Config) -> str | None:
    """Why the run's data are not images a feature network can take (None if they are)."""
    if config.data.name == "toy2d":
        return "it scores images; config.data.name='toy2d' gives 2-D points"
    channels = config.data.get("channels", None)
    if channels not in (1, 3):
        return f"it needs 1- or 3-channel images; config.data.channels={channels}"
    return None


def _fd_mnist_data_problem(config: Config) -> str | None:
    problem = _image_problem(config)
    if problem is None and config.data.name != "mnist_embedded":
        problem = (
            "it compares against the embedded MNIST digits; "
            f"config.data.name={config.data.name!r} needs 'fid' instead"
        )
    return problem


def _load_fd_mnist(config: Config) -> features.FeatureNet:
    del config  # the classifier ships with the package, whatever the run
    from shortcut_jax.evaluators import fd_mnist

    return fd_mnist.feature_net()


def _inception_default_path() -> str:
    from shortcut_jax.evaluators import inception

    return str(inception.default_weights_path())


def _load_inception(config: Config) -> features.FeatureNet:
    from shortcut_jax.evaluators import inception

    return inception.feature_net(weights_path(METRICS["fid"], config))


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            name="fd_mnist",
            label="FD-MNIST",
            load=_load_fd_mnist,
            data_problem=_fd_mnist_data_problem,
        ),
        MetricSpec(
            name="fid",
            label="FID (Inception)",
            load=_load_inception,
            data_problem=_image_problem,
            weights_field="eval_inception_path",
            default_weights_path=_inception_default_path,
            weights_command="python -m shortcut_jax.tools.convert_inception",
            uses_ref_stats=True,
        ),
    )
}


def names() -> tuple[str, ...]:
    """Every metric name, in table order."""
    return tuple(METRICS)


def split(requested: str) -> list[str]:
    """The names of a comma-separated list ('fid, fd_mnist' -> ['fid', 'fd_mnist'])."""
    return [name.strip() for name in requested.split(",") if name.strip()]


def unknown(requested: list[str]) -> list[str]:
    """The names in `requested` that are not metrics."""
    return [name for name in requested if name not in METRICS]


def get(name: str) -> MetricSpec:
    """The entry of metric `name`; `EvaluationError` listing the names if there is none."""
    if name not in METRICS:
        raise EvaluationError(f"unknown metric {name!r}; allowed: {list(METRICS)}")
    return METRICS[name]


def label(name: str) -> str:
    """The report label of metric `name` (the name itself for metrics not in the table)."""
    return METRICS[name].label if name in METRICS else name


def weights_path(spec: MetricSpec, config: Config) -> str | None:
    """The file `spec`'s network reads for this run (None when it needs none)."""
    if not spec.weights_field:
        return None
    return config.get(spec.weights_field) or spec.default_weights_path()


def missing_weights(spec: MetricSpec, config: Config) -> str | None:
    """A sentence naming the missing file and the command that makes it (None if present)."""
    from etils import epath

    path = weights_path(spec, config)
    if path is None or epath.Path(path).is_file():
        return None
    return (
        f"it needs the file config.{spec.weights_field} names, {path} (make it with "
        f"`{spec.weights_command}`, see its --help)"
    )


def problems(spec: MetricSpec, config: Config) -> list[str]:
    """Everything that keeps `spec` from scoring this run: its data, then its file."""
    found = [spec.data_problem(config), missing_weights(spec, config)]
    return [problem for problem in found if problem]


def auto_names(config: Config) -> list[str]:
    """What 'auto' means for this run: every `auto` metric whose data fit and whose file exists."""
    return [spec.name for spec in METRICS.values() if spec.auto and not problems(spec, config)]


def why_none_available(config: Config) -> str:
    """For an 'auto' that found nothing: each metric with what keeps it from this run."""
    reasons = []
    for spec in METRICS.values():
        found = problems(spec, config) if spec.auto else ["'auto' never picks it"]
        reasons.append(f"{spec.name}: {'; '.join(found)}")
    return "no metric available for this run (" + " | ".join(reasons) + ")"
