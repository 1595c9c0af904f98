"""FLOP counts of a train step: matmul FLOPs from its HLO text, and an analytic DiT count.

Not a script. `matmul_flops` and `classify_entry_ops` read an HLO module's text (lowered or
optimised, `lowered.as_text(dialect='hlo')` / `compiled.as_text()`); `analytic_step_flops`
counts the matmuls of a shortcut train step from the DiT's dimensions, to check XLA's count.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from shortcut_jax import models


def analytic_dit_forward_flops(
    image_size: int,
    channels: int,
    hidden: int,
    depth: int,
    patch: int,
    mlp_ratio: float = 4.0,
    frequency_size: int = 256,
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward pass of one image.

    Counts the patch embedding, the t and d embedders, per block the adaLN Dense, q/k/v, the two
    attention matmuls, the output projection and the MLP, and the final layer. Elementwise work
    (LayerNorm, GELU, softmax, modulation) is not included.
    """
    tokens = (image_size // patch) ** 2
    pixels = patch * patch * channels
    mlp = int(hidden * mlp_ratio)
    embedders = 2 * 2 * (frequency_size * hidden + hidden * hidden)
    per_block = (
        2 * hidden * 6 * hidden  # ada_ln on the conditioning vector
        + 2 * tokens * hidden * 3 * hidden  # qkv
        + 2 * 2 * tokens * tokens * hidden  # logits and weights @ v over all heads
        + 2 * tokens * hidden * hidden  # out projection
        + 2 * 2 * tokens * hidden * mlp  # fc1 and fc2
    )
    final = 2 * hidden * 2 * hidden + 2 * tokens * hidden * pixels
    return 2 * tokens * pixels * hidden + embedders + depth * per_block + final


def analytic_step_flops(config: ml_collections.ConfigDict, forward_flops: int) -> dict[str, Any]:
    """Matmul FLOPs of one shortcut train step from the per-image forward FLOPs.

    The student runs forward + backward (~3 forwards) on the whole batch; the teacher runs two
    forward half steps on the bootstrap part, each on twice the examples with CFG in the targets.
    """
    batch = int(config.batch_size)
    num_bootstrap = batch // int(config.bootstrap_every) if config.objective == "shortcut" else 0
    guided = 2 if (config.bootstrap_cfg and config.data.num_classes > 0) else 1
    teacher_forwards = 2 * guided * num_bootstrap
    return {
        "forward_flops_per_image": forward_flops,
        "teacher_forwards_per_step": teacher_forwards,
        "matmul_flops_per_step": 3 * batch * forward_flops + teacher_forwards * forward_flops,
    }


def dit_dims(config: ml_collections.ConfigDict) -> dict[str, int]:
    """hidden_size, depth, num_heads, patch_size of the config's DiT (preset resolved)."""
    if config.model.preset:
        hidden, depth, heads, patch = models.dit_preset(config.model.preset)
    else:
        hidden, depth, heads = config.model.hidden_size, config.model.depth, config.model.num_heads
        patch = config.model.patch_size
    return {"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": patch}


def analytic_forward(config: ml_collections.ConfigDict) -> int:
    """`analytic_dit_forward_flops` of the config's DiT."""
    dims = dit_dims(config)
    return analytic_dit_forward_flops(
        config.data.image_size,
        config.data.channels,
        dims["hidden_size"],
        dims["depth"],
        dims["patch_size"],
        float(config.model.mlp_ratio),
    )


# ----------------------------------------------------------------------------- HLO parsing

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*"
    r"(?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>[\w\-]+)\((?P<args>.*?)\)(?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_DIMS = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")


def _dims(shape: str) -> list[int] | None:
    match = _DIMS.match(shape)
    if not match:
        return None
    return [int(d) for d in match.group(1).split(",") if d]


def _operand_names(args: str) -> list[str]:
    """Operand names of an instruction's argument list ('%a, %b' or 'f32[2]{0} a, b')."""
    args = re.sub(r"/\*.*?\*/", "", args)
    names = []
    for part in re.split(r",\s*(?![^\[{]*[\]}])", args):
        tokens = part.strip().split()
        if tokens:
            names.append(tokens[-1].lstrip("%"))
    return names


