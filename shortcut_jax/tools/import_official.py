"""Imports a checkpoint of the paper's official code (kvfrans/shortcut-models) as a run directory.

    python -m shortcut_jax.tools.import_official --from imagenet-shortcut2-b-fulldata800001 \
        --config experiments/imagenet256.py --out runs/official_imagenet256_b2

The file is what the official `utils/checkpoint.py` writes at the end of `train.py` (a pickled
dict of the train state's params, params_ema, opt_state and step; a local official save is a
directory holding one NAME.tmp file, which --from takes too). `official_pickle.read_checkpoint`
reads it with a restricted unpickler (numpy arrays and plain containers only; any other class is
refused by name, nothing of it runs), `official_params.map_params` maps the DiT onto ours exactly
(the mapping and why it is exact are in that module), and this module writes the run: the
--config (the dataset's, e.g. experiments/imagenet256.py: data, VAE, sampling, evaluation) with
the checkpoint's model (sizes from the shapes; heads from --num_heads, a saved config or the DiT
preset of that size), config.model.time_scale = 1.0 (the official DiT embeds t unscaled) and
denoise_timesteps 128. A config with data.num_classes = 0 keeps only the null label row (the
official CelebA runs use num_classes=1 and always the null label). Compute runs in the config's
model.dtype (the official code computes in bfloat16). opt_state is not imported: the run's AdamW
moments start at zero.

The run directory holds config.json, import.json (source file, sha256, official step) and one
Orbax checkpoint written by `checkpoint.save` at step = official step - 1 (the official counter
starts at 1): params -> params, params_ema -> ema_params. `sample`, `evaluate` and the notebooks
use it as any run (--raw_params samples the official `params`, which the official evaluation uses
unless --model.use_ema=1). Errors are one line on stderr: exit status 2 for flags or a --config
that do not fit the checkpoint, 1 for a file that cannot be imported (`cli_inputs`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from shortcut_jax import atomic_files, checkpoint, cli_inputs, config_lib, latent_space
from shortcut_jax.tools.official_params import Architecture, architecture, check_finite, map_params
from shortcut_jax.tools.official_pickle import (
    OfficialCheckpointError,
    official_config,
    read_checkpoint,
    train_state_of,
)

# ------------------------------------------------------------------ the run directory


class ImportSettingError(OfficialCheckpointError, cli_inputs.InputError):
    """A flag or the --config does not fit the checkpoint: the command must change."""

    exit_code = cli_inputs.USAGE_EXIT_CODE


# The official --model.train_type values whose models our Euler sampler runs, and our objective.
TRAIN_TYPES = {"shortcut": "shortcut", "naive": "flow_matching", "livereflow": "live_reflow"}
IGNORES_DT = ("naive",)  # the official DiT gets ignore_dt=True for these (dt is always 0)


def resolve_num_heads(num_heads: int | None, saved: dict[str, Any], arch: Architecture) -> int:
    """--num_heads, else the saved config's, else the DiT preset with the same width and depth."""
    from shortcut_jax.models import PRESETS

    if num_heads is None and "num_heads" in saved:
        num_heads = int(saved["num_heads"])
    if num_heads is None:
        matches = {
            h for w, depth, h, _ in PRESETS.values() if (w, depth) == (arch.hidden_size, arch.depth)
        }
        if len(matches) != 1:
            raise ImportSettingError(
                f"the number of attention heads of a DiT of width {arch.hidden_size} and depth "
                f"{arch.depth} is not in the checkpoint: pass --num_heads (the official run's "
                "--model.num_heads)"
            )
        num_heads = matches.pop()
    if num_heads <= 0 or arch.hidden_size % num_heads:
        raise ImportSettingError(
            f"--num_heads={num_heads}: must divide the width {arch.hidden_size}"
        )
    return num_heads


