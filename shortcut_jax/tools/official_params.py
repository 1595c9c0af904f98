"""The official DiT's parameters (kvfrans/shortcut-models `model.py`) as our DiT's.

`architecture` reads and checks the sizes from the shapes; `map_params` renames and relayouts
every parameter so that our `models.DiT` (with config.model.time_scale = 1.0) computes the
official forward pass:

  PatchEmbed_0/Conv_0                 -> patch_embed
  TimestepEmbedder_0/Dense_0, Dense_1 -> conditioning/t_embedder/fc1, fc2 (t)
  TimestepEmbedder_1/Dense_0, Dense_1 -> conditioning/d_embedder/fc1, fc2 (dt = log2(steps))
  LabelEmbedder_0/Embed_0/embedding   -> conditioning/y_embedder/table/embedding
  DiTBlock_i/Dense_0                  -> block_i/ada_ln ((D, 6D) -> (D, 6, D))
  DiTBlock_i/Dense_2, Dense_1, Dense_3 (q, k, v) -> block_i/attn/qkv ((D, 3, H, D/H))
  DiTBlock_i/Dense_4                  -> block_i/attn/out ((H, D/H, D))
  DiTBlock_i/MlpBlock_0/Dense_0, _1   -> block_i/mlp/fc1, fc2
  FinalLayer_0/Dense_0, Dense_1       -> final_layer/ada_ln ((D, 2, D)), final_layer/proj
  Embed_0 (a logvar table the forward pass does not use) is dropped.

Where the two forward passes differ, the parameters absorb it exactly:
- the official position embedding puts each token's column features before its row features,
  ours the row first: our residual stream is the official one with its width rotated by half
  (every kernel writing the stream is rotated on its output axis, every kernel reading it on its
  input axis; the layer norms have no affine parameters, so the rotation commutes with them);
- the official attention divides q by the head size, ours by its square root: q's kernel and bias
  carry the other factor head**-0.5;
- train_type 'naive' runs with dt = 0 always: that constant embedding is added to every label row
  and our d embedder is zeroed.
The official t is embedded unscaled (config.model.time_scale = 1.0) and its dt level log2(steps) is
our -log2(d): the same numbers. Everything else (sin-cos orders, GELU tanh, eps 1e-6 layer norms,
adaLN chunk order shift, scale, gate, the unpatchify layout) is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from shortcut_jax.tools.official_pickle import OfficialCheckpointError

FREQUENCIES = 256  # sinusoidal features of the official TimestepEmbedder (as ours)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The official DiT's sizes, read from its parameter shapes."""

    hidden_size: int
    depth: int
    patch_size: int
    channels: int
    mlp_hidden: int
    label_rows: int


def _get(params: dict[str, Any], path: str) -> np.ndarray:
    node: Any = params
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise OfficialCheckpointError(f"the official parameters have no {path}")
        node = node[part]
    array = np.asarray(node)
    if not np.issubdtype(array.dtype, np.floating):
        raise OfficialCheckpointError(f"parameter {path} has dtype {array.dtype}, not a float")
    return array


def _expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    d, p = arch.hidden_size, arch.patch_size
    shapes = {
        "PatchEmbed_0/Conv_0/kernel": (p, p, arch.channels, d),
        "PatchEmbed_0/Conv_0/bias": (d,),
        "LabelEmbedder_0/Embed_0/embedding": (arch.label_rows, d),
        "FinalLayer_0/Dense_0/kernel": (d, 2 * d),
        "FinalLayer_0/Dense_0/bias": (2 * d,),
        "FinalLayer_0/Dense_1/kernel": (d, p * p * arch.channels),
        "FinalLayer_0/Dense_1/bias": (p * p * arch.channels,),
    }
    for embedder in ("TimestepEmbedder_0", "TimestepEmbedder_1"):
        shapes.update(
            {f"{embedder}/Dense_0/kernel": (FREQUENCIES, d), f"{embedder}/Dense_0/bias": (d,)}
        )
        shapes.update({f"{embedder}/Dense_1/kernel": (d, d), f"{embedder}/Dense_1/bias": (d,)})
    for i in range(arch.depth):
        block = f"DiTBlock_{i}"
        shapes.update({f"{block}/Dense_0/kernel": (d, 6 * d), f"{block}/Dense_0/bias": (6 * d,)})
        for j in (1, 2, 3, 4):
            shapes.update({f"{block}/Dense_{j}/kernel": (d, d), f"{block}/Dense_{j}/bias": (d,)})
        mlp = f"{block}/MlpBlock_0"
        shapes.update(
            {
                f"{mlp}/Dense_0/kernel": (d, arch.mlp_hidden),
                f"{mlp}/Dense_0/bias": (arch.mlp_hidden,),
            }
        )
        shapes.update({f"{mlp}/Dense_1/kernel": (arch.mlp_hidden, d), f"{mlp}/Dense_1/bias": (d,)})
    return shapes


