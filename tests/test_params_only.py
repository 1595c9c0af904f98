"""`checkpoint.load_params` reads one parameter set of a checkpoint and nothing else.

The proof deletes every other field's arrays from a saved checkpoint (the keys of its OCDBT
database) and restores the parameters anyway, while `load_run` fails on the same files; the
bytes tensorstore reads are counted; a subprocess with 8 CPU devices restores onto other meshes.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
import tensorstore as ts
from tiny import run_on_cpu_devices, tiny_mnist_config

from shortcut_jax import checkpoint, models, optim
from shortcut_jax.state import TrainState, init_state

STEP = 3
FIELDS = ("params", "opt_state", "ema_params", "teacher_params")


def random_state(config) -> TrainState:
    """The initial state with every float leaf redrawn, so each field holds its own values (and
    the optimizer moments are not zeros, which would compress to nothing on disk)."""
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    state = jax.jit(functools.partial(init_state, config, model, optimizer))()
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(key, leaf.shape, leaf.dtype)
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
            else leaf
            for key, leaf in zip(keys, leaves, strict=True)
        ],
    )


def save_run(workdir: str, config) -> TrainState:
    """Saves a random state of `config` at STEP in `workdir` (as training does); returns it."""
    state = random_state(config)
    manager = checkpoint.make_manager(workdir, for_training=True)
    checkpoint.save(manager, state, config, STEP)
    manager.wait_until_finished()
    manager.close()
    return state


def saved_fields(workdir) -> dict[str, int]:
    """{top-level field of the saved state: number of keys in its OCDBT database}."""
    keys = _state_store(workdir).list().result()
    counts: dict[str, int] = {}
    for key in keys:
        name = key.decode().split("/")[0].split(".")[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def delete_all_but(workdir, keep: str) -> None:
    """Deletes the arrays of every saved field except `keep` (and their metadata)."""
    store = _state_store(workdir)
    for name in saved_fields(workdir):
        if name != keep:  # keys 'name.sub.leaf/...' and 'name/...': '.' < '/' < '0'
            store.delete_range(ts.KvStore.KeyRange(name + ".", name + "0")).result()
    assert set(saved_fields(workdir)) == {keep}


def _state_store(workdir):
    path = checkpoint.checkpoint_dir(str(workdir)) / str(STEP) / "state"
    return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/"}).result()


def assert_tree_equal(restored, saved) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def tiny(**fields):
    config = tiny_mnist_config()
    for name, value in fields.items():
        config[name] = value
    return config


def distillation_config():
    config = tiny_mnist_config()
    config.objective = "consistency_distillation"
    config.teacher.workdir = "/nonexistent/teacher"  # a frozen teacher: not part of the state
    return config


CONFIGS = {
    "shortcut": tiny,
    # The EMA teacher is ema_params itself (teacher_ema_rate == ema_rate): no teacher_params.
    "shared_ema_teacher": functools.partial(
        tiny, bootstrap_teacher="ema", teacher_ema_rate=0.999, ema_rate=0.999
    ),
    "own_ema_teacher": functools.partial(
        tiny, bootstrap_teacher="ema", teacher_ema_rate=0.99, ema_rate=0.999
    ),
    "distillation": distillation_config,
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_params_reads_the_ema_alone_and_load_run_cannot(name, tmp_path):
    config = CONFIGS[name]()
    saved = save_run(str(tmp_path), config)
    wants_teacher = name in ("own_ema_teacher", "distillation")
    assert (saved.teacher_params is not None) == wants_teacher
    assert {"opt_state", "params", "ema_params"} <= set(saved_fields(tmp_path))

    delete_all_but(tmp_path, "ema_params")
    restored_config, params, step = checkpoint.load_params(str(tmp_path))
    assert step == STEP and restored_config.objective == config.objective
    assert_tree_equal(params, saved.ema_params)
    with pytest.raises(checkpoint.CheckpointError, match="opt_state|params"):
        checkpoint.load_run(str(tmp_path))


def test_raw_params_are_read_without_the_ema_or_the_optimizer(tmp_path):
    saved = save_run(str(tmp_path), tiny())
    delete_all_but(tmp_path, "params")
    _, params, _ = checkpoint.load_params(str(tmp_path), raw=True)
    assert_tree_equal(params, saved.params)
    with pytest.raises(checkpoint.CheckpointError, match="ema_params"):
        checkpoint.load_params(str(tmp_path))  # the EMA is gone: named, not silently replaced


def file_bytes_read() -> int:
    """Bytes tensorstore has read from local files in this process so far."""
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return int(metrics[0]["values"][0]["value"]) if metrics else 0


def test_load_params_reads_a_quarter_of_the_bytes_of_the_whole_state(tmp_path):
    saved = save_run(str(tmp_path), tiny())
    before = file_bytes_read()
    checkpoint.load_params(str(tmp_path))
    params_only = file_bytes_read() - before
    before = file_bytes_read()
    checkpoint.load_run(str(tmp_path))
    whole = file_bytes_read() - before
    ema_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(saved.ema_params))
    # params, ema_params and Adam's two moments: the EMA is a quarter of the arrays (stored with
    # zstd, so random floats take a little less than their size).
    assert 0.8 * ema_bytes < params_only < 0.3 * whole, (params_only, whole, ema_bytes)


def test_load_params_from_a_bucket(tmp_path, gcs_bucket):
    workdir = f"{gcs_bucket}/runs/tiny"
    saved = save_run(workdir, tiny())
    config, params, step = checkpoint.load_params(workdir)
    assert step == STEP and config.model.hidden_size == 32
    assert_tree_equal(params, saved.ema_params)
    assert not (tmp_path / "gs:").exists()


_MESH_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from shortcut_jax import checkpoint, sharding
from tiny import tiny_mnist_config

workdir, expected = sys.argv[1], np.load(sys.argv[2])
result = {}
for name, sizes in {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}.items():
    config = tiny_mnist_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
    mesh = sharding.make_mesh(config)
    restored, params, _ = checkpoint.load_params(workdir, mesh=mesh)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    result[name] = {
        "equal": all(
            np.array_equal(np.asarray(leaf), expected[jax.tree_util.keystr(path)])
            for path, leaf in leaves
        ),
        "sharded": sum(not leaf.sharding.is_fully_replicated for _, leaf in leaves),
        "on_mesh": all(leaf.sharding.mesh == mesh for _, leaf in leaves),
        "leaves": len(leaves),
        "config_mesh": (restored.mesh.data, restored.mesh.fsdp, restored.mesh.tensor) == sizes,
    }
print(json.dumps(result))
"""


