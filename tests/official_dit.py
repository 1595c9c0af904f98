"""The official code's DiT and checkpoint file, rebuilt independently for the import tests.

Written from a reading of kvfrans/shortcut-models (`model.py`, `math_utils.py`,
`utils/checkpoint.py`, `utils/train_state.py`, `train.py`), not copied from it:

- `official_forward`: that DiT's forward pass in float64 numpy, on its parameter dict (flax
  auto-names: `PatchEmbed_0/Conv_0`, `TimestepEmbedder_0` (t), `TimestepEmbedder_1` (dt, the
  log2 step-count level), `LabelEmbedder_0/Embed_0`, `DiTBlock_i/{Dense_0 (adaLN), Dense_1 (k),
  Dense_2 (q), Dense_3 (v), Dense_4 (out), MlpBlock_0/Dense_0..1}`, `FinalLayer_0/Dense_0..1`,
  the unused `Embed_0` logvar table). Details that matter: t is embedded unscaled,
  [cos, sin] of t * 10000^(-i/128); q is divided by the head size (not its square root); the
  position embedding puts the column's [sin, cos] before the row's; GELU is the tanh form.
- `random_official_params`: every parameter drawn at random (also the zero-initialised ones).
- `write_official_checkpoint`: the file `Checkpoint.save` writes at the end of `train.py`:
  `pickle.dumps({'train_state': {'params', 'params_ema', 'opt_state', 'step'}, '_timestamp'})`
  with numpy arrays (what `process_allgather` returns) and optax's AdamW state namedtuples.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

LAYER_NORM_EPS = 1e-6
FREQUENCIES = 256


def _dense(x: np.ndarray, layer: dict[str, np.ndarray]) -> np.ndarray:
    return x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _scalar_embedding(values: np.ndarray, embedder: dict[str, Any]) -> np.ndarray:
    """TimestepEmbedder: [cos, sin](v * 10000^(-i/half)) -> Dense -> SiLU -> Dense."""
    half = FREQUENCIES // 2
    frequencies = np.exp(-math.log(10_000.0) * np.arange(half) / half)
    angles = np.asarray(values, np.float64)[:, None] * frequencies[None, :]
    features = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    return _dense(_silu(_dense(features, embedder["Dense_0"])), embedder["Dense_1"])


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10_000.0 ** (np.arange(dim // 2) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def position_embedding(grid: int, dim: int) -> np.ndarray:
    """(grid * grid, dim): token (row r, column c) at r * grid + c; column features first."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate(
        [
            _sincos_1d(dim // 2, cols.astype(np.float64)),
            _sincos_1d(dim // 2, rows.astype(np.float64)),
        ],
        axis=1,
    )


def _modulate(x: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x * (1.0 + scale[:, None]) + shift[:, None]


def _block(x: np.ndarray, c: np.ndarray, block: dict[str, Any], num_heads: int) -> np.ndarray:
    batch, tokens, hidden = x.shape
    head = hidden // num_heads
    shift1, scale1, gate1, shift2, scale2, gate2 = np.split(
        _dense(_silu(c), block["Dense_0"]), 6, axis=-1
    )
    h = _modulate(_layer_norm(x), shift1, scale1)
    k = _dense(h, block["Dense_1"]).reshape(batch, tokens, num_heads, head)
    q = _dense(h, block["Dense_2"]).reshape(batch, tokens, num_heads, head) / head
    v = _dense(h, block["Dense_3"]).reshape(batch, tokens, num_heads, head)
    weights = _softmax(np.einsum("bqhc,bkhc->bhqk", q, k))
    attended = np.einsum("bhqk,bkhc->bqhc", weights, v).reshape(batch, tokens, hidden)
    x = x + gate1[:, None] * _dense(attended, block["Dense_4"])
    h = _modulate(_layer_norm(x), shift2, scale2)
    mlp = block["MlpBlock_0"]
    h = _dense(_gelu_tanh(_dense(h, mlp["Dense_0"])), mlp["Dense_1"])
    return x + gate2[:, None] * h


def official_forward(
    params: dict[str, Any],
    x: np.ndarray,
    t: np.ndarray,
    dt: np.ndarray,
    labels: np.ndarray,
    num_heads: int,
    ignore_dt: bool = False,
) -> np.ndarray:
    """The official DiT's output (B, H, W, C) in float64 for images x (B, H, W, C), times t (B,),
    step-count levels dt (B,) (log2 of the number of sampling steps) and labels (B,)."""
    kernel = np.asarray(params["PatchEmbed_0"]["Conv_0"]["kernel"], np.float64)
    patch, _, channels, hidden = kernel.shape
    batch, side = x.shape[0], x.shape[1]
    grid = side // patch
    patches = np.asarray(x, np.float64).reshape(batch, grid, patch, grid, patch, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, -1)
    tokens = patches @ kernel.reshape(-1, hidden) + params["PatchEmbed_0"]["Conv_0"]["bias"]
    tokens = tokens + position_embedding(grid, hidden)[None]
    dt = np.zeros_like(np.asarray(t, np.float64)) if ignore_dt else dt
    c = (
        _scalar_embedding(t, params["TimestepEmbedder_0"])
        + _scalar_embedding(dt, params["TimestepEmbedder_1"])
        + np.asarray(params["LabelEmbedder_0"]["Embed_0"]["embedding"], np.float64)[labels]
    )
    depth = sum(1 for name in params if name.startswith("DiTBlock_"))
    for i in range(depth):
        tokens = _block(tokens, c, params[f"DiTBlock_{i}"], num_heads)
    final = params["FinalLayer_0"]
    shift, scale = np.split(_dense(_silu(c), final["Dense_0"]), 2, axis=-1)
    out = _dense(_modulate(_layer_norm(tokens), shift, scale), final["Dense_1"])
    out_channels = out.shape[-1] // (patch * patch)
    out = out.reshape(batch, grid, grid, patch, patch, out_channels)
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, side, side, out_channels)


def random_official_params(
    seed: int,
    hidden: int,
    depth: int,
    patch: int,
    channels: int,
    num_classes: int,
    mlp_ratio: float,
) -> dict[str, Any]:
    """Random float32 parameters in the official naming and layout (num_classes + 1 label rows)."""
    rng = np.random.default_rng(seed)

    def dense(fan_in: int, fan_out: int, scale: float | None = None) -> dict[str, np.ndarray]:
        scale = 1.0 / math.sqrt(fan_in) if scale is None else scale
        return {
            "kernel": (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32),
            "bias": (rng.standard_normal(fan_out) * 0.1).astype(np.float32),
        }

    mlp = int(hidden * mlp_ratio)
    params: dict[str, Any] = {
        "PatchEmbed_0": {
            "Conv_0": {
                "kernel": (
                    rng.standard_normal((patch, patch, channels, hidden))
                    / math.sqrt(patch * patch * channels)
                ).astype(np.float32),
                "bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
            }
        },
        "LabelEmbedder_0": {
            "Embed_0": {
                "embedding": (rng.standard_normal((num_classes + 1, hidden)) * 0.3).astype(
                    np.float32
                )
            }
        },
        "Embed_0": {"embedding": rng.standard_normal((256, 1)).astype(np.float32)},
    }
    for name in ("TimestepEmbedder_0", "TimestepEmbedder_1"):
        params[name] = {"Dense_0": dense(FREQUENCIES, hidden), "Dense_1": dense(hidden, hidden)}
    for i in range(depth):
        params[f"DiTBlock_{i}"] = {
            "Dense_0": dense(hidden, 6 * hidden, 0.3 / math.sqrt(hidden)),
            **{f"Dense_{j}": dense(hidden, hidden) for j in (1, 2, 3, 4)},
            "MlpBlock_0": {"Dense_0": dense(hidden, mlp), "Dense_1": dense(mlp, hidden)},
        }
    params["FinalLayer_0"] = {
        "Dense_0": dense(hidden, 2 * hidden, 0.3 / math.sqrt(hidden)),
        "Dense_1": dense(hidden, patch * patch * channels),
    }
    return params


def official_opt_state(params: dict[str, Any]) -> Any:
    """The optimizer state of `train.py` (optax.chain(optax.adamw(schedule))) as numpy arrays."""
    import jax
    import optax

    optimizer = optax.chain(
        optax.adamw(learning_rate=lambda count: 1e-4, b1=0.9, b2=0.999, weight_decay=0.1)
    )
    return jax.tree.map(np.asarray, optimizer.init(params))


def write_official_checkpoint(
    path: str | Path,
    params: dict[str, Any],
    params_ema: dict[str, Any],
    step: int,
    protocol: int | None = None,
) -> Path:
    """Writes the file `utils/checkpoint.py` writes for `cp.train_state = state; cp.save()`.

    `pickle.dumps` with the default protocol (4) unless `protocol` is given; the train state's
    `save()` dict under 'train_state' and the save time under '_timestamp'.
    """
    data = {
        "train_state": {
            "params": params,
            "params_ema": params_ema,
            "opt_state": official_opt_state(params),
            "step": np.asarray(step, np.int32),
        },
        "_timestamp": time.time(),
    }
    path = Path(path)
    path.write_bytes(pickle.dumps(data) if protocol is None else pickle.dumps(data, protocol))
    return path
