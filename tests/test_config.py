"""Tests for the experiment configs and `config_lib.validate`: every rule fails clearly, early."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections
import pytest

from shortcut_jax import config_lib, configs, objectives

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.py"))


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    """A user cache holding placeholders where the latent configs look for their files: the
    converted SD VAE (paper configs), the MNIST autoencoder and its latents (mnist_latent)."""
    monkeypatch.setenv("SHORTCUT_JAX_CACHE", str(tmp_path))
    placeholder = b"placeholder: validation checks existence"
    (tmp_path / "sd_vae_ft_mse.npz").write_bytes(placeholder)
    (tmp_path / "mnist_autoencoder.npz").write_bytes(placeholder)
    (tmp_path / "mnist_latents").mkdir()
    (tmp_path / "mnist_latents" / "metadata.json").write_bytes(placeholder)
    return tmp_path


def _load_experiment(path: Path, variant: str | None = None) -> ml_collections.ConfigDict:
    """Imports an experiments/*.py file by path and returns its get_config([variant])."""
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if variant is None else module.get_config(variant)


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Sets config.<dotted> = value, e.g. _set(config, 'optim.learning_rate', 1e-3)."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _config_with(overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    config = configs.base_config()
    for dotted, value in overrides.items():
        _set(config, dotted, value)
    return config


def _dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    """Every key of a nested dict as a dotted path: {'optim', 'optim.learning_rate', ...}."""
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _problems(error: config_lib.ConfigError) -> list[str]:
    """The one-per-line problems of a ConfigError message (after the 'Invalid config:' header)."""
    return [line.strip() for line in str(error).splitlines()[1:] if line.strip()]


# --- The experiment files ----------------------------------------------------------------------


def test_experiments_directory_has_the_expected_configs():
    assert {path.stem for path in EXPERIMENTS} >= {"mnist", "toy2d", "imagenet256", "celebahq256"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.stem)
def test_every_experiment_file_loads_and_validates(path):
    config = _load_experiment(path)
    assert isinstance(config, ml_collections.ConfigDict)
    config_lib.validate(config, device_count=1)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.stem)
def test_every_experiment_file_holds_only_base_config_fields(path):
    """validate() ignores extra fields, so a misspelt one (config.total_stepz) would go unused."""
    base = configs.base_config().to_dict()
    assert _dotted_keys(_load_experiment(path).to_dict()) == _dotted_keys(base)


def test_base_config_validates_with_the_local_device_count():
    config_lib.validate(configs.base_config())  # device_count defaults to jax.device_count()


PAPER_SETTINGS = {
    "model.name": "dit",
    "model.preset": "DiT-B/2",
    "denoise_timesteps": 128,
    "optim.learning_rate": 1e-4,
    "optim.weight_decay": 0.1,
    "ema_rate": 0.999,
    "bootstrap_every": 8,
    "objective": "shortcut",
    "vae.scaling_factor": 0.18215,
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize(
    ("name", "specific"),
    [
        (
            "imagenet256",
            {
                "cfg_scale": 1.5,
                "bootstrap_cfg": True,
                "data.num_classes": 1000,
                "batch_size": 256,
                "total_steps": 810_000,  # the official README's --max_steps
            },
        ),
        # The official code trains CelebA-HQ at batch 64 for 410k steps.
        (
            "celebahq256",
            {
                "bootstrap_cfg": False,
                "data.num_classes": 0,
                "batch_size": 64,
                "total_steps": 410_000,
            },
        ),
    ],
)
def test_paper_configs_have_the_paper_settings(name, specific):
    from shortcut_jax import latent_space

    config = _load_experiment(REPO / "experiments" / f"{name}.py")
    for dotted, expected in {**PAPER_SETTINGS, **specific}.items():
        assert _get(config, dotted) == expected, dotted
    # 256x256 RGB images; the model sees their SD-VAE latents: 32x32x4 (16x16 DiT-B/2 tokens).
    assert (config.data.image_size, config.data.channels) == (256, 3)
    assert latent_space.model_shape(config) == (32, 32, 4)


@pytest.mark.parametrize("name", ["imagenet256", "celebahq256"])
def test_paper_config_variants_pick_the_model(name):
    path = REPO / "experiments" / f"{name}.py"
    assert _load_experiment(path, "b2").model.preset == "DiT-B/2"
    assert _load_experiment(path, "xl").model.preset == "DiT-XL/2"
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        _load_experiment(path, "huge")


def test_paper_config_without_the_vae_file_names_the_conversion(_user_cache):
    (_user_cache / "sd_vae_ft_mse.npz").unlink()
    config = _load_experiment(REPO / "experiments" / "imagenet256.py")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, device_count=1)
    assert "config.vae.path" in str(error.value)
    assert "python -m shortcut_jax.tools.convert_vae --from" in str(error.value)


def test_latent_dir_that_is_not_encoded_names_the_encode_command(tmp_path):
    config = _load_experiment(REPO / "experiments" / "imagenet256.py")
    config.data.latent_dir = str(tmp_path / "latents")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, device_count=1)
    problems = _problems(error.value)
    assert problems[0].startswith("config.data.latent_dir")
    assert "python -m shortcut_jax.tools.encode_latents --config" in str(error.value)


def test_latent_dir_needs_the_vae_it_was_encoded_with(tmp_path):
    config = configs.base_config()
    config.data.latent_dir = str(tmp_path)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(config_lib.ConfigError, match="config.vae.path names the VAE"):
        config_lib.validate(config, device_count=1)


def test_latent_side_must_fit_the_patch_size(_user_cache):
    config = _load_experiment(REPO / "experiments" / "imagenet256.py")
    config.data.image_size = 264  # 33x33 latents: not divisible by DiT-B/2's patch 2
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, device_count=1)
    assert "vae.downsample_factor (8) divisible by the DiT patch size 2" in str(error.value)


@pytest.mark.parametrize(
    ("policy", "bootstrap_cfg", "expected"),
    [
        ("all", True, {1: 1.5, 4: 1.5, 128: 1.5}),
        ("finest", False, {1: 1.0, 4: 1.0, 128: 1.5}),
        ("auto", True, {1: 1.0, 64: 1.0, 128: 1.5}),  # guided targets: guide only at 128 steps
        ("auto", False, {1: 1.5, 64: 1.5, 128: 1.5}),
    ],
)
def test_guidance_policy_per_step_count(policy, bootstrap_cfg, expected):
    from shortcut_jax import latent_space

    config = configs.base_config()
    config.sample_guidance = policy
    config.bootstrap_cfg = bootstrap_cfg
    config.sample_cfg_scale = 1.5
    got = {steps: latent_space.guidance_scale(config, steps) for steps in expected}
    assert got == expected
    # An explicit scale (the CLIs' --cfg) follows the same policy.
    assert latent_space.guidance_scale(config, 128, 3.0) == 3.0


@pytest.mark.parametrize(
    ("name", "device_count"),
    [
        ("imagenet256", 8),
        ("imagenet256", 64),
        ("imagenet256", 256),
        ("celebahq256", 8),
        ("celebahq256", 64),
    ],  # CelebA-HQ's batch of 64 splits over at most 64 devices
)
def test_paper_configs_validate_on_pod_slices(name, device_count):
    config = _load_experiment(REPO / "experiments" / f"{name}.py")
    config_lib.validate(config, device_count=device_count)


# --- One test per validation rule ----------------------------------------------------------------

# (id, overrides, device_count, field, shown value, a phrase of what is allowed). Each case breaks
# exactly one rule, so the error must hold exactly one problem.
RULES = [
    (
        "denoise_timesteps_not_power_of_two",
        {"denoise_timesteps": 100, "sample_steps": (1, 4)},
        1,
        "denoise_timesteps",
        100,
        "a power of two",
    ),
    (
        "unknown_ode_solver",
        {"teacher.ode_solver": "rk4"},
        1,
        "teacher.ode_solver",
        "rk4",
        "'heun' or 'euler'",
    ),
    (
        "batch_not_divisible_by_bootstrap_every",
        {"batch_size": 36, "bootstrap_every": 8},
        1,
        "batch_size",
        36,
        "divisible by config.bootstrap_every = 8",
    ),
    (
        "batch_not_divisible_by_devices",
        {"batch_size": 32},
        3,
        "batch_size",
        32,
        "divisible by the batch shards data x fsdp = 3 (3 devices)",
    ),
    (
        "image_not_divisible_by_patch",
        {"data.image_size": 30, "model.patch_size": 4},
        1,
        "data.image_size",
        30,
        "divisible by the DiT patch size 4",
    ),
    (
        "image_not_divisible_by_preset_patch",
        {"model.preset": "DiT-B/8", "data.image_size": 36},
        1,
        "data.image_size",
        36,
        "divisible by the DiT patch size 8",
    ),
    (
        "unknown_objective",
        {"objective": "consistency"},
        1,
        "objective",
        "consistency",
        "'flow_matching'",
    ),
    ("unknown_data_name", {"data.name": "cifar10"}, 1, "data.name", "cifar10", "'mnist_embedded'"),
    ("unknown_model_name", {"model.name": "unet"}, 1, "model.name", "unet", "'mlp'"),
    ("unknown_preset", {"model.preset": "DiT-Q/3"}, 1, "model.preset", "DiT-Q/3", "'DiT-B/2'"),
    (
        "negative_learning_rate",
        {"optim.learning_rate": -1e-4},
        1,
        "optim.learning_rate",
        -1e-4,
        "> 0",
    ),
    (
        "warmup_longer_than_training",
        {"total_steps": 100, "optim.warmup_steps": 200},
        1,
        "optim.warmup_steps",
        200,
        "[0, config.total_steps]",
    ),
    ("ema_rate_one", {"ema_rate": 1.0}, 1, "ema_rate", 1.0, "[0, 1)"),
    ("ema_rate_above_one", {"ema_rate": 1.5}, 1, "ema_rate", 1.5, "[0, 1)"),
    (
        "unknown_bootstrap_teacher",
        {"bootstrap_teacher": "student"},
        1,
        "bootstrap_teacher",
        "student",
        "'params'",
    ),
    (
        "class_dropout_always",
        {"class_dropout_prob": 1.0},
        1,
        "class_dropout_prob",
        1.0,
        "[0, 1)",
    ),
    (
        "bootstrap_cfg_without_classes",
        {"bootstrap_cfg": True, "data.num_classes": 0},
        1,
        "data.num_classes",
        0,
        "config.bootstrap_cfg is True",
    ),
    (
        "hidden_size_not_divisible_by_heads",
        {"model.hidden_size": 132, "model.num_heads": 8},
        1,
        "model.hidden_size",
        132,
        "divisible by config.model.num_heads = 8",
    ),
    (
        "sample_steps_zero",
        {"sample_steps": (0, 4)},
        1,
        "sample_steps",
        (0, 4),
        "[1, config.denoise_timesteps]",
    ),
    (
        "sample_steps_above_denoise_timesteps",
        {"sample_steps": (1, 256)},
        1,
        "sample_steps",
        (1, 256),
        "[1, config.denoise_timesteps]",
    ),
    (
        "total_steps_zero",
        {"total_steps": 0, "optim.warmup_steps": 0},
        1,
        "total_steps",
        0,
        "a positive integer",
    ),
    ("two_channels", {"data.channels": 2}, 1, "data.channels", 2, "1, 3 or 4"),
    ("float16_dtype", {"model.dtype": "float16"}, 1, "model.dtype", "float16", "'bfloat16'"),
    (
        "image_folder_missing",
        {"data.name": "image_folder", "data.image_dir": "/nonexistent/images"},
        1,
        "data.image_dir",
        "/nonexistent/images",
        "one subfolder of images per class",
    ),
    (
        "unknown_guidance_policy",
        {"sample_guidance": "coarse"},
        1,
        "sample_guidance",
        "coarse",
        "'finest'",
    ),
    (
        "vae_file_missing",
        {"vae.path": "/nonexistent/vae.npz", "data.image_size": 32},
        1,
        "vae.path",
        "/nonexistent/vae.npz",
        "convert_vae",
    ),
    (
        "tfds_without_name",
        {"data.name": "tfds", "data.tfds_name": ""},
        1,
        "data.tfds_name",
        "",
        "a TFDS name",
    ),
    (
        "shortcut_bootstrap_every_one",
        {"objective": "shortcut", "bootstrap_every": 1},
        1,
        "bootstrap_every",
        1,
        ">= 2",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "device_count", "field", "value", "allowed"),
    [pytest.param(*case[1:], id=case[0]) for case in RULES],
)
def test_each_rule_raises_one_config_error_naming_field_value_and_allowed(
    overrides, device_count, field, value, allowed
):
    config = _config_with(overrides)
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(config, device_count=device_count)
    message = str(info.value)
    assert f"config.{field} = {value!r}" in message
    assert allowed in message
    assert len(_problems(info.value)) == 1, message


def test_config_error_is_a_value_error():
    assert issubclass(config_lib.ConfigError, ValueError)


def test_unknown_objective_lists_every_registered_objective():
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(_config_with({"objective": "consistency"}), device_count=1)
    for name in objectives.names():
        assert repr(name) in str(info.value)


def test_flow_matching_accepts_bootstrap_every_one():
    config = _config_with({"objective": "flow_matching", "bootstrap_every": 1})
    config_lib.validate(config, device_count=1)


@pytest.mark.parametrize(
    ("section", "field", "allowed"),
    [("optim", "learning_rate", "a finite float > 0"), ("model", "name", "one of ['dit', 'mlp']")],
)
def test_missing_field_is_named_with_what_is_allowed(section, field, allowed):
    config = configs.base_config()
    del config[section][field]
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(config, device_count=1)
    assert f"config.{section}.{field} is missing: {allowed}" in str(info.value)


def test_missing_top_level_field_is_named():
    config = configs.base_config()
    del config["objective"]
    with pytest.raises(config_lib.ConfigError, match=r"config\.objective is missing"):
        config_lib.validate(config, device_count=1)


def test_several_bad_values_give_one_error_listing_all_of_them():
    config = _config_with(
        {
            "denoise_timesteps": 100,
            "ema_rate": 1.5,
            "data.name": "cifar10",
            "optim.learning_rate": -1.0,
            "model.dtype": "float16",
        }
    )
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(config, device_count=1)
    message = str(info.value)
    assert message.startswith("Invalid config:")
    for expected in (
        "config.denoise_timesteps = 100",
        "config.ema_rate = 1.5",
        "config.data.name = 'cifar10'",
        "config.optim.learning_rate = -1.0",
        "config.model.dtype = 'float16'",
    ):
        assert expected in message
    # denoise_timesteps = 100 also puts the default sample_steps (.., 128) out of range.
    assert len(_problems(info.value)) == 6, message


# --- Cross-field rules and missing pieces --------------------------------------------------------


@pytest.mark.parametrize("field", ["total_steps", "denoise_timesteps"])
def test_missing_field_read_by_another_rule_is_a_config_error(field):
    config = configs.base_config()
    del config[field]
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{field} is missing"):
        config_lib.validate(config, device_count=1)


@pytest.mark.parametrize("section", ["data", "model"])
def test_missing_section_is_a_config_error(section):
    config = configs.base_config()
    del config[section]
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{section} is missing"):
        config_lib.validate(config, device_count=1)


def test_dit_hidden_size_not_multiple_of_four_is_rejected():
    config = _config_with({"model.hidden_size": 66, "model.num_heads": 6})
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.hidden_size = 66"):
        config_lib.validate(config, device_count=1)


def test_unknown_toy_name_is_rejected():
    config = _load_experiment(REPO / "experiments" / "toy2d.py")
    config.data.toy_name = "spiral_galaxy"
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.toy_name = 'spiral_galaxy'"):
        config_lib.validate(config, device_count=1)


# --- The CLI ------------------------------------------------------------------------------------


def _run_main(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "shortcut_jax.main", "--config", "experiments/mnist.py"]
    return subprocess.run(
        [*command, "--workdir", str(workdir), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_no_work_done(workdir: Path) -> None:
    assert not workdir.exists() or not any(workdir.rglob("*")), sorted(workdir.rglob("*"))


def test_cli_rejects_a_bad_override_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    result = _run_main(workdir, "--config.denoise_timesteps=100")
    assert result.returncode == 2
    assert "config.denoise_timesteps = 100" in result.stderr
    assert "power of two" in result.stderr
    _assert_no_work_done(workdir)


def test_cli_rejects_a_misspelt_override(tmp_path):
    workdir = tmp_path / "run"
    result = _run_main(workdir, "--config.total_stepz=5")
    assert result.returncode == 2
    assert "total_stepz" in result.stderr
    _assert_no_work_done(workdir)


# --- Device mesh ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mesh,devices,expected",
    [
        (
            {"data": 3, "fsdp": 1, "tensor": 1},
            8,
            "the product 3 must equal the number of devices (8)",
        ),
        ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "at most one may be -1"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "8 devices are not divisible by 3"),
        ({"data": 0, "fsdp": 8, "tensor": 1}, 8, "config.mesh.data = 0: a positive integer, or -1"),
    ],
)
def test_bad_mesh_is_rejected_naming_config_mesh(mesh, devices, expected):
    config = configs.base_config()
    config.mesh.update(mesh)
    with pytest.raises(config_lib.ConfigError, match="config.mesh") as info:
        config_lib.validate(config, device_count=devices)
    assert expected in str(info.value)


def test_batch_must_divide_over_data_times_fsdp_but_not_tensor():
    config = configs.base_config()
    config.batch_size = 36
    config.bootstrap_every = 4
    config.mesh.update({"data": 2, "fsdp": 1, "tensor": 4})
    config_lib.validate(config, device_count=8)  # 36 splits over 2 batch shards
    config.mesh.update({"data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(config_lib.ConfigError, match="data x fsdp = 8"):
        config_lib.validate(config, device_count=8)


def test_sharding_rules_must_name_mesh_axes():
    config = configs.base_config()
    config.sharding_rules = (("embed", "fsdp"), ("mlp", "model"))
    with pytest.raises(config_lib.ConfigError, match="config.sharding_rules"):
        config_lib.validate(config, device_count=1)