def test_params_saved_on_one_device_restore_onto_other_meshes(tmp_path):
    saved = save_run(str(tmp_path / "run"), tiny())
    expected = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(saved.ema_params)[0]
    }
    np.savez(tmp_path / "expected.npz", **expected)
    output = run_on_cpu_devices(
        f"import sys; sys.argv = ['', {str(tmp_path / 'run')!r}, "
        f"{str(tmp_path / 'expected.npz')!r}]\n" + _MESH_SCRIPT
    )
    result = json.loads(output.strip().splitlines()[-1])
    for name, checks in result.items():
        assert checks["leaves"] == len(expected), name
        assert checks["equal"] and checks["on_mesh"] and checks["config_mesh"], (name, checks)
        assert checks["sharded"] > 0, (name, checks)  # really split, not replicated


def test_at_dit_xl2_the_ema_is_a_quarter_of_the_train_state():
    import runpy

    from tiny import REPO

    config = runpy.run_path(str(REPO / "experiments" / "imagenet256.py"))["get_config"]("xl")
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    state = jax.eval_shape(functools.partial(init_state, config, model, optimizer))

    def size(tree) -> int:
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))

    assert sum(leaf.size for leaf in jax.tree.leaves(state.ema_params)) == 676_440_592
    assert size(state.ema_params) == 2_705_762_368  # 2.52 GiB read by load_params
    assert state.teacher_params is None  # the paper config's EMA teacher is ema_params
    assert size(state.opt_state) == 2 * size(state.params) + 8  # Adam's moments and a count
    assert size(state) == 10_823_049_492  # 10.08 GiB read by load_run: 4 copies + step, rng
