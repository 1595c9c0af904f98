"""The notebooks under notebooks/ run top to bottom on a tiny run and draw their figures.

Each notebook runs in a fresh kernel of this interpreter (a kernelspec written to a temporary
directory, so nothing is registered globally) with the cell tagged "parameters" replaced by the
test's values, the way papermill injects parameters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from shortcut_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL_NAME = "shortcut_jax_test"
CELL_TIMEOUT = 300  # seconds
FIGURE_CALL = "save_figure(fig, "  # cells that draw a figure call save_figure(fig, ...)


def parameter_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The one code cell tagged "parameters"."""
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def execute(name: str, parameters: dict, kernel_dir: Path) -> nbformat.NotebookNode:
    """Runs notebooks/<name>.ipynb with `parameters` injected; returns the executed notebook."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    parameter_cell(notebook).source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    manager = AsyncKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT, allow_errors=False)
    # This checkout first on the path, whatever is installed; the conftest's JAX settings
    # (CPU, compilation cache) reach the kernel through the environment.
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    client.execute(cwd=str(NOTEBOOKS), env={**os.environ, "PYTHONPATH": python_path})
    return notebook


def outputs_of(cell: nbformat.NotebookNode) -> set[str]:
    """Output types and MIME types of a code cell, e.g. {'stream', 'image/png'}."""
    kinds = set()
    for output in cell.get("outputs", []):
        kinds.add(output.output_type)
        kinds.update(output.get("data", {}))
    return kinds


def assert_figures_drawn(notebook: nbformat.NotebookNode, min_figure_cells: int) -> None:
    """No cell failed, and every cell that saves a figure also displayed it as a PNG."""
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in code_cells:
        assert "error" not in outputs_of(cell), cell.source
    figure_cells = [cell for cell in code_cells if FIGURE_CALL in cell.source]
    assert len(figure_cells) >= min_figure_cells
    for cell in figure_cells:
        assert "image/png" in outputs_of(cell), f"no image/png output from:\n{cell.source}"


def keep_only_the_ema(workdir: Path) -> None:
    """Deletes every array but the EMA parameters from the checkpoints of `workdir` (the keys of
    their OCDBT databases): what reads the optimizer state or the raw parameters then fails."""
    import tensorstore as ts

    manager = checkpoint.make_manager(str(workdir))
    steps = manager.all_steps()
    manager.close()
    assert steps, f"no checkpoint in {workdir}"
    for step in steps:
        path = checkpoint.checkpoint_dir(str(workdir)) / str(step) / "state"
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/"}).result()
        names = {key.decode().split("/")[0].split(".")[0] for key in store.list().result()}
        assert {"opt_state", "params", "ema_params"} <= names, names
        for name in names - {"ema_params"}:  # keys 'name.leaf/...', 'name/...': '.' < '/' < '0'
            store.delete_range(ts.KvStore.KeyRange(name + ".", name + "0")).result()


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec that starts this interpreter (what `pip install -e ".[test]"` set up)."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "shortcut_jax tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return root


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, kernel_dir) -> tuple[Path, nbformat.NotebookNode]:
    """The quickstart on the tiny MNIST DiT: (its WORKDIR, the executed notebook)."""
    workdir = tmp_path_factory.mktemp("quickstart") / "run"
    parameters = {"CONFIG": "mnist", "TOTAL_STEPS": 8, "WORKDIR": str(workdir), "TINY": True}
    return workdir, execute("quickstart", parameters, kernel_dir)


def test_stored_notebooks_are_valid_and_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        parameter_cell(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{path.name}: stored with outputs:\n{cell.source}"
                assert cell.execution_count is None, f"{path.name}: stored executed"


def test_quickstart_trains_plots_the_loss_and_samples_at_each_step_count(quickstart_run):
    workdir, notebook = quickstart_run
    assert_figures_drawn(notebook, min_figure_cells=2)
    for name in ("loss", "samples"):
        assert (workdir / "figures" / f"{name}.png").stat().st_size > 1_000, name
    assert (workdir / "checkpoints" / "8").is_dir()


def test_evaluate_notebook_shows_grids_and_scores_the_quickstart_run(quickstart_run, kernel_dir):
    workdir, _ = quickstart_run
    keep_only_the_ema(workdir)  # the notebook reads the EMA parameters and nothing else
    parameters = {
        "WORKDIR": str(workdir),
        "CHECKPOINT_STEP": None,
        "CLASS_LABEL": 3,
        "CFG_SCALE": 1.5,
        "CFG_SCALES": [1.0],
        "STEPS": [1, 2, 128],  # 128 is clipped to the tiny run's denoise_timesteps = 8
        "NUM_EVAL": 40,
        "METRICS": "fd_mnist",  # not 'auto': FID would be far too slow here if weights exist
        "SEED": 0,
    }
    notebook = execute("evaluate", parameters, kernel_dir)
    assert_figures_drawn(notebook, min_figure_cells=2)
    for name in ("samples_class3", "guidance_class3", "scores_vs_nfe"):
        assert (workdir / "figures" / f"{name}.png").stat().st_size > 1_000, name
    tables = [
        output.data["text/markdown"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "text/markdown" in output.get("data", {})
    ]
    assert len(tables) == 1
    table = tables[0]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["1", "2", "8"]
    assert "fd_mnist" in table
    plot_cells = [cell for cell in notebook.cells if "report.plot(" in cell.source]
    assert len(plot_cells) == 1 and "image/png" in outputs_of(plot_cells[0])
