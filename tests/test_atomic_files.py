"""Files written through atomic_files appear whole or not at all."""

import json
import os

import numpy as np
import pytest

from shortcut_jax import atomic_files


def test_write_json_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_files.write_json(path, {"a": 1})
    atomic_files.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["results.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(RuntimeError), atomic_files.atomic_path(path) as temporary:
        np.savez(temporary, x=np.ones(3))
        raise RuntimeError("killed mid-write")
    assert np.load(path)["x"].sum() == 0
    assert os.listdir(tmp_path) == ["samples.npz"]


def test_temporary_names_are_unique_and_keep_the_suffix(tmp_path):
    path = tmp_path / "grid.png"
    names = set()
    for _ in range(3):
        with atomic_files.atomic_path(path) as temporary:
            assert temporary.endswith(".png") and os.path.dirname(temporary) == str(tmp_path)
            names.add(temporary)
            open(temporary, "wb").close()
    assert len(names) == 3
