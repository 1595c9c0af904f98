"""What users of the command-line tools and notebooks meet first: CLIs that log their own lines
(not Orbax's), a `main --help` that explains `file.py:variant` and overrides, exit status 2 for
usage errors and 1 for run-time failures (`cli_inputs`), and notebooks that open in Colab and
set themselves up there."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import nbformat
import pytest
from absl import logging as absl_logging
from tiny import REPO, run_module, tiny_mnist_config

from shortcut_jax import cli_inputs, train

# An absl log line of a Python module: "I1207 03:16:03.674329 139752609262464 sample.py:190] ...".
ABSL_PY_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\]")
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(tiny_mnist_config(3), str(workdir))
    return workdir


def logged_files(stderr: str, levels: str = "I") -> set[str]:
    """The Python files that wrote absl log lines of `levels` to `stderr`."""
    matches = (ABSL_PY_LINE.match(line) for line in stderr.splitlines())
    return {match.group(2) for match in matches if match and match.group(1) in levels}


def test_sample_logs_its_own_lines_and_none_of_orbax(tiny_run, tmp_path):
    result = run_module(
        "shortcut_jax.sample", f"--workdir={tiny_run}", "--num=4", f"--out={tmp_path}/s.npz"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged_files(result.stderr) == {"sample.py"}, result.stderr[-3000:]
    assert "orbax" not in result.stderr.lower() and "Closing" not in result.stderr
    assert "] 4 of 4 samples" in result.stderr
    assert "Wrote 4 samples (step 3, 1 sampling steps" in result.stderr


@pytest.fixture
def absl_handler():
    """The absl log handler, with our filter and the verbosity restored after the test."""
    handler = absl_logging.get_absl_handler()
    filters, verbosity = list(handler.filters), absl_logging.get_verbosity()
    yield handler
    handler.filters[:] = filters
    absl_logging.set_verbosity(verbosity)


def record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_library_info_lines_are_hidden_but_their_warnings_show(absl_handler):
    absl_logging.set_verbosity(absl_logging.INFO)
    cli_inputs.quiet_library_logs()
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    ours = f"/repo{os.sep}shortcut_jax{os.sep}sample.py"
    assert not absl_handler.filter(record(orbax, logging.INFO))
    assert absl_handler.filter(record(orbax, logging.WARNING))
    assert absl_handler.filter(record(ours, logging.INFO))
    # main's choice replaces the default: every module's INFO but the noisy ones.
    cli_inputs.quiet_library_logs(shown=None, hidden=("/orbax/",))
    assert absl_handler.filter(record("/clu/metric_writers/logging_writer.py", logging.INFO))
    assert not absl_handler.filter(record(orbax, logging.INFO))
    absl_logging.set_verbosity(absl_logging.DEBUG)  # --verbosity=1: everything shows
    cli_inputs.quiet_library_logs()
    assert absl_handler.filter(record(orbax, logging.INFO))


def test_main_help_explains_config_variants_and_overrides():
    result = run_module("shortcut_jax.main", "--help", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # absl alone would exit 1
    text = " ".join(result.stdout.split())
    assert "path/to/file.py:variant" in text
    assert "experiments/imagenet256.py:tiny" in text
    assert "--config.FIELD=VALUE" in text and "--config.total_steps=2000" in text


CLI_SCRIPT = """
import sys
from absl import app, flags
from shortcut_jax import cli_inputs

flags.DEFINE_string("case", "ok", "what main does")

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    case = flags.FLAGS.case
    with cli_inputs.errors_as_one_line(FileNotFoundError):
        if case == "usage":
            raise cli_inputs.InputError("--case=usage: not allowed")
        if case == "missing":
            raise cli_inputs.InputFileError("--case=missing: no such file")
        if case == "failure":
            raise FileNotFoundError("a named run-time failure")
        if case == "usage_error":
            raise app.UsageError("two flags that contradict each other")
    print("ran")