def run_config(
    base: ml_collections.ConfigDict,
    arch: Architecture,
    num_heads: int,
    train_type: str,
    denoise_timesteps: int,
) -> ml_collections.ConfigDict:
    """`base` (data, VAE, sampling, evaluation) with the model and objective of the checkpoint.

    Raises:
      ImportSettingError: when the config's model input or classes do not fit the checkpoint, or
        the train type cannot be sampled here.
      OfficialCheckpointError: when our DiT lacks config.model.time_scale.
    """
    from shortcut_jax import models

    if train_type not in TRAIN_TYPES:
        raise ImportSettingError(
            f"--train_type={train_type!r}: importable are {sorted(TRAIN_TYPES)} (the others use "
            "another sampler or are distilled from a teacher)"
        )
    config = ml_collections.ConfigDict(base.to_dict())
    config.objective = TRAIN_TYPES[train_type]
    config.denoise_timesteps = int(denoise_timesteps)
    config.model.name = "dit"
    config.model.preset = ""
    config.model.hidden_size = arch.hidden_size
    config.model.depth = arch.depth
    config.model.num_heads = num_heads
    config.model.patch_size = arch.patch_size
    config.model.mlp_ratio = arch.mlp_hidden / arch.hidden_size
    config.model.time_scale = 1.0  # the official DiT embeds t in [0, 1] unscaled
    side, _, channels = latent_space.model_shape(config)
    if channels != arch.channels or side % arch.patch_size:
        raise ImportSettingError(
            f"the config's model input is {side}x{side}x{channels} (data.image_size, channels, "
            f"vae), the checkpoint's DiT takes {arch.channels} channels in patches of "
            f"{arch.patch_size}: pass the --config of the official run's dataset"
        )
    classes = int(config.data.num_classes)
    if classes not in (0, arch.label_rows - 1):
        raise ImportSettingError(
            f"the checkpoint has {arch.label_rows - 1} classes (+ the null label), the --config "
            f"data.num_classes = {classes}: use {arch.label_rows - 1}, or 0 for a model always "
            "sampled with the null label (the official CelebA runs)"
        )
    if int(arch.hidden_size * config.model.mlp_ratio) != arch.mlp_hidden:
        raise OfficialCheckpointError(f"MLP width {arch.mlp_hidden} is not a ratio of the width")
    try:
        config_lib.validate(config, check_files=False)
    except config_lib.ConfigError as error:
        raise ImportSettingError(f"the imported run's config is invalid: {error}") from None
    if getattr(models.get_model(config), "time_scale", None) != 1.0:
        raise OfficialCheckpointError(
            "this shortcut_jax's DiT embeds t * 1000 whatever the config says (no "
            "config.model.time_scale); the official DiT embeds t itself, so the imported model "
            "would not compute the official outputs"
        )
    return config


def train_state(config: ml_collections.ConfigDict, params: Any, ema_params: Any, step: int) -> Any:
    """A fresh `TrainState` of `config` holding the given parameter sets (AdamW moments at 0).

    Raises:
      OfficialCheckpointError: when the mapped tree is not the model's (names or shapes).
    """
    import functools

    from shortcut_jax import models, optim
    from shortcut_jax.state import TrainState, init_state

    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    abstract = jax.eval_shape(functools.partial(init_state, config, model, optimizer))

    def described(tree: Any) -> dict[str, Any]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): (leaf.shape, leaf.dtype) for path, leaf in flat}

    if described(abstract.params) != described(params):
        raise OfficialCheckpointError(
            f"the mapped parameters do not match the model: {described(params)} vs "
            f"{described(abstract.params)}"
        )
    params, ema_params = jax.tree.map(jnp.asarray, (params, ema_params))  # no copy of jax arrays
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=ema_params,
        teacher_params=None
        if abstract.teacher_params is None
        else jax.tree.map(jnp.copy, ema_params),
        rng=jax.random.split(jax.random.PRNGKey(config.seed))[1],
    )


def _check_new_workdir(workdir: str) -> epath.Path:
    path = checkpoint.workdir_path(workdir)
    directory = checkpoint.checkpoint_dir(str(path))
    if directory.exists() and any(directory.iterdir()):
        raise OfficialCheckpointError(
            f"--out {path} already holds checkpoints: pass a new directory"
        )
    return path


def _official_step(value: Any) -> int:
    step = np.asarray(value)
    if step.shape != () or not np.issubdtype(step.dtype, np.integer):
        raise OfficialCheckpointError(f"the checkpoint's step is {value!r}, not an integer")
    return int(step)