def parse_hlo(text: str) -> dict[str, Any]:
    """Instructions of an HLO module's text.

    Returns:
      {'computations': {name: [instruction dicts]}, 'entry': name, 'shapes': {name: dims}} where
      an instruction dict has name, op, dims (None for tuples), operands, rest (attributes).
    """
    computations: dict[str, list[dict]] = {}
    shapes: dict[str, list[int] | None] = {}
    entry, current = "", None
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            dims = _dims(match.group("shape"))
            instruction = {
                "name": match.group("name"),
                "op": match.group("op"),
                "dims": dims,
                "operands": _operand_names(match.group("args")),
                "rest": match.group("rest"),
            }
            shapes[instruction["name"]] = dims
            computations[current].append(instruction)
            continue
        header = _COMPUTATION.match(line)
        if header and not match:
            current = header.group("name")
            computations[current] = []
            if header.group("entry"):
                entry = current
    return {"computations": computations, "entry": entry, "shapes": shapes}


def instruction_flops(instruction: dict, shapes: dict[str, list[int] | None]) -> int:
    """2 x multiply-adds of a dot or convolution instruction; 0 for anything else."""
    out = instruction["dims"]
    if out is None or instruction["op"] not in ("dot", "convolution"):
        return 0
    operands = [shapes.get(name) for name in instruction["operands"]]
    if instruction["op"] == "dot":
        lhs = operands[0] if operands else None
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction["rest"])
        if lhs is None or contracting is None:
            return 0
        size = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
        return 2 * math.prod(out) * size
    kernel = operands[1] if len(operands) > 1 else None
    labels = re.search(r"dim_labels=\w+_(\w+)->\w+", instruction["rest"])
    if kernel is None or labels is None:
        return 0
    out_features = kernel[labels.group(1).index("o")]
    return 2 * math.prod(out) * math.prod(kernel) // max(out_features, 1)


def matmul_flops(hlo_text: str) -> dict[str, int]:
    """FLOPs of every dot and convolution in an HLO module (fused computations included)."""
    module = parse_hlo(hlo_text)
    totals = {"dot": 0, "convolution": 0}
    for instructions in module["computations"].values():
        for instruction in instructions:
            if instruction["op"] in totals:
                totals[instruction["op"]] += instruction_flops(instruction, module["shapes"])
    return totals


def classify_entry_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
    """For each instruction of the entry computation: category, FLOPs of its dots, fused ops.

    Categories: 'matmul' (a dot or convolution, or a fusion containing one), 'elementwise/reduce'
    (other fusions and arithmetic), 'data movement' (copy, transpose, slices, concatenates, ...),
    'other'.
    """
    module = parse_hlo(hlo_text)
    computations, shapes = module["computations"], module["shapes"]

    def called(instruction: dict) -> list[dict]:
        match = re.search(r"calls=%?([\w.\-]+)", instruction["rest"])
        if not match or match.group(1) not in computations:
            return []
        inner = computations[match.group(1)]
        nested = [op for sub in inner for op in called(sub)]
        return inner + nested

    movement = {
        "copy",
        "transpose",
        "slice",
        "dynamic-slice",
        "dynamic-update-slice",
        "concatenate",
        "pad",
        "broadcast",
        "reshape",
        "bitcast",
        "gather",
        "scatter",
        "copy-start",
        "copy-done",
    }
    result = {}
    for instruction in computations.get(module["entry"], []):
        inner = called(instruction) if instruction["op"] in ("fusion", "call") else []
        ops = [instruction] + inner
        flops = sum(instruction_flops(op, shapes) for op in ops)
        kinds = {op["op"] for op in ops}
        if kinds & {"dot", "convolution"}:
            category = "matmul"
        elif instruction["op"] in movement:
            category = "data movement"
        elif instruction["op"] in ("parameter", "constant", "tuple", "get-tuple-element"):
            category = "other"
        else:
            category = "elementwise/reduce"
        fused = sorted(kinds - {"parameter", "constant", "fusion"})
        result[instruction["name"]] = {
            "category": category,
            "op": instruction["op"],
            "matmul_flops": flops,
            "fused_ops": fused[:12],
        }
    return result
