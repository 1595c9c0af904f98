"""Files that appear whole or not at all: a unique temporary sibling, then a rename.

Local paths are written to `NAME.tmp-<pid>-<random>` in the same directory and renamed over
`NAME` (`os.replace` is atomic on POSIX), so a killed writer leaves at most a temporary file and
two writers sharing a directory never write into each other's temporary. Bucket paths (gs://...)
are written to a local temporary file and uploaded in one `put_file` (`upload_file`): the object
store makes a finished upload visible at once, and an interrupted one leaves no object, which is
the same guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

TEMPORARY_MARK = ".tmp-"


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names a bucket object (gs://, s3://, ...) rather than a local file."""
    return "://" in str(path)


def temporary_sibling(path: str | os.PathLike) -> str:
    """A fresh, unique temporary name in the directory of the local `path`."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".{name}{TEMPORARY_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, make_parents: bool = True) -> Iterator[str]:
    """Yields a local path to write; on success it becomes `path`, on error it is removed.

    For libraries that only write to a file name (np.savez, PIL, matplotlib). The yielded name
    keeps the suffix of `path`, so writers that pick a format from it (or append one) agree.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1]
    if is_remote(path):
        with tempfile.TemporaryDirectory() as scratch:
            local = os.path.join(scratch, "file" + suffix)
            yield local
            if make_parents:
                epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
            upload_file(local, path)
        return
    if make_parents:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_sibling(path) + suffix
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def bucket_filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a bucket `path`: the instance etils.epath uses.

    Sharing epath's instance keeps its listing cache coherent with what we upload.
    """
    backend = getattr(epath.Path(path), "_backend", None)
    fs_of = getattr(backend, "fs", None)
    if fs_of is not None:
        try:
            fs = fs_of(path)
            return fs, fs._strip_protocol(path)
        except AttributeError:  # epath on tf.io.gfile: no fsspec instance to share
            pass
    import fsspec

    return fsspec.core.url_to_fs(path)


def upload_file(local: str, remote: str) -> None:
    """Uploads the local file `local` as the object `remote` in one upload.

    The object appears when the upload completes; an interrupted one leaves no object (a file
    object opened for writing on a bucket would publish what it had on close, even on error).
    """
    fs, path = bucket_filesystem(remote)
    fs.put_file(local, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` (local or bucket) atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Writes `value` as JSON to `path` atomically."""
    write_text(path, json.dumps(value, indent=indent, sort_keys=True) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """Writes `arrays` as an uncompressed .npz at exactly `path` (no suffix added), atomically.

    Args:
      path: destination, local or a bucket path.
      **arrays: name -> array, as for `np.savez` (object arrays are refused by readers that load
        with allow_pickle=False, so pass numeric or string arrays).
    """
    import numpy as np

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


def probe_writable(directory: str | os.PathLike) -> None:
    """Creates `directory` (local or bucket) and writes and deletes a uniquely named probe file.

    Raises:
      OSError: when the directory cannot be created or written (the caller names the flag).
    """
    path = epath.Path(directory)
    probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=True)
    write_bytes(probe, b"probe")
    probe.unlink()
