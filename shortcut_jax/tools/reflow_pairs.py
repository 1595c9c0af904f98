"""Noise/sample pairs of a trained run for reflow (stage one of Rectified Flow, Liu et al. 2023).

    python -m shortcut_jax.tools.reflow_pairs --workdir TEACHER_RUN --out DIR --num N \
        [--steps 128] [--shard_size 4096] [--seed 0] [--cfg_scale 1] [--step 0]

Each pair is noise x0 ~ N(0, I) and x1 = the teacher's sampler run from x0 with --steps network
evaluations (its own objective's sampler; a velocity teacher's Euler ODE solve), written in shards
DIR/shard_00000.npz, ... ('noise', 'sample', 'label'), each through `atomic_files`, so an
interrupted run is resumed by rerunning the command: finished shards are kept (one progress bar
over all shards), the rest are drawn. Shard i's noise comes from fold_in(PRNGKey(seed), i), so the
pairs do not depend on where it stopped. Each shard is sampled on all local devices (the batch
split over them). DIR/pairs.json names the teacher run, its checkpoint step and parameter
checksum; a rerun with another teacher, step count or layout is refused. Train on the pairs with
--config.objective=reflow --config.data.pairs_dir=DIR and the teacher's data config. Class
labels of a conditional teacher cycle through the classes. Bad flags give one line on stderr and
exit status 2; a --workdir that is not a usable run and an --out of other pairs one line and exit
status 1 (the rule of `shortcut_jax.cli_inputs`).
"""

from __future__ import annotations

import io
import json

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from tqdm import tqdm

from shortcut_jax import (
    atomic_files,
    cli_inputs,
    latent_space,
    models,
    objectives,
    sampling,
    sharding,
    steps,
)
from shortcut_jax import teacher as teacher_lib
from shortcut_jax.data import pairs


def write_pairs(
    workdir: str,
    out: str,
    num: int,
    *,
    num_steps: int = 128,
    shard_size: int = 4096,
    seed: int = 0,
    cfg_scale: float = 1.0,
    step: int = 0,
) -> dict:
    """Writes (or finishes writing) `num` pairs of the run in `workdir` to `out`.

    Returns:
      The metadata written to out/pairs.json.

    Raises:
      InputError: bad arguments.
      InputFileError: `out` holds pairs of another teacher or layout.
      TeacherError: `workdir` is not a run that can be loaded.
    """
    num = cli_inputs.check_positive("--num", num)
    shard_size = cli_inputs.check_positive("--shard_size", shard_size)
    cli_inputs.check_positive("--steps", num_steps)
    if seed < 0:
        raise cli_inputs.InputError(f"--seed={seed}: must be >= 0")
    cli_inputs.check_guidance_scale("--cfg_scale", cfg_scale)
    mesh = sharding.make_mesh(sharding.single_device_config(), jax.local_devices())
    run = teacher_lib.load_model(workdir, step, sharding.single_device_config(), mesh, "--workdir")
    config = run.config
    if not 1 <= num_steps <= int(config.denoise_timesteps):
        raise cli_inputs.InputError(
            f"--steps={num_steps}: must be in [1, {config.denoise_timesteps}] (the teacher's "
            "denoise_timesteps)"
        )
    shape = tuple(int(n) for n in latent_space.model_shape(config))
    num_classes = int(config.data.num_classes)
    metadata = {
        "teacher": {
            "workdir": run.workdir,
            "step": run.step,
            "checksum": run.checksum,
            "objective": str(config.objective),
        },
        "steps": int(num_steps),
        "cfg_scale": float(cfg_scale),
        "seed": int(seed),
        "num": int(num),
        "shard_size": int(shard_size),
        "num_shards": -(-num // shard_size),
        "element_shape": list(shape),
        "num_classes": num_classes,
    }
    directory = epath.Path(out)
    metadata_path = directory / pairs.METADATA_NAME
    if metadata_path.exists():
        saved = json.loads(metadata_path.read_text())
        if saved != metadata:
            changed = sorted(k for k in metadata if saved.get(k) != metadata[k])
            raise cli_inputs.InputFileError(
                f"--out={out} holds pairs written with other settings ({', '.join(changed)} "
                "differ): use a new --out, or the same flags and teacher to finish it"
            )
    else:
        atomic_files.write_json(metadata_path, metadata)

    apply_fn = steps.make_apply_fn(models.get_model(config))
    objective = objectives.ObjectiveConfig.from_config(config)
    base_rng = jax.random.PRNGKey(seed)
    todo = [
        index
        for index in range(metadata["num_shards"])
        if not (directory / pairs.shard_name(index)).exists()
    ]
    done = metadata["num_shards"] - len(todo)
    with tqdm(total=num, initial=min(done * shard_size, num), unit="pair", desc="pairs") as bar:
        for index in todo:
            count = min(shard_size, num - index * shard_size)
            rng = jax.random.fold_in(base_rng, index)
            labels = sampling.default_labels(count, num_classes)
            samples, labels = sampling.sample_batch(
                apply_fn,
                run.params,
                rng,
                num=count,
                shape=shape,
                labels=labels,
                num_steps=num_steps,
                denoise_timesteps=int(config.denoise_timesteps),
                cfg_scale=float(cfg_scale),
                num_classes=num_classes,
                mesh=mesh,
                objective=objective,
                sharding_rules=sharding.logical_rules(config),
            )
            noise = np.asarray(sampling.example_noise(rng, count, shape))
            buffer = io.BytesIO()
            np.savez(buffer, noise=noise, sample=samples, label=labels)
            atomic_files.write_bytes(directory / pairs.shard_name(index), buffer.getvalue())
            bar.update(count)
    logging.info("Pairs of %s (step %d) in %s", run.workdir, run.step, out)
    return metadata


def _define_flags() -> None:
    """The command-line flags; defined only when this module runs as a script, so importing it
    (tests, notebooks) never clashes with another CLI's flags of the same name (--workdir)."""
    flags.DEFINE_string("workdir", None, "The teacher run's workdir.")
    flags.DEFINE_string("out", None, "Directory to write the pairs to.")
    flags.DEFINE_integer("num", None, "Number of pairs.")
    flags.DEFINE_integer("steps", 128, "Sampler steps (network evaluations) per sample.")
    flags.DEFINE_integer("shard_size", 4096, "Pairs per shard file.")
    flags.DEFINE_integer("seed", 0, "Seed of the noise.")
    flags.DEFINE_float("cfg_scale", 1.0, "Guidance scale of the teacher (1 = none).")
    flags.DEFINE_integer("step", 0, "The teacher's checkpoint step; 0 = the newest.")
    flags.mark_flags_as_required(["workdir", "out", "num"])


def main(argv: list[str]) -> None:
    """Writes the pairs the flags describe."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    with cli_inputs.errors_as_one_line(teacher_lib.TeacherError, OSError):
        metadata = write_pairs(
            values.workdir,
            values.out,
            values.num,
            num_steps=values.steps,
            shard_size=values.shard_size,
            seed=values.seed,
            cfg_scale=values.cfg_scale,
            step=values.step,
        )
    print(f"{values.out}: {metadata['num']} pairs in {metadata['num_shards']} shards")


if __name__ == "__main__":
    _define_flags()
    cli_inputs.run(main)