cli_inputs.run(main)
"""


@pytest.mark.parametrize(
    ("args", "status", "stderr"),
    [
        ([], 0, ""),
        (["--help"], 0, ""),
        (["--case=usage"], 2, "error: --case=usage: not allowed"),
        (["--case=usage_error"], 2, "error: two flags that contradict each other"),
        (["positional"], 2, "error: Unexpected arguments"),
        (["--no_such_flag=1"], 2, "error: Unknown command line flag 'no_such_flag'"),
        (["--case=missing"], 1, "error: --case=missing: no such file"),
        (["--case=failure"], 1, "error: a named run-time failure"),
    ],
)
def test_every_cli_exits_2_for_usage_errors_and_1_for_failures(args, status, stderr, tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(CLI_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if stderr:
        assert result.stderr.startswith(stderr), result.stderr
    if args == ["positional"]:  # absl's own handling would raise UsageError with status 1
        assert "positional" in result.stderr


def test_every_cli_module_runs_through_the_shared_rules():
    """Each `python -m` entry point uses `cli_inputs.run` (or argparse with 2 and 1 itself)."""
    own_argparse = {"convert_inception.py", "export.py"}  # argparse: 2 for usage, see main()
    checked = []
    for path in sorted((REPO / "shortcut_jax").rglob("*.py")):
        text = path.read_text()
        if 'if __name__ == "__main__":' not in text or path.name in own_argparse:
            continue
        entry = text.split('if __name__ == "__main__":')[1]
        assert "cli_inputs.run(" in entry and "app.run(" not in entry, path
        checked.append(path.name)
    assert {"main.py", "sample.py", "evaluate.py", "compile.py", "fid_stats.py"} <= set(checked)


# ------------------------------------------------------------------ notebooks on Colab


def setup_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The code cell that acts on Colab only."""
    cells = [c for c in notebook.cells if c.cell_type == "code" and "google.colab" in c.source]
    assert len(cells) == 1
    return cells[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebooks_open_in_colab_from_the_repository_they_clone(path):
    notebook = nbformat.read(path, as_version=4)
    badge = notebook.cells[0]
    assert badge.cell_type == "markdown" and "colab-badge.svg" in badge.source
    url = re.search(
        r'REPO_URL = "https://github\.com/([^/"]+)/([^/"]+)"', setup_cell(notebook).source
    )
    assert url, setup_cell(notebook).source
    owner, repository = url.groups()
    link = f"https://colab.research.google.com/github/{owner}/{repository}/blob/main/"
    assert f"]({link}notebooks/{path.name})" in badge.source


def make_origin(root) -> str:
    """A git repository with a setup.py, as a file:// URL (what the setup cell clones)."""
    origin = root / "origin"
    origin.mkdir()
    (origin / "setup.py").write_text("# the package\n")
    names = ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")
    env = {**os.environ, **dict.fromkeys(names, "test")}
    for command in (["init", "-q"], ["add", "setup.py"], ["commit", "-q", "-m", "setup"]):
        subprocess.run(["git", *command], cwd=origin, env=env, check=True)
    return f"file://{origin}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_the_setup_cell_clones_enters_and_installs_on_colab_only(path, tmp_path, monkeypatch):
    source = textwrap.dedent(setup_cell(nbformat.read(path, as_version=4)).source)
    url = re.search(r'REPO_URL = ("[^"]+")', source).group(1)
    real_run, installs = subprocess.run, []

    def run(command, **kwargs):
        if command[:3] == [sys.executable, "-m", "pip"]:
            installs.append((command, os.getcwd()))  # never install anything here
            return subprocess.CompletedProcess(command, 0)
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    content = tmp_path / "content"  # Colab's working directory
    content.mkdir()
    monkeypatch.chdir(content)
    exec(source, {})  # not on Colab: nothing happens
    assert installs == [] and os.listdir(content) == []
    monkeypatch.setitem(sys.modules, "google.colab", object())
    if "YOUR_GITHUB_ORG" in url:  # the placeholder stops the cell with a message
        with pytest.raises(RuntimeError, match="Set REPO_URL"):
            exec(source, {})
    source = source.replace(url, repr(make_origin(tmp_path)))
    for _ in range(2):  # rerunning the cell reuses the clone
        exec(source, {})
    clone = content / "shortcut_jax"
    assert (clone / "setup.py").is_file() and os.getcwd() == str(clone)
    expected = [sys.executable, "-m", "pip", "install", "--quiet", "-e", "."]
    assert installs == [(expected, str(clone))] * 2
    assert sys.path[0] == str(clone)
