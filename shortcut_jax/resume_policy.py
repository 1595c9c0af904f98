"""Which config changes a resumed run accepts: one table, pure functions, no I/O.

A run resumed with another config is refused unless every changed field is classified safe:

* `SAFE_FIELDS`: fields that only say what to log, save, sample or score, how arrays are laid out
  over devices, or what the backward pass recomputes (`model.remat`); changing them never changes
  the trained parameters.
* `CONDITIONAL_FIELDS`: safe only when a condition on the old and new configs holds (total_steps
  with a constant learning rate schedule, ...).
* everything else, including fields added to the library later, refuses until it is classified or
  the user names it in `config.resume_allow_changes` ("field,field,..."; a section name such as
  "optim" or a pattern such as "data.*" names every field under it).

`PROCESS_COUNT` is not a config field but is compared like one: the data sources shard batches per
process, and some of them (`PROCESS_LAYOUT_FREE_DATA` aside) draw other batches for another count.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

PROCESS_COUNT = "process_count"
ABSENT = "(absent)"

SAFE_FIELDS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "max_checkpoints_to_keep",
    "sample_*",
    "eval_*",
    "mesh.*",
    "sharding_rules",
    "model.remat",
    "resume_allow_changes",
    "workdir_lock",
    "restore_fallback",
    "data.skip_non_finite",  # a way past bad examples; batches without any stay the same
    "data.latent_cache_*",  # where and how much of a bucket's latent shards are cached locally
    "vae.decode_batch_size",  # images per decoder pass in sampling and evaluation
    "wandb_*",  # where metrics are also logged
)

# Data sources whose global batch of a step is the same for any number of processes (each process
# slices the same step-addressed global batch): every source we ship. A source added later that
# draws per process stays out of this list, and a resume on another process count is refused.
PROCESS_LAYOUT_FREE_DATA = ("mnist_embedded", "image_folder", "tfds", "toy2d")

Flat = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A field that is safe to change only when `holds(old, new, step)` is true."""

    holds: Callable[[Flat, Flat, int], bool]
    condition: str  # what must hold, for the refusal message


def _constant_schedule(old: Flat, new: Flat, step: int) -> bool:
    del step
    return old.get("optim.schedule") == new.get("optim.schedule") == "constant"


# Objectives whose training targets follow config.total_steps: consistency training's
# discretisation curriculum N(k) runs over total_steps, and progressive distillation splits
# total_steps into its stages when teacher.steps_per_stage is 0.
TOTAL_STEPS_OBJECTIVES = (
    "consistency_training",
    "improved_consistency_training",
    "progressive_distillation",
)


def _total_steps_free(old: Flat, new: Flat, step: int) -> bool:
    if not _constant_schedule(old, new, step):
        return False
    for flat in (old, new):
        objective = flat.get("objective")
        if objective == "progressive_distillation" and flat.get("teacher.steps_per_stage"):
            continue  # fixed stage lengths: total_steps only says when to stop
        if objective in TOTAL_STEPS_OBJECTIVES:
            return False
    return True


def _warmup_already_done(old: Flat, new: Flat, step: int) -> bool:
    if not _constant_schedule(old, new, step):
        return False
    return all(
        isinstance(value, int) and step >= value
        for value in (old.get("optim.warmup_steps"), new.get("optim.warmup_steps"))
    )


def _process_layout_free(old: Flat, new: Flat, step: int) -> bool:
    del step
    return all(
        flat.get("data.latent_dir")
        or flat.get("data.pairs_dir")
        or flat.get("data.name") in PROCESS_LAYOUT_FREE_DATA
        for flat in (old, new)
    )


CONDITIONAL_FIELDS: dict[str, Rule] = {
    "total_steps": Rule(
        _total_steps_free,
        "safe only with optim.schedule = 'constant' (a cosine schedule decays over total_steps) "
        "and an objective that does not follow it (consistency training's curriculum runs over "
        "total_steps; progressive distillation splits it into stages unless "
        "teacher.steps_per_stage is set)",
    ),
    "optim.warmup_steps": Rule(
        _warmup_already_done,
        "safe only with optim.schedule = 'constant' once the resumed step is past both warm-ups",
    ),
    PROCESS_COUNT: Rule(
        _process_layout_free,
        f"safe only for data.name in {list(PROCESS_LAYOUT_FREE_DATA)} or precomputed latents "
        "(other sources draw each process's examples separately)",
    ),
}


