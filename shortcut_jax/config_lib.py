"""Validation of a run config before any data is read or any function compiled.

`validate(config)` checks every field the library reads and raises one `ConfigError` listing each
bad value as `config.<field> = <value>: <what is allowed>`.
"""

from __future__ import annotations

import contextvars
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from shortcut_jax import latent_space, objectives, resume_policy, timesteps
from shortcut_jax.evaluators import registry as metric_registry

DATA_NAMES = ("mnist_embedded", "toy2d", "tfds", "image_folder")
MODEL_NAMES = ("dit", "mlp")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine")
TEACHERS = ("params", "ema")


# Whether `validate` checks that named files exist (see its check_files).
_CHECK_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("check_files", default=True)


class ConfigError(ValueError):
    """A config field holds a value the library cannot run with."""


def validate(
    config: ml_collections.ConfigDict,
    device_count: int | None = None,
    check_files: bool = True,
) -> None:
    """Checks the whole config; raises ConfigError naming every bad field, its value and the rule.

    Args:
      config: the run config.
      device_count: global number of devices the batch is split over (default: jax.device_count()).
      check_files: also check that the files and directories it names exist (False for
        `shortcut_jax.compile`, which plans a run on another machine from its config alone).
    """
    token = _CHECK_FILES.set(check_files)
    try:
        _validate(config, device_count)
    finally:
        _CHECK_FILES.reset(token)


def _wandb_installed() -> bool:
    if "wandb" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["wandb"] is not None
    return importlib.util.find_spec("wandb") is not None


