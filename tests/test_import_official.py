"""tools/import_official: checkpoints of the official code run through our DiT with its outputs.

A small DiT of the official architecture gets random parameters in the official naming, pickled as
the official `utils/checkpoint.py` pickles them; the imported run's model is compared with an
independent float64 reference of the official forward pass (tests/official_dit.py). Also: the
restricted unpickler refuses malicious pickles by class name without running them, bad files give
one error, the run directory works with `shortcut_jax.sample`, and the official FID statistics
file format reads as --ref_stats.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from official_dit import (
    official_forward,
    official_opt_state,
    random_official_params,
    write_official_checkpoint,
)
from tiny import REPO, run_module, tiny_mnist_config

from shortcut_jax import checkpoint, cli_inputs, models
from shortcut_jax.evaluators import fid
from shortcut_jax.tools import import_official, official_params, official_pickle

# A small DiT of the official architecture on the tiny config's 28x28x1 MNIST, 10 classes.
HIDDEN, DEPTH, HEADS, PATCH, CHANNELS, CLASSES, MLP_RATIO = 32, 2, 4, 7, 1, 10, 2.0
OFFICIAL_STEP = 1_235
TOLERANCE = 1e-5  # max |ours - official reference| in float32, relative to the output's max


def _params(seed: int, num_classes: int = CLASSES) -> dict:
    return random_official_params(seed, HIDDEN, DEPTH, PATCH, CHANNELS, num_classes, MLP_RATIO)


def _inputs(batch: int = 16, num_classes: int = CLASSES, seed: int = 0):
    """Images, t (random and on the grid), levels 0..7 as the official dt and as our d, labels
    with the null label."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 28, 28, CHANNELS)).astype(np.float32)
    t = np.concatenate([rng.uniform(size=batch // 2), np.arange(batch - batch // 2) / 8.0])
    levels = np.arange(batch) % 8
    labels = np.arange(batch) % (num_classes + 1)
    return x, t.astype(np.float32), levels, labels.astype(np.int32)


def _ours(config: ml_collections.ConfigDict, params, x, t, levels, labels) -> np.ndarray:
    d = np.exp2(-levels.astype(np.float32))
    out = models.get_model(config).apply({"params": params}, x, t, d, labels)
    return np.asarray(out, np.float64)


def _max_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    difference = float(np.abs(ours - reference).max())
    scale = float(np.abs(reference).max())
    print(f"max |ours - official| = {difference:.3g} (outputs up to {scale:.3g})")
    return difference / max(scale, 1.0)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """An official checkpoint imported through the CLI: (workdir, official params, official EMA)."""
    root = tmp_path_factory.mktemp("official")
    params, params_ema = _params(1), _params(2)
    source = write_official_checkpoint(root / "checkpoint", params, params_ema, OFFICIAL_STEP)
    workdir = root / "run"
    result = run_module(
        "shortcut_jax.tools.import_official",
        f"--from={source}",
        f"--config={REPO / 'tests' / 'tiny.py'}",
        f"--out={workdir}",
        f"--num_heads={HEADS}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, params, params_ema


def test_imported_run_computes_the_official_outputs(imported):
    workdir, params, params_ema = imported
    x, t, levels, labels = _inputs()
    for raw, official in ((True, params), (False, params_ema)):
        config, ours_params, step = checkpoint.load_params(str(workdir), raw=raw)
        assert step == OFFICIAL_STEP - 1
        reference = official_forward(official, x, t, levels, labels, HEADS)
        assert _max_difference(_ours(config, ours_params, x, t, levels, labels), reference) < (
            TOLERANCE
        )
    record = json.loads((workdir / "import.json").read_text())
    assert record["official_step"] == OFFICIAL_STEP
    assert record["architecture"]["num_heads"] == HEADS
    assert config.model.time_scale == 1.0 and config.data.num_classes == CLASSES


def test_flow_matching_and_unconditional_checkpoints_map_exactly():
    """train_type 'naive' (dt ignored) and a one-class model always sampled with the null label."""
    params = _params(3, num_classes=1)
    arch = official_params.architecture(params)
    base = tiny_mnist_config()
    base.data.num_classes = 0
    config = import_official.run_config(base, arch, HEADS, "naive", 128)
    assert config.objective == "flow_matching"
    ours = official_params.map_params(params, arch, HEADS, num_classes=0, ignore_dt=True)
    x, t, levels, _ = _inputs(seed=1)
    labels = np.zeros_like(levels, dtype=np.int32)  # our only row: the null label
    reference = official_forward(params, x, t, levels, labels + 1, HEADS, ignore_dt=True)
    assert _max_difference(_ours(config, ours, x, t, levels, labels), reference) < TOLERANCE


def test_sample_cli_runs_on_the_imported_run(imported, tmp_path):
    workdir = imported[0]
    out = tmp_path / "samples.npz"
    result = run_module(
        "shortcut_jax.sample",
        f"--workdir={workdir}",
        "--steps=2",
        "--num=4",
        "--batch_size=4",
        "--raw_params",
        f"--out={out}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as samples:
        assert samples["arr_0"].shape == (4, 28, 28, 1) and samples["arr_0"].dtype == np.uint8


def _same_arrays(tree, expected) -> None:
    flat, flat_expected = jax.tree.leaves(tree), jax.tree.leaves(expected)
    assert len(flat) == len(flat_expected)
    for got, want in zip(flat, flat_expected, strict=True):
        assert isinstance(got, np.ndarray) and np.array_equal(got, np.asarray(want))


def test_numpy1_names_frozendicts_and_jax_arrays_are_rebuilt_as_numpy(tmp_path):
    """What other versions of the official environment may have pickled, read as plain data."""
    from flax.core import FrozenDict

    params = _params(4)
    # numpy 1 module names (the official environment) in a protocol-2 pickle (text GLOBALs).
    old = pickle.dumps({"train_state": {"params": params}}, protocol=2)
    old = old.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in old and b"_codecs" in old
    (tmp_path / "old").write_bytes(old)
    data, _ = official_pickle.read_checkpoint(str(tmp_path / "old"))
    _same_arrays(data["train_state"]["params"], params)

    frozen = {"params": FrozenDict(params), "step": jnp.asarray(7)}
    frozen["opt_state"] = official_opt_state(params)
    frozen["params_ema"] = jax.tree.map(jnp.asarray, params)  # jax arrays
    (tmp_path / "frozen").write_bytes(pickle.dumps({"train_state": frozen, "config": _config()}))
    data, source = official_pickle.read_checkpoint(str(tmp_path / "frozen"))
    state = data["train_state"]
    assert type(state["params"]) is dict and int(state["step"]) == 7
    _same_arrays(state["params"], params)
    _same_arrays(state["params_ema"], params)
    assert type(state["opt_state"][0][0]) is tuple  # optax namedtuples as plain tuples
    assert official_pickle.official_config(data)["num_heads"] == HEADS
    assert source["bytes"] == (tmp_path / "frozen").stat().st_size


def _config() -> ml_collections.ConfigDict:
    """A config as the official train.py's FLAGS.model (with a FieldReference inside)."""
    config = ml_collections.ConfigDict({"model": {"num_heads": HEADS, "train_type": "shortcut"}})
    config.model.depth = config.model.get_ref("num_heads")
    return config


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_naming_the_class_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    params = _params(5)
    params["DiTBlock_0"]["Dense_0"]["kernel"] = _RunsACommand(marker)
    source = tmp_path / "malicious"
    source.write_bytes(pickle.dumps({"train_state": {"params": params}}))
    pickle.loads(source.read_bytes())  # a plain unpickler runs the command
    assert marker.exists()
    marker.unlink()
    with pytest.raises(official_pickle.UnsafeCheckpointError, match=r"posix\.system"):
        official_pickle.read_checkpoint(str(source))
    assert not marker.exists()
    result = run_module(
        "shortcut_jax.tools.import_official",
        f"--from={source}",
        f"--config={REPO / 'tests' / 'tiny.py'}",
        f"--out={tmp_path / 'run'}",
        timeout=300,
    )
    assert result.returncode == cli_inputs.FAILURE_EXIT_CODE and not marker.exists()
    assert "posix.system" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_flags_that_do_not_fit_the_checkpoint_exit_2(tmp_path):
    source = write_official_checkpoint(tmp_path / "checkpoint", _params(9), _params(9), 10)
    result = run_module(  # width 32, depth 2 is no DiT preset: the heads must be given
        "shortcut_jax.tools.import_official",
        f"--from={source}",
        f"--config={REPO / 'tests' / 'tiny.py'}",
        f"--out={tmp_path / 'run'}",
        timeout=300,
    )
    assert result.returncode == cli_inputs.USAGE_EXIT_CODE, result.stderr[-2000:]
    assert "--num_heads" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_corrupt_and_foreign_files_give_one_clear_error(tmp_path):
    whole = write_official_checkpoint(tmp_path / "whole", _params(6), _params(6), 10).read_bytes()
    for name, content in (
        ("truncated", whole[: len(whole) // 2]),
        ("corrupt", b"\x80\x04\x95 not a pickle" + bytes(range(256))),
        ("empty", b""),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(official_pickle.OfficialCheckpointError, match="truncated or corrupt"):
            official_pickle.read_checkpoint(str(tmp_path / name))
    (tmp_path / "foreign").write_bytes(pickle.dumps({"weights": np.zeros(3)}))
    data, _ = official_pickle.read_checkpoint(str(tmp_path / "foreign"))
    with pytest.raises(official_pickle.OfficialCheckpointError, match="no train_state.params"):
        official_pickle.train_state_of(data, "foreign")


def test_a_local_official_save_directory_is_read(tmp_path):
    """utils/checkpoint.py saving to a local path leaves the file as PATH/NAME.tmp."""
    (tmp_path / "save50").mkdir()
    params = _params(7)
    write_official_checkpoint(tmp_path / "save50" / "save50.tmp", params, params, 50)
    data, source = official_pickle.read_checkpoint(str(tmp_path / "save50"))
    assert source["path"].endswith("save50.tmp")
    _same_arrays(data["train_state"]["params"], params)


def test_import_refuses_what_it_cannot_map(tmp_path):
    params = _params(8)
    arch = official_params.architecture(params)
    with pytest.raises(import_official.ImportSettingError, match="--num_heads"):
        import_official.resolve_num_heads(None, {}, arch)
    base = tiny_mnist_config()
    base.data.channels = 3
    with pytest.raises(import_official.ImportSettingError, match="1 channels"):
        import_official.run_config(base, arch, HEADS, "shortcut", 128)
    with pytest.raises(import_official.ImportSettingError, match="importable are"):
        import_official.run_config(tiny_mnist_config(), arch, HEADS, "consistency", 128)
    base = tiny_mnist_config()
    base.data.num_classes = 3
    with pytest.raises(import_official.ImportSettingError, match="data.num_classes = 3"):
        import_official.run_config(base, arch, HEADS, "shortcut", 128)
    with pytest.raises(official_pickle.OfficialCheckpointError, match="data.num_classes = 3"):
        official_params.map_params(params, arch, HEADS, num_classes=3)
    params["DiTBlock_1"]["Dense_4"]["bias"] = np.zeros(HIDDEN + 1, np.float32)
    with pytest.raises(official_pickle.OfficialCheckpointError, match="DiTBlock_1/Dense_4/bias"):
        official_params.architecture(params)


def test_official_fid_statistics_read_as_ref_stats(tmp_path):
    """The official train.py reads --fid_stats with np.load(path)['mu'] and ['sigma']: an .npz
    (its published files are data/imagenet256_fidstats_ours.npz, celeba256_fidstats_ours.npz)."""
    rng = np.random.default_rng(0)
    activations = rng.standard_normal((64, 16)).astype(np.float32)
    mu, sigma = np.mean(activations, axis=0), np.cov(activations, rowvar=False)
    path = tmp_path / "imagenet256_fidstats_ours.npz"
    np.savez(path, mu=mu, sigma=sigma)  # float32 mu, float64 sigma, as that code computes them
    official = np.load(path)  # how the official code reads it
    loaded_mu, loaded_sigma = fid.load_statistics(str(path))
    assert np.array_equal(loaded_mu, official["mu"]) and np.array_equal(loaded_sigma, sigma)
    assert fid.frechet_distance(loaded_mu, loaded_sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
