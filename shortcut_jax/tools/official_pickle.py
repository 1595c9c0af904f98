"""Reads checkpoints of the paper's official code with a restricted unpickler.

The official `utils/checkpoint.py` writes `pickle.dumps` of
``{'train_state': {'params', 'params_ema', 'opt_state', 'step'}, '_timestamp': float}``, the
arrays numpy ones (`process_allgather` returns numpy), the optimizer state optax's namedtuples;
saved to a local path, the file lands in a directory of that name as ``NAME.tmp``. `read_checkpoint`
rebuilds only numpy arrays (`numpy.core` and `numpy._core` names), dtypes and plain containers:
flax FrozenDicts become dicts, pickled jax arrays numpy arrays, optax ``*State`` namedtuples plain
tuples and ml_collections ConfigDicts / FieldReferences dicts and values; none of those classes is
imported or run. Every other global stops the load before anything is built from it
(`UnsafeCheckpointError`, naming ``module.name``); truncated or corrupt bytes give one
`OfficialCheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from typing import Any

import numpy as np
from etils import epath


class OfficialCheckpointError(ValueError):
    """The file is not a checkpoint of the official code this tool can import."""

    exit_code = 1  # a bad input file, not a bad command line (`cli_inputs` exit statuses)


class UnsafeCheckpointError(OfficialCheckpointError):
    """The pickle names a class the restricted unpickler does not rebuild."""


# ------------------------------------------------------------------ restricted unpickling


class _StateRecord(tuple):
    """Stands in for an optax state namedtuple: its fields as a plain tuple."""

    __slots__ = ()

    def __new__(cls, *fields: Any) -> _StateRecord:
        return super().__new__(cls, fields)


class _ConfigRecord(dict):
    """Stands in for an ml_collections ConfigDict: keeps the fields of its pickled state."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state.get("_fields", {}))


class _ReferenceRecord:
    """Stands in for an ml_collections FieldReference: keeps its stored value."""

    value: Any = None

    def __setstate__(self, state: Any) -> None:
        self.value = state.get("_value") if isinstance(state, dict) else None


def _numpy_functions() -> dict[str, Any]:
    try:  # numpy >= 2 keeps these in numpy._core; files written with numpy 1 name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric
    found = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    return {**found, "_frombuffer": numeric._frombuffer}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles of bytes use it (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _rebuild_jax_array(rebuild: Any, args: tuple, state: Any, aval_state: Any = None) -> Any:
    """A pickled jax.Array as the numpy array it wraps (`rebuild` passed the allow-list)."""
    del aval_state
    if rebuild is not _NUMPY["_reconstruct"]:
        raise UnsafeCheckpointError("a pickled jax array that is not rebuilt from numpy")
    array = rebuild(*args)
    array.__setstate__(state)
    return array


_NUMPY = _numpy_functions()
# Type objects a pickled FieldReference names as its field type.
_BUILTINS = {kind.__name__: kind for kind in (int, float, bool, str, tuple, list, dict, type(None))}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): dict,
    ("flax.core.frozen_dict", "FrozenDict"): dict,
    ("jax._src.array", "_reconstruct_array"): _rebuild_jax_array,
    ("ml_collections.config_dict.config_dict", "ConfigDict"): _ConfigRecord,
    ("ml_collections.config_dict.config_dict", "FrozenConfigDict"): _ConfigRecord,
    ("ml_collections.config_dict.config_dict", "FieldReference"): _ReferenceRecord,
    **{("builtins", name): kind for name, kind in _BUILTINS.items()},
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _NUMPY["_reconstruct"]
    _ALLOWED[(_module, "scalar")] = _NUMPY["scalar"]
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_module, "_frombuffer")] = _NUMPY["_frombuffer"]
_STATE_RECORDS: dict[str, type] = {}


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only the allow-listed callables; refuses every other global by name."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module == "optax" or module.startswith("optax.")) and name.endswith("State"):
            key = f"{module}.{name}"
            return _STATE_RECORDS.setdefault(key, type(name, (_StateRecord,), {"__slots__": ()}))
        raise UnsafeCheckpointError(
            f"the checkpoint names the class {module}.{name}, which the restricted unpickler "
            "does not rebuild (only numpy arrays and plain containers): it was not loaded"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"the checkpoint holds a persistent reference {pid!r}")


def _plain(value: Any) -> Any:
    """Stand-ins replaced by plain dicts and tuples, throughout."""
    if isinstance(value, _ReferenceRecord):
        return _plain(value.value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_plain(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


class _HashingReader(io.RawIOBase):
    """A binary file whose bytes are hashed as they are read."""

    def __init__(self, handle: Any):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.handle.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def source_file(path: str) -> epath.Path:
    """The checkpoint file at `path`, or the single file in the directory `path` (the official
    `Checkpoint.save` leaves a local checkpoint as `path/NAME.tmp`)."""
    file = epath.Path(path)
    if file.is_dir():
        inside = [entry for entry in file.iterdir() if entry.is_file()]
        if len(inside) != 1:
            raise OfficialCheckpointError(
                f"--from {path} is a directory with {len(inside)} files: pass the checkpoint "
                "file itself"
            )
        return inside[0]
    if not file.exists():
        raise OfficialCheckpointError(f"--from {path}: no such file")
    return file


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads an official checkpoint with the restricted unpickler.

    Returns:
      (the unpickled dict as plain data, {'path', 'sha256', 'bytes'} of the file read).

    Raises:
      UnsafeCheckpointError: naming the first class the file would rebuild that is not allowed.
      OfficialCheckpointError: for a missing, truncated or corrupt file.
    """
    file = source_file(path)
    with file.open("rb") as handle:
        reader = _HashingReader(handle)
        try:
            data = _RestrictedUnpickler(io.BufferedReader(reader, 1 << 20)).load()
        except UnsafeCheckpointError as error:
            raise UnsafeCheckpointError(f"{file}: {error}") from None
        except Exception as error:  # noqa: BLE001 - pickle and numpy raise many kinds on bad bytes
            raise OfficialCheckpointError(
                f"{file} is not a readable checkpoint of the official code (truncated or corrupt: "
                f"{type(error).__name__}: {error}); download it again"
            ) from None
    if not isinstance(data, dict):
        raise OfficialCheckpointError(f"{file} holds a {type(data).__name__}, not a dict")
    source = {"path": str(file), "sha256": reader.digest.hexdigest(), "bytes": reader.size}
    return _plain(data), source


def train_state_of(data: dict[str, Any], path: str) -> dict[str, Any]:
    """The saved train state ({'params', ...}) of an unpickled official checkpoint."""
    state = data.get("train_state", data)
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise OfficialCheckpointError(
            f"{path} has no train_state.params (its keys: {sorted(map(str, data))}): is it a "
            "checkpoint written by the official train.py?"
        )
    return state


def official_config(data: dict[str, Any]) -> dict[str, Any]:
    """The official run's model config, if the file holds one (`train.py` saves none: {})."""
    saved = data.get("config")
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        saved = saved["model"]
    return saved if isinstance(saved, dict) else {}
