"""Every field of every experiment config (and variant), set to wrong values by kind: validation
accepts the value or raises one ConfigError that names the field, never another exception.

The fields are read from the configs themselves, so a field added later is fuzzed without a new
test. A sample of the accepted values must also start: a first train step of a tiny model.
"""

from __future__ import annotations

import importlib.util
import random

import ml_collections
import pytest
from tiny import REPO

from shortcut_jax import config_lib, train

CONFIGS = [
    ("mnist.py", ""),
    ("toy2d.py", ""),
    ("mnist_latent.py", ""),
    ("imagenet256.py", ""),
    ("imagenet256.py", "xl"),
    ("celebahq256.py", ""),
]


def load(name: str, variant: str = "") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("fuzzed", REPO / "experiments" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def wrong_values(value):
    """Wrong values by the kind of the field's value."""
    if isinstance(value, bool):
        return [0, 1, "yes", None]
    if isinstance(value, int):
        return [-1, 0, True, float("inf"), 2**62, "3", 1.5]
    if isinstance(value, float):
        return [float("inf"), float("nan"), -float("inf"), -1.0, 0.0, "x"]
    if isinstance(value, str):
        return ["", "x" * 300, "??", 3]
    if isinstance(value, (tuple, list)):
        return [tuple(range(20)), (), ("a",), (-1,), (float("nan"),)]
    return [None, 0]


def with_value(config: ml_collections.ConfigDict, field: str, value) -> ml_collections.ConfigDict:
    """A copy of `config` with `field` set to `value`, type checks off (as a bad file could)."""
    config = config.copy_and_resolve_references()
    *parents, last = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    with node.ignore_type():
        node[last] = value
    return config


def _outcome(config: ml_collections.ConfigDict, field: str) -> str:
    try:
        config_lib.validate(config, device_count=1, check_files=False)
    except config_lib.ConfigError as error:
        message = str(error)
        section = field.rsplit(".", 1)[0]
        named = f"config.{field}" in message or (
            field.startswith("mesh.") and f"config.{section} =" in message
        )
        return "refused" if named else f"refused without naming it: {message}"
    return "accepted"


def test_every_field_of_every_config_is_accepted_or_refused_by_name():
    failures, accepted = [], []
    for name, variant in CONFIGS:
        base = load(name, variant)
        for field, value in leaves(base):
            for bad in wrong_values(value):
                config = with_value(base, field, bad)
                try:
                    outcome = _outcome(config, field)
                except Exception as error:  # noqa: BLE001 - what the test is looking for
                    outcome = f"traceback {type(error).__name__}: {error}"
                if outcome == "accepted":
                    accepted.append((name, variant, field, bad))
                elif outcome != "refused":
                    failures.append(f"{name}:{variant} {field}={bad!r}: {outcome[:300]}")
    assert not failures, f"{len(failures)} bad outcomes:\n" + "\n".join(failures[:30])
    assert accepted  # some wrong-looking values are legal (0 = off, '' = default)


@pytest.mark.slow
def test_a_sample_of_accepted_values_starts_a_tiny_run(tmp_path):
    """Accepted values of the MNIST config do not crash the first step of a tiny model."""
    from tiny import tiny_mnist_config

    base = tiny_mnist_config(2)
    config_lib.validate(base, device_count=1)
    base.sample_every_steps = 0
    base.eval_every_steps = 0
    candidates = []
    for field, value in leaves(base):
        if field.startswith(("mesh.", "sharding_rules", "model.preset")):
            continue
        for bad in wrong_values(value):
            config = with_value(base, field, bad)
            try:
                config_lib.validate(config, device_count=1)
            except config_lib.ConfigError:
                continue
            candidates.append((field, bad, config))
    rng = random.Random(20261207)
    for index, (field, bad, config) in enumerate(rng.sample(candidates, 6)):
        try:
            train.train_and_evaluate(config, str(tmp_path / f"run{index}"))
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"config.{field} = {bad!r} passed validation but the start failed: {error}")
