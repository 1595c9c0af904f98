"""Packaging: pyproject.toml's metadata, licence and extras, the JAX ranges, what the default
install (no TensorFlow, no torch) can do, and (in CI) what pip resolves for the extras."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version
from test_metric_writers import run_without_tensorflow

from shortcut_jax.data import preprocess

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
GPU_TARGETS = sorted((REPO / "shortcut_jax" / "gpu_targets").glob("*.txtpb"))

# The JAX stack CI installs on Python 3.11 (the newest there): each is its package's lower bound.
TESTED_LOWER_BOUNDS = {
    "jax": "0.10.2",
    "flax": "0.12.8",
    "orbax-checkpoint": "0.12.8",
    "optax": "0.2.8",
}
# The newest releases (Python >= 3.12) when the ranges were last widened: they must be admitted.
CURRENT_RELEASES = {
    "jax": "0.12.1",
    "flax": "0.12.12",
    "orbax-checkpoint": "0.12.8",
    "optax": "0.2.8",
}
GPU_WHEEL_PREFIXES = ("nvidia-", "jax-cuda", "jax-rocm", "torch", "triton")
TENSORFLOW = ("tensorflow", "tensorflow-cpu", "tensorflow_cpu", "tf-nightly")


def requirements(entries: list[str]) -> dict[str, Requirement]:
    return {Requirement(entry).name.lower(): Requirement(entry) for entry in entries}


def test_pyproject_declares_the_project_its_licence_and_a_build_backend():
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert PROJECT["name"] == "shortcut_jax" and PROJECT["readme"] == "README.md"
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence
    # setup.py is the thin file the notebooks look for; the metadata lives in pyproject.toml only.
    setup_py = (REPO / "setup.py").read_text(encoding="utf-8")
    assert "setup()" in setup_py and "install_requires" not in setup_py
    from shortcut_jax import __version__

    assert PROJECT["version"] == __version__


def test_the_extras_a_user_picks_from_exist_and_the_test_extra_stays_cpu_sized():
    assert {"test", "parity", "convert", "tf", "tpu", "cuda12", "cuda13", "gpu-compile"} <= set(
        EXTRAS
    )
    core = requirements(PROJECT["dependencies"])
    test = requirements(EXTRAS["test"])
    for name in (*core, *test):
        assert not name.startswith(GPU_WHEEL_PREFIXES), name
        assert name not in (*TENSORFLOW, "diffusers"), name
    assert not any(requirement.extras for requirement in test.values())
    assert {"torch", "diffusers"} <= set(requirements(EXTRAS["parity"]))
    assert set(requirements(EXTRAS["convert"])) == {"torch"}
    assert requirements(EXTRAS["tpu"])["jax"].extras == {"tpu"}
    assert requirements(EXTRAS["cuda12"])["jax"].extras == {"cuda12"}
    assert requirements(EXTRAS["cuda13"])["jax"].extras == {"cuda13"}


def test_tf_extra_brings_the_cpu_tensorflow_on_linux_x86_64_and_tensorflow_elsewhere():
    tfds = [Requirement(entry) for entry in EXTRAS["tf"]]
    for platform, machine, wanted in (
        ("linux", "x86_64", "tensorflow-cpu"),
        ("linux", "aarch64", "tensorflow"),
        ("darwin", "arm64", "tensorflow"),
        ("win32", "AMD64", "tensorflow"),
    ):
        environment = {"sys_platform": platform, "platform_machine": machine, "extra": "tf"}
        chosen = [r.name for r in tfds if r.marker is None or r.marker.evaluate(environment)]
        assert chosen == [wanted], (platform, machine, chosen)
    assert Marker("sys_platform == 'linux'")  # markers parse (PEP 508: no `not`)


def test_jax_ranges_start_at_the_tested_set_and_admit_the_current_releases():
    core = requirements(PROJECT["dependencies"])
    for name, lower in TESTED_LOWER_BOUNDS.items():
        specifier = core[name].specifier
        minimum = [spec.version for spec in specifier if spec.operator == ">="]
        assert minimum == [lower], (name, str(specifier))
        assert Version(CURRENT_RELEASES[name]) in specifier, (name, str(specifier))
    # Every accelerator extra moves with the core range (jax[tpu] then pins its own libtpu).
    for extra in ("tpu", "cuda12", "cuda13", "gpu-compile"):
        for requirement in requirements(EXTRAS[extra]).values():
            assert requirement.specifier == core["jax"].specifier, (extra, str(requirement))


def test_the_installed_jax_stack_is_inside_the_declared_ranges():
    core = requirements(PROJECT["dependencies"])
    for name in TESTED_LOWER_BOUNDS:
        installed = importlib.metadata.version(name)
        assert Version(installed) in core[name].specifier, (name, installed)


# --- The default install: no TensorFlow --------------------------------------------------------


def test_a_missing_tensorflow_in_tfds_is_reported_naming_the_extra():
    from shortcut_jax import configs

    config = configs.base_config()
    config.data.update(name="tfds", tfds_name="some_dataset")

    class NeedsTensorFlow:
        def as_data_source(self, **kwargs):
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[tf\]"') as error:
        preprocess.tfds_data_source(config, NeedsTensorFlow())
    assert "config.data.tfds_name='some_dataset'" in str(error.value)
    assert preprocess.TFDS_EXTRA in preprocess.prepare_instructions(config)


def test_a_prepared_array_record_build_is_read_without_tensorflow(tfds, tmp_path):
    """Building needs TensorFlow (the tf extra); training from the build does not."""

    class ShortcutJaxNoTfColors(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(3)
            for index in range(12):
                image = rng.integers(0, 256, (int(9 + index), 11, 3), dtype=np.uint8)
                yield index, {"image": image, "label": index % 3}

    data_dir = str(tmp_path / "tfds")
    builder = tfds.builder(
        "shortcut_jax_no_tf_colors", data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()

    from shortcut_jax import configs, data

    def tfds_config():
        config = configs.base_config()
        config.batch_size = 4
        config.data.update(name="tfds", tfds_name="shortcut_jax_no_tf_colors", data_dir=data_dir)
        config.data.update(image_size=8, channels=3, num_classes=3, random_flip=False)
        return config

    expected = next(iter(data.get_source(tfds_config()).iterate(2)))
    out = run_without_tensorflow(
        f"""
        import json, sys
        from shortcut_jax import configs, data
        config = configs.base_config()
        config.batch_size = 4
        config.data.update(name="tfds", tfds_name="shortcut_jax_no_tf_colors")
        config.data.update(data_dir={data_dir!r}, image_size=8, channels=3, num_classes=3)
        config.data.random_flip = False
        batch = next(iter(data.get_source(config).iterate(2)))
        print(json.dumps({{key: value.tolist() for key, value in batch.items()}}))
        print("tensorflow" in sys.modules)
        """,
        tmp_path,
    )
    batch_json, tensorflow_loaded = out.strip().splitlines()[-2:]
    assert tensorflow_loaded == "False"
    batch = json.loads(batch_json)
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(batch[key], dtype=value.dtype), value)


# --- What pip resolves (CI: SHORTCUT_JAX_RESOLVE_EXTRAS=1; needs the package index) ------------


def resolve(extras: str) -> dict[str, dict]:
    """pip's dry-run report for `REPO[extras]` in a fresh environment: {name: metadata}."""
    if os.environ.get("SHORTCUT_JAX_RESOLVE_EXTRAS") != "1":
        pytest.skip("resolves against the package index; set SHORTCUT_JAX_RESOLVE_EXTRAS=1 (CI)")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    command += ["--quiet", "--report", "-", f"{REPO}[{extras}]"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    return {item["metadata"]["name"].lower(): item["metadata"] for item in report["install"]}


def test_the_test_extra_resolves_to_no_gpu_wheel():
    resolved = resolve("test")
    assert not [name for name in resolved if name.startswith(GPU_WHEEL_PREFIXES)]
    assert not [name for name in resolved if name in (*TENSORFLOW, "diffusers", "libtpu")]
    assert "jax" in resolved and "pytest" in resolved


def test_the_tpu_extra_resolves_to_the_libtpu_its_jax_pins():
    resolved = resolve("tpu")
    pins = [
        Requirement(entry)
        for entry in resolved["jax"]["requires_dist"]
        if entry.startswith("libtpu") and "tpu" in entry
    ]
    assert len(pins) == 1, pins
    assert Version(resolved["libtpu"]["version"]) in pins[0].specifier
    assert not [name for name in resolved if name.startswith(GPU_WHEEL_PREFIXES)]
    assert not [name for name in resolved if name in TENSORFLOW]


def test_the_wheel_carries_the_data_files_the_package_reads(tmp_path):
    pytest.importorskip("setuptools")  # the backend, to build without fetching it
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--quiet", "--wheel-dir", str(tmp_path), str(REPO)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("shortcut_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "shortcut_jax/evaluators/fd_mnist_classifier.npz" in names
    shipped = {name for name in names if name.startswith("shortcut_jax/gpu_targets/")}
    assert {f"shortcut_jax/gpu_targets/{p.name}" for p in GPU_TARGETS} == shipped