def _check_wandb(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    """The optional Weights & Biases fields: strings, and wandb importable when a project is set."""
    for field in ("wandb_project", "wandb_entity"):
        if not isinstance(config.get(field, ""), str):
            problems.append(f"config.{field} = {config.get(field)!r}: a string ('' = off/default)")
            return
    project = config.get("wandb_project", "")
    if project and _CHECK_FILES.get() and not _wandb_installed():
        problems.append(
            f"config.wandb_project = {project!r}: logging to Weights & Biases needs the wandb "
            "package (not a dependency): pip install wandb, or set config.wandb_project=''"
        )


def _validate(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    if device_count is None:
        import jax

        device_count = jax.device_count()
    problems: list[str] = []
    for section in ("data", "model", "optim"):
        if not isinstance(config.get(section), ml_collections.ConfigDict):
            raise ConfigError(f"config.{section} is missing: start from shortcut_jax.configs")

    reported: set[str] = set()

    def check(field: str, ok: Callable[[Any], bool], allowed: str) -> None:
        if field in reported:  # one message per field
            return
        try:
            value = _lookup(config, field)
        except (AttributeError, KeyError):
            problems.append(f"config.{field} is missing: {allowed}")
            reported.add(field)
            return
        try:
            # True/False where a number is wanted, and inf/nan anywhere, are never allowed.
            good = _right_kind(value, allowed) and ok(value)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError):
            good = False
        if not good:
            problems.append(f"config.{field} = {value!r}: {allowed}")
            reported.add(field)

    check("objective", lambda v: v in objectives.names(), f"one of {objectives.names()}")
    check("seed", lambda v: _is_int(v) and 0 <= v < 2**63, "a non-negative integer")
    check("total_steps", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("batch_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    check(
        "denoise_timesteps",
        lambda v: timesteps.is_power_of_two(v) and v >= 2,
        "a power of two >= 2 (e.g. 128)",
    )
    check("bootstrap_teacher", lambda v: v in TEACHERS, f"one of {list(TEACHERS)}")
    check("teacher_ema_rate", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
    check("ema_rate", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
    check("bootstrap_cfg", lambda v: isinstance(v, bool), "True or False")
    check("cfg_scale", lambda v: v >= 0.0, "a float >= 0 (1 = no guidance)")
    check("class_dropout_prob", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
    check("target_clip", lambda v: v >= 0.0, "a float >= 0 (0 = no clipping)")
    _check_shortcut_recipe(config, check)
    _check_objective_sections(config, check)

    if config.get("objective") in objectives.names():
        minimum = objectives.get(config.objective).min_bootstrap_every
        if minimum:
            check(
                "bootstrap_every",
                lambda v: _is_int(v) and v >= minimum,
                f"an integer >= {minimum} for objective {config.objective!r} "
                "(1/bootstrap_every of the batch is the self-consistency part)",
            )
            if _is_int(config.get("bootstrap_every")) and config.bootstrap_every >= minimum:
                check(
                    "batch_size",
                    lambda v: v % config.bootstrap_every == 0,
                    f"divisible by config.bootstrap_every = {config.bootstrap_every}",
                )
    _check_mesh(config, device_count, check, problems)

    # Data.
    check("data.name", lambda v: v in DATA_NAMES, f"one of {list(DATA_NAMES)}")
    check("data.image_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("data.channels", lambda v: v in (1, 3, 4), "1, 3 or 4")
    check(
        "data.num_classes", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = unconditional)"
    )
    if config.data.get("name") == "toy2d":
        from shortcut_jax.data.toy2d import TOY_NAMES

        check("data.toy_name", lambda v: v in TOY_NAMES, f"one of {list(TOY_NAMES)}")
        check("data.num_classes", lambda v: v == 0, "0 (toy 2-D data is unconditional)")
        check("model.name", lambda v: v == "mlp", "'mlp' for 2-D points (toy2d data)")
    elif config.model.get("name") == "mlp":
        check("model.name", lambda v: v == "dit", "'dit' for image data ('mlp' is for toy2d)")
    if config.data.get("name") == "mnist_embedded":
        check("data.channels", lambda v: v == 1, "1 for MNIST")
        check("data.num_classes", lambda v: v in (0, 10), "10 (or 0 = unconditional) for MNIST")
    if config.data.get("name") == "tfds":
        check(
            "data.tfds_name", lambda v: isinstance(v, str) and v, "a TFDS name, e.g. 'imagenet2012'"
        )
    if config.data.get("name") == "image_folder":
        check(
            "data.image_dir",
            lambda v: isinstance(v, str) and v and _dir_exists(v),
            "an existing directory with one subfolder of images per class",
        )
    _check_latent_space(config, check)
    if config.get("bootstrap_cfg") is True:
        check(
            "data.num_classes",
            lambda v: v > 0,
            "> 0 when config.bootstrap_cfg is True (guidance needs classes)",
        )

    # Model.
    check("model.name", lambda v: v in MODEL_NAMES, f"one of {list(MODEL_NAMES)}")
    check("model.dtype", lambda v: v in DTYPES, f"one of {list(DTYPES)}")
    if config.model.get("name") == "dit":
        _check_dit(config, check, problems)
    check("model.hidden_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("model.depth", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("model.mlp_ratio", lambda v: v > 0, "a positive float")
    if "remat" in config.model:  # configs saved before the field existed run without remat
        from shortcut_jax.models import REMAT_POLICIES

        check(
            "model.remat",
            lambda v: isinstance(v, str) and v in REMAT_POLICIES,
            f"one of {list(REMAT_POLICIES)} (what each block keeps for the backward pass)",
        )

    # Optimisation.
    check("optim.learning_rate", lambda v: 0 < v < math.inf, "a finite float > 0")
    check("optim.schedule", lambda v: v in SCHEDULES, f"one of {list(SCHEDULES)}")
    check(
        "optim.warmup_steps",
        lambda v: _is_int(v) and 0 <= v <= config.total_steps,
        f"an integer in [0, config.total_steps] = [0, {config.get('total_steps')}]",
    )
    check("optim.end_lr_fraction", lambda v: 0.0 <= v <= 1.0, "a float in [0, 1]")
    check("optim.weight_decay", lambda v: v >= 0.0, "a float >= 0")
    check("optim.beta1", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
    check("optim.beta2", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
    check("optim.grad_clip_norm", lambda v: v >= 0.0, "a float >= 0 (0 = no clipping)")

    # Loop.
    check("log_every_steps", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("checkpoint_every_steps", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("max_checkpoints_to_keep", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("sample_every_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = at the end)")
    check(
        "sample_steps",
        lambda v: len(v) > 0 and all(_is_int(n) and 1 <= n <= config.denoise_timesteps for n in v),
        "a non-empty list of step counts in [1, config.denoise_timesteps]",
    )
    check("sample_num", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("sample_cfg_scale", lambda v: v >= 0.0, "a float >= 0 (1 = no guidance)")
    _check_wandb(config, problems)
    check(
        "sample_guidance",
        lambda v: v in latent_space.GUIDANCE_POLICIES,
        f"one of {list(latent_space.GUIDANCE_POLICIES)}",
    )

    # Evaluation.
    check("eval_every_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = never)")
    if config.get("eval_every_steps"):  # only used by the periodic evaluation
        check(
            "eval_steps",
            lambda v: (
                len(v) > 0 and all(_is_int(n) and 1 <= n <= config.denoise_timesteps for n in v)
            ),
            "a non-empty list of step counts in [1, config.denoise_timesteps]",
        )
    check("eval_num", lambda v: _is_int(v) and v >= 2, "an integer >= 2 (samples per budget)")
    check(
        "eval_metrics",
        lambda v: v == "auto" or _metric_names_ok(v),
        f"'auto' or a comma-separated list of {list(metric_registry.names())}",
    )
    check("eval_inception_path", lambda v: isinstance(v, str), "a path string ('' = default)")
    every = config.get("eval_every_steps")
    if _is_int(every) and every > 0:  # what the periodic evaluation will need
        _check_eval_metric_needs(config, check)
    check(
        "eval_ref_stats",
        lambda v: isinstance(v, str) and (not v or _file_exists(v)),
        "'' or an existing .npz with keys mu and sigma (python -m shortcut_jax.tools.fid_stats)",
    )
    check("eval_ref_num", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
    check("eval_ceiling_num", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
    check("eval_batch_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    check("workdir_lock", lambda v: isinstance(v, bool), "True or False")
    check("restore_fallback", lambda v: isinstance(v, bool), "True or False")
    check("data.skip_non_finite", lambda v: isinstance(v, bool), "True or False")
    check(
        "resume_allow_changes",
        lambda v: isinstance(v, str) and not resume_policy.unknown_names(v, _field_names(config)),
        "'' or comma-separated config fields (or sections, globs, 'process_count') that a "
        "resumed run may change",
    )

    named = " ".join(problems)
    problems += [line for line in _unchecked_floats(config) if line.split(" = ")[0] not in named]
    if problems:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


# Recipe fields of the shortcut objective (configs saved before they existed lack them).
SHORTCUT_RECIPE_FIELDS = (
    "bootstrap_levels",
    "bootstrap_curriculum_fraction",
    "bootstrap_level_weights",
    "flow_time",
    "flow_time_mean",
    "flow_time_std",
)


def _check_shortcut_recipe(config: ml_collections.ConfigDict, check: Callable) -> None:
    """Level draws, per-level loss weights and flow-part times (see timesteps.TimeSampling)."""
    present = [field for field in SHORTCUT_RECIPE_FIELDS if field in config]
    if "bootstrap_levels" in present:
        check(
            "bootstrap_levels",
            lambda v: v in timesteps.LEVEL_SCHEMES,
            f"one of {list(timesteps.LEVEL_SCHEMES)}",
        )
    if "bootstrap_curriculum_fraction" in present:
        check(
            "bootstrap_curriculum_fraction",
            lambda v: _is_number(v) and 0.0 < v <= 1.0,
            "a float in (0, 1] (the fraction of total_steps after which every level is open)",
        )
    if "bootstrap_level_weights" in present:
        denoise = config.get("denoise_timesteps")
        levels = timesteps.num_levels(denoise) if timesteps.is_power_of_two(denoise) else None
        check(
            "bootstrap_level_weights",
            lambda v: (
                isinstance(v, (tuple, list))
                and (
                    len(v) == 0
                    or (
                        (levels is None or len(v) == levels)
                        and all(_is_number(w) and w >= 0.0 for w in v)
                        and any(w > 0.0 for w in v)
                    )
                )
            ),
            f"() or one weight >= 0 per student level 0 (one step) .. log2(denoise_timesteps) - 1 "
            f"({levels} weights for denoise_timesteps = {denoise!r}), not all 0",
        )
    if "flow_time" in present:
        check(
            "flow_time", lambda v: v in timesteps.FLOW_TIMES, f"one of {list(timesteps.FLOW_TIMES)}"
        )
    if "flow_time_mean" in present:
        check("flow_time_mean", lambda v: _is_number(v) and math.isfinite(v), "a finite float")
    if "flow_time_std" in present:
        check("flow_time_std", lambda v: _is_number(v) and v > 0.0, "a float > 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_objective_sections(config: ml_collections.ConfigDict, check: Callable) -> None:
    """The sub-configs of the objectives (read by objectives.ObjectiveConfig.from_config)."""
    from shortcut_jax.objectives import diffusion

    _check_teacher(config, check)
    check("meanflow.ratio_r_neq_t", lambda v: 0.0 <= v <= 1.0, "a float in [0, 1]")
    check("meanflow.time_mean", lambda v: math.isfinite(v), "a finite float")
    check("meanflow.time_std", lambda v: v > 0.0, "a float > 0")
    check("meanflow.adaptive_p", lambda v: v >= 0.0, "a float >= 0 (0 = unweighted)")
    check("meanflow.adaptive_c", lambda v: v > 0.0, "a float > 0")
    check("diffusion.schedule", lambda v: v in diffusion.SCHEDULES, f"one of {diffusion.SCHEDULES}")
    check(
        "diffusion.prediction",
        lambda v: v in diffusion.PREDICTIONS,
        f"one of {diffusion.PREDICTIONS}",
    )
    check("diffusion.clip_x0", lambda v: v >= 0.0, "a float >= 0 (0 = no clipping)")
    check("diffusion.eta", lambda v: 0.0 <= v <= 1.0, "a float in [0, 1] (0 = deterministic DDIM)")
    check("consistency.sigma_max", lambda v: v > 0.0, "a float > 0")
    check(
        "consistency.sigma_min",
        lambda v: 0.0 < v < config.consistency.sigma_max,
        "a float in (0, config.consistency.sigma_max)",
    )
    check("consistency.sigma_data", lambda v: v > 0.0, "a float > 0")
    check("consistency.rho", lambda v: v > 0.0, "a float > 0")
    check("consistency.s0", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    check(
        "consistency.s1",
        lambda v: _is_int(v) and v >= config.consistency.s0,
        "an integer >= config.consistency.s0",
    )
    check("consistency.mu0", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
    check("consistency.p_mean", lambda v: math.isfinite(v), "a finite float")
    check("consistency.p_std", lambda v: v > 0.0, "a float > 0")
    check("live_reflow.steps", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    check("live_reflow.levels", lambda v: v in ("all", "one_step"), "'all' or 'one_step'")
    check(
        "loss.kind",
        lambda v: v in ("auto", "l2", "pseudo_huber"),
        "'auto' (the objective's own), 'l2' or 'pseudo_huber'",
    )
    check("loss.huber_c", lambda v: v >= 0.0, "a float >= 0 (0 = 0.00054 * sqrt(H * W * C))")
    check(
        "loss.adaptive_p",
        lambda v: v >= 0.0 and (v == 0.0 or config.objective != "meanflow"),
        "a float >= 0 (0 = unweighted); objective 'meanflow' sets its own weighting with "
        "config.meanflow.adaptive_p, so this must stay 0 for it",
    )
    check("loss.adaptive_c", lambda v: v > 0.0, "a float > 0")


def _check_teacher(config: ml_collections.ConfigDict, check: Callable) -> None:
    """config.teacher, config.init_from and config.data.pairs_dir (see shortcut_jax.teacher)."""
    if not isinstance(config.get("teacher"), ml_collections.ConfigDict):
        check("teacher", lambda v: False, "a section: start from shortcut_jax.configs")
        return
    name = config.get("objective")
    objective = objectives.get(name) if name in objectives.names() else None
    if objective is not None and objective.needs_teacher_run:
        check(
            "teacher.workdir",
            lambda v: isinstance(v, str) and v and _dir_exists(os.path.join(v, "checkpoints")),
            f"the --workdir of a finished run (with a checkpoints/ directory): objective "
            f"{config.objective!r} distils that frozen teacher",
        )
        if latent_space.is_online(config):
            check(
                "data.latent_dir",
                lambda v: bool(v),
                "precomputed latents (python -m shortcut_jax.tools.encode_latents): objectives "
                "with a teacher run do not encode images inside the step",
            )
    check("teacher.step", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = newest)")
    check(
        "teacher.steps_per_stage",
        lambda v: _is_int(v) and v >= 0,
        "an integer >= 0 (0 = total_steps split evenly over the stages)",
    )
    check(
        "teacher.stage_steps",
        lambda v: (
            all(_is_int(n) and timesteps.is_power_of_two(n) for n in v)
            and all(a == 2 * b for a, b in zip(tuple(v)[:-1], tuple(v)[1:], strict=True))
            and all(n <= config.denoise_timesteps // 2 for n in v)
        ),
        "() or student step counts that halve stage by stage (e.g. (64, 32, 16, 8, 4, 2, 1)), "
        "powers of two <= config.denoise_timesteps / 2",
    )
    check("teacher.init_student", lambda v: isinstance(v, bool), "True or False")
    check("teacher.consistency_scales", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
    check("teacher.target_ema_rate", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
    check("teacher.ode_solver", lambda v: v in ("heun", "euler"), "'heun' or 'euler'")
    check(
        "init_from",
        lambda v: isinstance(v, str) and (not v or _dir_exists(os.path.join(v, "checkpoints"))),
        "'' or the --workdir of a finished run (with a checkpoints/ directory)",
    )
    pairs_dir = config.data.get("pairs_dir", "")
    if objective is not None and objective.uses_pairs:
        check(
            "data.pairs_dir",
            lambda v: isinstance(v, str) and v and _file_exists(os.path.join(v, "pairs.json")),
            f"a directory written by python -m shortcut_jax.tools.reflow_pairs (objective "
            f"{config.objective!r} trains on stored pairs)",
        )
    elif objective is not None and pairs_dir:
        check(
            "data.pairs_dir",
            lambda v: not v,
            f"'' for objective {config.objective!r} (stored pairs are for objective 'reflow')",
        )


def _check_mesh(
    config: ml_collections.ConfigDict, device_count: int, check: Callable, problems: list[str]
) -> None:
    from shortcut_jax import sharding

    for axis in sharding.MESH_AXES:
        check(
            f"mesh.{axis}",
            lambda v: _is_int(v) and (v == -1 or 1 <= v <= 2**31),
            "a positive integer, or -1 for the rest of the devices",
        )
    if any(f"config.mesh.{axis} " in " ".join(problems) for axis in sharding.MESH_AXES):
        return
    try:
        sizes = dict(
            zip(sharding.MESH_AXES, sharding.mesh_shape(config, device_count), strict=True)
        )
    except sharding.ShardingError as error:
        problems.append(str(error))
        return
    except (AttributeError, KeyError, TypeError, ValueError):
        problems.append(
            "config.mesh must have integer entries data, fsdp and tensor (-1 = the rest)"
        )
        return
    batch_shards = sizes["data"] * sizes["fsdp"]
    check(
        "batch_size",
        lambda v: v % batch_shards == 0,
        f"divisible by the batch shards data x fsdp = {batch_shards} ({device_count} devices)",
    )
    check(
        "sharding_rules",
        lambda v: all(
            isinstance(name, str) and all(axis in sharding.MESH_AXES for axis in _as_tuple(axes))
            for name, axes in v
        ),
        f"pairs (logical_axis_name, mesh axis or axes or None) with mesh axes in "
        f"{list(sharding.MESH_AXES)}",
    )


def _as_tuple(axes: Any) -> tuple:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)


def _check_dit(config: ml_collections.ConfigDict, check: Callable, problems: list[str]) -> None:
    from shortcut_jax.models import PRESETS, dit_preset

    if "time_scale" in config.model:
        check(
            "model.time_scale",
            lambda v: 0.0 < v < math.inf,
            "a finite float > 0 (1000 = ours, 1.0 = the official code's DiT)",
        )
    preset = config.model.get("preset", "")
    if preset:
        try:
            hidden_size, _, num_heads, patch_size = dit_preset(preset)
        except ValueError:
            problems.append(f"config.model.preset = {preset!r}: one of {sorted(PRESETS)}")
            return
    else:
        hidden_size = config.model.hidden_size
        num_heads = config.model.num_heads
        patch_size = config.model.patch_size
        check("model.patch_size", lambda v: _is_int(v) and v > 0, "a positive integer")
        check("model.num_heads", lambda v: _is_int(v) and v > 0, "a positive integer")
    if _is_int(patch_size) and patch_size > 0:
        if latent_space.uses_vae(config):
            factor = config.vae.get("downsample_factor")
            if _is_int(factor) and factor > 0:
                check(
                    "data.image_size",
                    lambda v: (v // factor) % patch_size == 0,
                    f"image_size / vae.downsample_factor ({factor}) divisible by the DiT patch "
                    f"size {patch_size} (config.model.patch_size)",
                )
        else:
            check(
                "data.image_size",
                lambda v: v % patch_size == 0,
                f"divisible by the DiT patch size {patch_size} (config.model.patch_size)",
            )
    if _is_int(num_heads) and num_heads > 0 and not preset:
        check(
            "model.hidden_size",
            lambda v: v % num_heads == 0,
            f"divisible by config.model.num_heads = {num_heads}",
        )
        check(
            "model.hidden_size",
            lambda v: v % 4 == 0,
            "a multiple of 4 (the 2-D sin-cos position embedding splits it in four)",
        )
    del hidden_size


def _check_latent_space(config: ml_collections.ConfigDict, check: Callable) -> None:
    """config.vae and config.data.latent_dir: files exist, and the shapes fit together."""
    vae_config = config.get("vae")
    latent_dir = config.data.get("latent_dir", "")
    if vae_config is None:
        return
    check("vae.path", lambda v: isinstance(v, str), "a path string ('' = pixel space)")
    path = vae_config.get("path", "")
    if "decode_batch_size" in vae_config:
        check(
            "vae.decode_batch_size",
            lambda v: _is_int(v) and v >= 0,
            "an integer >= 0 (images per device per VAE-decode pass; 0 = the whole chunk)",
        )
    if path:
        check(
            "vae.path",
            lambda v: _file_exists(v),
            "an existing VAE weights file: convert yours with `python -m "
            "shortcut_jax.tools.convert_vae --from vae-ft-mse-840000-ema-pruned.safetensors "
            f"--out {path}` (or name a diffusers diffusion_pytorch_model.safetensors directly)",
        )
        check("vae.scaling_factor", lambda v: 0.0 < v < math.inf, "a finite float > 0")
        check("vae.latent_channels", lambda v: _is_int(v) and v > 0, "a positive integer")
        check(
            "vae.downsample_factor",
            lambda v: timesteps.is_power_of_two(v),
            "a power of two (8 for the Stable Diffusion VAEs)",
        )
        check("vae.dtype", lambda v: v in DTYPES, f"one of {list(DTYPES)}")
        check("vae.sample_posterior", lambda v: isinstance(v, bool), "True or False")
        factor = vae_config.get("downsample_factor")
        if _is_int(factor) and factor > 0:
            check(
                "data.image_size",
                lambda v: v % factor == 0,
                f"divisible by config.vae.downsample_factor = {factor} (config.vae.path is set: "
                "the run trains on VAE latents)",
            )
        check(
            "data.channels",
            lambda v: v in (1, 3),
            "1 or 3 (pixel images) with a VAE (config.vae.path is set)",
        )
        check(
            "data.name",
            lambda v: v != "toy2d",
            "an image dataset with config.vae.path (toy2d has no images)",
        )
    if latent_dir:
        check(
            "data.latent_dir",
            lambda v: bool(path),
            "'' unless config.vae.path names the VAE the latents were encoded with",
        )
        check(
            "data.latent_dir",
            lambda v: _file_exists(str(v).rstrip("/") + "/metadata.json"),
            "a finished latent directory (with metadata.json): make it with `python -m "
            f"shortcut_jax.tools.encode_latents --config <this config> --out {latent_dir}`",
        )
        if "latent_cache_bytes" in config.data:
            check(
                "data.latent_cache_bytes",
                lambda v: _is_int(v) and v >= 0,
                "an integer >= 0 (bytes of local disk for shards of a bucket latent_dir; 0 reads "
                "gs:// shards in place)",
            )
        if "latent_cache_dir" in config.data:
            check("data.latent_cache_dir", lambda v: isinstance(v, str), "a path string")


def _dir_exists(path: str) -> bool:
    if not _CHECK_FILES.get():
        return True
    from etils import epath

    return epath.Path(path).is_dir()


def _metric_names_ok(value: str) -> bool:
    names = metric_registry.split(value)
    return bool(names) and not metric_registry.unknown(names)


def _check_eval_metric_needs(
    config: ml_collections.ConfigDict, check: Callable[[str, Callable[[Any], bool], str], None]
) -> None:
    """Each metric of config.eval_metrics fits the data and finds its file; 'auto' finds one."""
    value = config.get("eval_metrics")
    if not isinstance(value, str):
        return  # reported by the eval_metrics check
    try:
        if value == "auto":
            if not metric_registry.auto_names(config):
                check(
                    "eval_metrics",
                    lambda v: False,
                    f"{metric_registry.why_none_available(config)}; make one available or set "
                    "config.eval_every_steps = 0",
                )
            return
        for name in metric_registry.split(value):
            spec = metric_registry.METRICS.get(name)
            if spec is None:
                continue  # reported by the eval_metrics check
            problem = spec.data_problem(config)
            if problem:
                check("eval_metrics", lambda v: False, f"{name!r} cannot score this run: {problem}")
            if _CHECK_FILES.get() and metric_registry.missing_weights(spec, config):
                check(
                    spec.weights_field,
                    lambda v: False,
                    f"config.eval_metrics names {name!r}, which needs this file ('' = "
                    f"{spec.default_weights_path()}): make it with {spec.weights_command}, or "
                    f"drop {name!r} from config.eval_metrics",
                )
    except (AttributeError, KeyError):
        return  # a broken config.data section, which the data checks report


def _file_exists(path: str) -> bool:
    if not _CHECK_FILES.get():
        return True
    from etils import epath

    return epath.Path(path).is_file()


def _field_names(config: ml_collections.ConfigDict) -> list[str]:
    return list(resume_policy.flatten(config))


def _right_kind(value: Any, allowed: str) -> bool:
    """False for a bool where the rule does not ask for one, and for a non-finite float."""
    if isinstance(value, bool):
        return "True or False" in allowed
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_right_kind(item, allowed) for item in value)
    return True


def _unchecked_floats(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """config.FIELD = VALUE lines for every inf or nan leaf (of fields no rule names too)."""
    lines = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            lines += _unchecked_floats(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            lines.append(f"config.{prefix}{key} = {value!r}: a finite number")
    return lines


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def to_json(config: ml_collections.ConfigDict) -> str:
    """Serialises a config (the copy saved in the workdir and in every checkpoint)."""
    return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Reads a config written by `to_json` (lists come back as lists)."""
    return ml_collections.ConfigDict(json.loads(text))