def _flat_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict):
            paths += _flat_paths(value, f"{prefix}{key}/")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def architecture(params: dict[str, Any]) -> Architecture:
    """Reads the sizes from the shapes and checks every parameter of the official DiT.

    Raises:
      OfficialCheckpointError: naming a missing, extra or misshapen parameter.
    """
    patch_kernel = _get(params, "PatchEmbed_0/Conv_0/kernel")
    if patch_kernel.ndim != 4 or patch_kernel.shape[0] != patch_kernel.shape[1]:
        raise OfficialCheckpointError(f"PatchEmbed_0/Conv_0/kernel has shape {patch_kernel.shape}")
    depth = sum(1 for name in params if name.startswith("DiTBlock_"))
    arch = Architecture(
        hidden_size=patch_kernel.shape[3],
        depth=depth,
        patch_size=patch_kernel.shape[0],
        channels=patch_kernel.shape[2],
        mlp_hidden=_get(params, "DiTBlock_0/MlpBlock_0/Dense_0/kernel").shape[1] if depth else 0,
        label_rows=_get(params, "LabelEmbedder_0/Embed_0/embedding").shape[0],
    )
    if depth == 0 or arch.hidden_size % 4:
        raise OfficialCheckpointError(f"not an official DiT (depth {depth}, {arch})")
    expected = _expected_shapes(arch)
    for path, shape in expected.items():
        if _get(params, path).shape != shape:
            raise OfficialCheckpointError(
                f"parameter {path} has shape {_get(params, path).shape}, expected {shape}"
            )
    extra = [p for p in _flat_paths(params) if p not in expected and not p.startswith("Embed_0/")]
    if extra:
        raise OfficialCheckpointError(f"unknown parameters in the official checkpoint: {extra}")
    return arch


