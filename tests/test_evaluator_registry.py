"""The metric registry (evaluators.registry) is what validation, the sweep, reports and CLIs read.

Small and fast: a toy feature network stands in for the real ones, and no model is trained.
"""

from __future__ import annotations

import ast
import os
import runpy
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from tiny import REPO, run_module, tiny_mnist_config

from shortcut_jax import config_lib
from shortcut_jax.evaluators import features, registry, report, sweep

EVALUATOR_MODULES = ("features", "fid", "fd_mnist", "inception", "registry", "report", "sweep")


def toy_net() -> features.FeatureNet:
    """Features = the 2x2 average-pooled pixels."""

    def apply(params, images):
        pooled = jax.image.resize(images.mean(-1), (images.shape[0], 2, 2), "linear")
        return pooled.reshape(images.shape[0], -1) @ params

    return features.FeatureNet("toy", 4, jnp.eye(4), apply, batch_size=16)


@pytest.fixture
def no_inception(monkeypatch, tmp_path):
    """The default Inception weights path points at a file that does not exist."""
    missing = tmp_path / "absent_inception.npz"
    monkeypatch.setenv("SHORTCUT_JAX_INCEPTION", str(missing))
    return missing


def _toy2d_config():
    return runpy.run_path(str(REPO / "experiments" / "toy2d.py"))["get_config"]()


def test_every_evaluator_module_imports_first_in_a_fresh_process():
    # An import circle shows only when one of its modules is the first one imported; every
    # shortcut_jax module is dropped before each import so nothing is already half-loaded.
    script = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {EVALUATOR_MODULES!r}:
            for loaded in [m for m in sys.modules if m.startswith("shortcut_jax")]:
                del sys.modules[loaded]
            importlib.import_module("shortcut_jax.evaluators." + name)
            print("imported", name)
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [w for m in EVALUATOR_MODULES for w in ("imported", m)]


def _evaluator_imports(name: str) -> set[str]:
    """The evaluator modules `name` imports anywhere in its source (inside functions too)."""
    tree = ast.parse((REPO / "shortcut_jax" / "evaluators" / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "shortcut_jax.evaluators":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.removeprefix("shortcut_jax.evaluators."))
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("shortcut_jax.evaluators.") for alias in node.names}
    return found & set(EVALUATOR_MODULES)


def test_the_evaluator_modules_import_each_other_without_a_circle():
    # Deferred imports inside functions count: they are circles that merely fail later.
    graph = {name: _evaluator_imports(name) for name in EVALUATOR_MODULES}
    assert graph["sweep"] >= {"features", "fid"}  # the parse sees the imports
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in done:
            for imported in graph[name]:
                visit(imported, (*path, name))
            done.add(name)

    for name in EVALUATOR_MODULES:
        visit(name, ())


def test_auto_picks_what_fits_the_data_and_finds_its_file(no_inception):
    config = tiny_mnist_config()
    assert registry.auto_names(config) == ["fd_mnist"]
    no_inception.write_bytes(b"weights")  # only its existence matters here
    assert registry.auto_names(config) == ["fd_mnist", "fid"]
    config.data.name = "tfds"
    assert registry.auto_names(config) == ["fid"]
    fd_mnist_problem = registry.get("fd_mnist").data_problem(config)
    assert "embedded MNIST" in fd_mnist_problem and "'fid' instead" in fd_mnist_problem


def test_no_metric_for_points_says_why_for_every_metric(no_inception):
    config = _toy2d_config()
    assert registry.auto_names(config) == []
    message = registry.why_none_available(config)
    assert "fd_mnist: it scores images" in message
    assert str(no_inception) in message and "convert_inception" in message
    with pytest.raises(sweep.EvaluationError, match="2-D points"):
        sweep.metric_names(config)
    with pytest.raises(sweep.EvaluationError, match="cannot score this run: it scores images"):
        sweep.build_metrics(config, names=["fd_mnist"])


def test_unknown_names_are_refused_with_the_list(no_inception):
    with pytest.raises(sweep.EvaluationError, match=r"unknown metric 'lpips'.*'fd_mnist', 'fid'"):
        registry.get("lpips")
    with pytest.raises(sweep.EvaluationError, match="unknown metric"):
        sweep.load_feature_net(tiny_mnist_config(), "lpips")
    assert registry.split(" fid, ,fd_mnist ") == ["fid", "fd_mnist"]
    assert registry.unknown(["fid", "is", "fd_mnist"]) == ["is"]
    assert registry.label("fid") == "FID (Inception)" and registry.label("other") == "other"


def test_validation_reads_each_named_metric_needs_when_evaluating_periodically(no_inception):
    config = tiny_mnist_config(6)
    config.eval_every_steps = 6
    config.eval_metrics = "fd_mnist"
    config_lib.validate(config)
    config.eval_metrics = "fd_mnist,fid"
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    assert "config.eval_inception_path = '': config.eval_metrics names 'fid'" in str(error.value)
    assert str(no_inception) in str(error.value)

    points = _toy2d_config()
    points.eval_every_steps = 100
    points.eval_metrics = "fd_mnist"
    with pytest.raises(config_lib.ConfigError, match=r"config\.eval_metrics = 'fd_mnist': 'fd_m"):
        config_lib.validate(points)
    points.eval_metrics = "auto"
    with pytest.raises(config_lib.ConfigError, match=r"no metric available.*eval_every_steps = 0"):
        config_lib.validate(points)
    points.eval_every_steps = 0  # no periodic evaluation: nothing is needed
    config_lib.validate(points)


def test_a_new_metric_is_one_registry_entry(monkeypatch, no_inception):
    spec = registry.MetricSpec(
        name="toy_fd",
        label="Toy FD",
        load=lambda config: toy_net(),
        data_problem=lambda config: None,
        auto=False,
    )
    monkeypatch.setitem(registry.METRICS, "toy_fd", spec)
    config = tiny_mnist_config(6)
    config.eval_every_steps = 6
    config.eval_metrics = "toy_fd,fd_mnist"
    config.eval_ref_num = 40
    config_lib.validate(config)
    assert sweep.metric_names(config) == ["toy_fd", "fd_mnist"]
    assert sweep.metric_names(config, "auto") == ["fd_mnist"]  # auto=False keeps it out

    (metric,) = sweep.build_metrics(config, names=["toy_fd"], ceiling_num=8)
    assert metric.net.name == "toy" and metric.reference_features.shape == (40, 4)
    assert 0 < metric.floor < metric.ceiling
    table = report.markdown_table(
        {"": report.make_report(rows=[], metrics={"toy_fd": metric.describe()}, settings={})}
    )
    assert "- Toy FD: floor" in table


def test_the_clis_offer_every_registered_metric():
    evaluate = run_module("shortcut_jax.evaluate", "--helpshort")
    assert "a comma list of fd_mnist, fid" in evaluate.stdout
    stats = run_module("shortcut_jax.tools.fid_stats", "--helpshort")
    assert "<fd_mnist|fid>" in stats.stdout