@dataclasses.dataclass(frozen=True)
class Change:
    """One field that differs between the saved and the given config."""

    field: str
    old: Any
    new: Any
    safe: bool
    reason: str = ""  # why a refused change is refused ("" for unconditional refusals)

    def describe(self) -> str:
        """'field: old -> new', plus the condition that failed for conditional fields."""
        text = f"{self.field}: {_show(self.old)} -> {_show(self.new)}"
        return f"{text} ({self.reason})" if self.reason else text


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """{'dotted.field': value} of every leaf, with tuples as lists (as they come back from JSON)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json_best_effort())
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                visit(name + ".", value)
            else:
                flat[name] = _as_lists(value)

    visit("", config)
    return flat


def _as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_lists(item) for item in value]
    return value


def _show(value: Any) -> str:
    return value if value is ABSENT else json.dumps(value)


def parse_allowed(text: Any) -> tuple[str, ...]:
    """The names in `config.resume_allow_changes` ('a,b' or a list of names)."""
    items = text.split(",") if isinstance(text, str) else list(text or ())
    return tuple(str(item).strip() for item in items if str(item).strip())


def names(allowed: str, field: str) -> bool:
    """Whether the allow-list entry `allowed` names `field` (itself, a section above it, a glob)."""
    return (
        field == allowed or field.startswith(allowed + ".") or fnmatch.fnmatchcase(field, allowed)
    )


def unknown_names(allowed: Any, fields: Any) -> list[str]:
    """Entries of the allow-list that name none of `fields` (nor the process count)."""
    fields = [*fields, PROCESS_COUNT]
    return [entry for entry in parse_allowed(allowed) if not any(names(entry, f) for f in fields)]


def compare(
    old: Flat, new: Flat, step: int, allowed: Any = (), defaults: Flat | None = None
) -> list[Change]:
    """Every field whose value differs, classified as safe or refused.

    Args:
      old: the flattened config the checkpoint was saved with (plus PROCESS_COUNT when known).
      new: the flattened config given now (plus PROCESS_COUNT when known).
      step: the step being resumed from.
      allowed: `config.resume_allow_changes` of the new config.
      defaults: the flattened library defaults (`configs.base_config()`). A field the old config
        lacks (added to the library after the run was saved) whose new value is its default is
        no change: every field is added with the default that keeps what runs did before.

    Returns:
      The changes sorted by field; `safe` is False for those that must stop the resume.
    """
    allowed = parse_allowed(allowed)
    changes = []
    for field in sorted(set(old) | set(new)):
        before, after = old.get(field, ABSENT), new.get(field, ABSENT)
        if field == PROCESS_COUNT and ABSENT in (before, after):
            continue  # a run recorded before process counts were kept
        if before is ABSENT and defaults is not None and field in defaults:
            before = defaults[field] if _same(after, defaults[field]) else before
        if _same(before, after):
            continue
        if any(names(entry, field) for entry in allowed) or any(
            fnmatch.fnmatchcase(field, pattern) for pattern in SAFE_FIELDS
        ):
            changes.append(Change(field, before, after, safe=True))
        elif field in CONDITIONAL_FIELDS:
            rule = CONDITIONAL_FIELDS[field]
            safe = rule.holds(old, new, step)
            changes.append(Change(field, before, after, safe, "" if safe else rule.condition))
        else:
            changes.append(Change(field, before, after, safe=False))
    return changes


def _same(a: Any, b: Any) -> bool:
    """Equal values; 1 and 1.0 are the same, True and 1 are not."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def refusal_message(workdir: str, step: int, refused: list[Change], allowed: Any = ()) -> str:
    """The one message for a refused resume: each field `old -> new`, then how to proceed."""
    lines = "\n  ".join(change.describe() for change in refused)
    fields = ",".join(dict.fromkeys([*parse_allowed(allowed), *(c.field for c in refused)]))
    return (
        f"refusing to resume {workdir} from step {step}: the config differs from the one its "
        f"checkpoint was saved with in fields that change the run:\n  {lines}\n"
        f"To proceed, start a new run with another --workdir, or resume anyway with "
        f"--config.resume_allow_changes={fields}"
    )