def map_params(
    params: dict[str, Any],
    arch: Architecture,
    num_heads: int,
    num_classes: int,
    ignore_dt: bool = False,
) -> dict[str, Any]:
    """The official DiT's parameters as ours (float32 numpy), for the same forward pass.

    Our residual stream is the official one with its width rotated by half (`stream[r] =
    official[(r + D/2) % D]`), which turns the official position embedding (column features
    first) into ours (row first); kernels writing the stream take `[..., rotate]`, kernels
    reading it `[rotate]`. The conditioning vector is not rotated.

    Args:
      params: the official parameter dict (checked by `architecture`).
      arch: its sizes.
      num_heads: attention heads (not in the shapes).
      num_classes: our real classes: label_rows - 1, or 0 to keep only the null (last) row.
      ignore_dt: the model was trained with ignore_dt (train_type 'naive'): dt is always 0.
    """
    d, heads = arch.hidden_size, num_heads
    head = d // heads
    rotate = (np.arange(d) + d // 2) % d

    def get(path: str) -> np.ndarray:
        return np.asarray(_get(params, path), np.float32)

    def dense(path: str, kernel: np.ndarray | None = None, bias: np.ndarray | None = None) -> dict:
        return {
            "kernel": get(f"{path}/kernel") if kernel is None else kernel,
            "bias": get(f"{path}/bias") if bias is None else bias,
        }

    def embedder(name: str) -> dict:
        return {"fc1": dense(f"{name}/Dense_0"), "fc2": dense(f"{name}/Dense_1")}

    table = np.asarray(get("LabelEmbedder_0/Embed_0/embedding"), np.float64)
    d_embedder = embedder("TimestepEmbedder_1")
    if ignore_dt:  # the constant embedding of dt = 0 moves into every label row
        table = table + _embedding_of_zero(d_embedder)
        d_embedder = {k: {n: np.zeros_like(a) for n, a in v.items()} for k, v in d_embedder.items()}
    if num_classes == 0:
        table = table[-1:]
    elif num_classes != arch.label_rows - 1:
        raise OfficialCheckpointError(
            f"the checkpoint has {arch.label_rows - 1} classes (+ the null label), the config "
            f"data.num_classes = {num_classes}: use {arch.label_rows - 1}, or 0 for a model "
            "always sampled with the null label"
        )
    ours: dict[str, Any] = {
        "patch_embed": dense(
            "PatchEmbed_0/Conv_0",
            get("PatchEmbed_0/Conv_0/kernel")[..., rotate],
            get("PatchEmbed_0/Conv_0/bias")[rotate],
        ),
        "conditioning": {
            "t_embedder": embedder("TimestepEmbedder_0"),
            "d_embedder": d_embedder,
            "y_embedder": {"table": {"embedding": table.astype(np.float32)}},
        },
    }
    q_scale = np.float32(head**-0.5)  # official q / head = ours (q * head**-0.5) * head**-0.5
    for i in range(arch.depth):
        block = f"DiTBlock_{i}"
        qkv_kernels, qkv_biases = [], []
        for layer, scale in (("Dense_2", q_scale), ("Dense_1", 1), ("Dense_3", 1)):  # q, k, v
            qkv_kernels.append(
                get(f"{block}/{layer}/kernel")[rotate].reshape(d, heads, head) * scale
            )
            qkv_biases.append(get(f"{block}/{layer}/bias").reshape(heads, head) * scale)
        ours[f"block_{i}"] = {
            "ada_ln": _modulation(
                get(f"{block}/Dense_0/kernel"), get(f"{block}/Dense_0/bias"), 6, rotate
            ),
            "attn": {
                "qkv": {"kernel": np.stack(qkv_kernels, 1), "bias": np.stack(qkv_biases, 0)},
                "out": {
                    "kernel": get(f"{block}/Dense_4/kernel").reshape(heads, head, d)[..., rotate],
                    "bias": get(f"{block}/Dense_4/bias")[rotate],
                },
            },
            "mlp": {
                "fc1": dense(
                    f"{block}/MlpBlock_0/Dense_0", get(f"{block}/MlpBlock_0/Dense_0/kernel")[rotate]
                ),
                "fc2": dense(
                    f"{block}/MlpBlock_0/Dense_1",
                    get(f"{block}/MlpBlock_0/Dense_1/kernel")[:, rotate],
                    get(f"{block}/MlpBlock_0/Dense_1/bias")[rotate],
                ),
            },
        }
    ours["final_layer"] = {
        "ada_ln": _modulation(
            get("FinalLayer_0/Dense_0/kernel"), get("FinalLayer_0/Dense_0/bias"), 2, rotate
        ),
        "proj": dense("FinalLayer_0/Dense_1", get("FinalLayer_0/Dense_1/kernel")[rotate]),
    }
    return ours


def _modulation(kernel: np.ndarray, bias: np.ndarray, count: int, rotate: np.ndarray) -> dict:
    """An official adaLN Dense (D, count * D) as our (D, count, D) one, chunks rotated."""
    d = kernel.shape[0]
    return {
        "kernel": kernel.reshape(d, count, d)[..., rotate],
        "bias": bias.reshape(count, d)[:, rotate],
    }


def _embedding_of_zero(embedder: dict[str, Any]) -> np.ndarray:
    """The official TimestepEmbedder's output at 0 (features: cos 0 = 1, sin 0 = 0), float64."""
    features = np.concatenate([np.ones(FREQUENCIES // 2), np.zeros(FREQUENCIES // 2)])
    fc1, fc2 = embedder["fc1"], embedder["fc2"]
    h = features @ fc1["kernel"].astype(np.float64) + fc1["bias"]
    h = h / (1.0 + np.exp(-h))
    return h @ fc2["kernel"].astype(np.float64) + fc2["bias"]


def check_finite(tree: dict[str, Any], what: str) -> None:
    """Raises OfficialCheckpointError naming the first parameter of `tree` with NaN or inf."""
    for path in _flat_paths(tree):
        array = np.asarray(_get(tree, path))
        if not np.all(np.isfinite(array)):
            raise OfficialCheckpointError(f"{what} {path} holds NaN or inf values")