def import_checkpoint(
    source: str,
    base: ml_collections.ConfigDict,
    workdir: str,
    num_heads: int | None = None,
    train_type: str | None = None,
    denoise_timesteps: int | None = None,
) -> dict[str, Any]:
    """Reads an official checkpoint, maps it and writes the run directory `workdir`.

    Args:
      source: the official checkpoint file (or the directory a local official save makes).
      base: the config of the dataset (e.g. experiments/imagenet256.py): data, VAE, sampling.
      workdir: the new run directory (local or gs://); must hold no checkpoint yet.
      num_heads, train_type, denoise_timesteps: the official run's --model.* values; default:
        the checkpoint's saved config, else the preset of its size / 'shortcut' / 128.

    Returns:
      The import record also written to WORKDIR/import.json.
    """
    path = _check_new_workdir(workdir)
    data, file = read_checkpoint(source)
    state = train_state_of(data, source)
    state.pop("opt_state", None)  # two copies of the parameters' size, not imported
    saved = official_config(data)
    train_type = train_type or str(saved.get("train_type", "shortcut"))
    denoise_timesteps = denoise_timesteps or int(saved.get("denoise_timesteps", 128))
    arch = architecture(state["params"])
    num_heads = resolve_num_heads(num_heads, saved, arch)
    config = run_config(base, arch, num_heads, train_type, denoise_timesteps)
    official_step = _official_step(state.get("step", 1))
    step = max(official_step - 1, 0)
    has_ema = bool(state.get("params_ema"))
    mapped = {}
    for name in ("params", "params_ema") if has_ema else ("params",):
        official = state.pop(name)  # the official copy is freed once mapped
        if architecture(official) != arch:
            raise OfficialCheckpointError(f"{name} and params have different shapes")
        check_finite(official, name)
        ours = map_params(
            official, arch, num_heads, int(config.data.num_classes), train_type in IGNORES_DT
        )
        del official
        mapped[name] = jax.tree.map(jnp.asarray, ours)  # one host copy of each set at a time
        del ours
    if "params_ema" not in mapped:
        mapped["params_ema"] = jax.tree.map(jnp.copy, mapped["params"])
    checkpoint_state = train_state(config, mapped.pop("params"), mapped.pop("params_ema"), step)
    manager = checkpoint.make_manager(str(path), for_training=True)
    try:
        checkpoint.save(manager, checkpoint_state, config, step)
        manager.wait_until_finished()
    finally:
        manager.close()
    record = {
        "source": file,
        "official_step": official_step,
        "step": step,
        "train_type": train_type,
        "architecture": dataclasses.asdict(arch) | {"num_heads": num_heads},
        "ema_params": "params_ema" if has_ema else "params (the file holds no params_ema)",
        "opt_state": "not imported (AdamW moments start at zero)",
        "saved_at": data.get("_timestamp"),
        "imported_at": time.time(),
    }
    atomic_files.write_text(path / "config.json", config_lib.to_json(config))
    atomic_files.write_json(path / "import.json", record)
    return record


# ------------------------------------------------------------------ command line


def _define_flags() -> None:
    """The CLI's flags (defined only when it runs, so importing this module defines none)."""
    global _FROM, _CONFIG, _OUT, _HEADS, _TRAIN_TYPE, _TIMESTEPS
    _FROM = flags.DEFINE_string("from", None, "The official checkpoint file (or its directory).")
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "The dataset's config, e.g. experiments/imagenet256.py.", lock_config=False
    )
    _OUT = flags.DEFINE_string("out", None, "The new run directory (local or gs://).")
    _HEADS = flags.DEFINE_integer("num_heads", None, "Attention heads (default: by size).")
    _TRAIN_TYPE = flags.DEFINE_string(
        "train_type", None, f"The official --model.train_type, one of {sorted(TRAIN_TYPES)}."
    )
    _TIMESTEPS = flags.DEFINE_integer(
        "denoise_timesteps", None, "The official --model.denoise_timesteps (default 128)."
    )
    flags.mark_flags_as_required(["from", "config", "out"])


def main(argv: list[str]) -> None:
    """Imports --from into the run directory --out and prints the import record."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with cli_inputs.errors_as_one_line(OfficialCheckpointError, OSError):
        record = import_checkpoint(
            _FROM.value,
            _CONFIG.value,
            _OUT.value,
            num_heads=_HEADS.value,
            train_type=_TRAIN_TYPE.value,
            denoise_timesteps=_TIMESTEPS.value,
        )
    print(json.dumps(record, indent=2, sort_keys=True))
    print(f"wrote the run directory {checkpoint.workdir_path(_OUT.value)}")


if __name__ == "__main__":
    _define_flags()
    cli_inputs.run(main)
