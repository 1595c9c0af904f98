"""Files written through atomic_files appear whole or not at all."""

import json
import os
import threading

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


def test_writers_sharing_a_name_never_leave_a_mixed_or_partial_file(tmp_path):
    path = tmp_path / "reference_features.npz"
    big = {value: np.full((200, 256), value, np.float32) for value in (1.0, 2.0)}

    def write(value: float) -> None:
        for _ in range(10):
            atomic_files.write_npz(path, features=big[value])

    threads = [threading.Thread(target=write, args=(value,)) for value in big]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if path.exists():
            with np.load(path) as stored:  # never truncated, never two writers mixed
                values = np.unique(stored["features"])
            assert len(values) == 1 and float(values[0]) in big
    for thread in threads:
        thread.join()
    assert os.listdir(tmp_path) == [path.name]


def test_bucket_files_appear_whole_or_not_at_all(gcs_bucket):
    from etils import epath

    target = f"{gcs_bucket}/reports/result.json"
    atomic_files.write_json(target, {"fid": 1.5})
    assert json.loads(epath.Path(target).read_text()) == {"fid": 1.5}
    failed = f"{gcs_bucket}/reports/failed.bin"
    with pytest.raises(RuntimeError), atomic_files.atomic_path(failed) as local:
        with open(local, "wb") as handle:
            handle.write(b"x" * 1000)
        raise RuntimeError("the writer fails after 1000 bytes")
    assert not epath.Path(failed).exists()
