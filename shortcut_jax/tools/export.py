"""Export a run's k-step samplers for serving: `jax.export` artifacts, safetensors, a manifest.

    python -m shortcut_jax.tools.export --workdir runs/mnist --steps 1,4 --out exported/ \
        [--checkpoint_step N] [--raw_params] [--platforms cpu,cuda,tpu] [--embed_params] \
        [--saved_model]

--out receives (locally the folder appears whole, replacing an earlier export; on a bucket the
files are uploaded into an empty folder, manifest.json last):

  sampler_{k}step.jax_export  the k-step sampler with guidance and, for latent runs, the VAE
                              decode: one serialized `jax.export.Exported` (StableHLO), batch size
                              symbolic, lowered for each of --platforms (default cpu,cuda,tpu);
  params.safetensors          the parameters (EMA unless --raw_params), float32: "model/<flax
                              path>" for the denoiser, "vae/<flax path>" for the VAE decoder;
  saved_model_{k}step/        with --saved_model, the same program as a TensorFlow SavedModel
                              (jax2tf): parameters as variables, signature "serving_default";
  manifest.json               inputs, outputs, shapes, dtypes, guidance, schedule, platforms,
                              versions, checksums, config hash: all a server needs.

Serving needs jax and safetensors, nothing of shortcut_jax (`CALLING_CONVENTION`)::

    exported = jax.export.deserialize(open("sampler_4step.jax_export", "rb").read())
    params = safetensors.numpy.load_file("params.safetensors")   # a flat {name: array} dict
    out = exported.call(params, noise, labels, guidance_scale)   # {"images", "images_uint8"}

noise: (b, *noise_shape) float32 ~ N(0, I), the latent shape for latent runs; labels: (b,) int32 in
[0, num_classes], num_classes being the null class (all 0 for unconditional runs);
guidance_scale: () float32, an input only where the run's policy guides k-step sampling
(`latent_space.guidance_scale`, config.sample_guidance): at 1 the artifact runs the unguided
program (one network call per step), otherwise the guided one (conditional and null-class batches
in one call). Outputs: "images" (b, H, W, C) float32 clipped to [-1, 1] and "images_uint8", the
ADM quantization of `python -m shortcut_jax.sample` (((x + 1) * 127.5) clipped to [0, 255],
truncated). The program is `sampling.sample` then `latent_space.pixel_fn`: the same noise, labels
and scale give `sample`'s images (measured: equal). With --embed_params the parameters are
constants of each artifact and `params` is left out of the call. Image runs only.

Errors are one line on stderr, with the exit status of the `cli_inputs` rule: 2 for bad flags (a
--steps outside 1..denoise_timesteps, unknown --platforms), 1 for a workdir that is not a run, an
--out that holds other files, a failed lowering or write.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from shortcut_jax import (
    atomic_files,
    checkpoint,
    cli_inputs,
    config_lib,
    latent_space,
    models,
    objectives,
    sampling,
    sharding,
    steps,
)

FORMAT = "shortcut_jax.export/1"
MANIFEST, PARAMS_FILE = "manifest.json", "params.safetensors"
ARTIFACT, SAVED_MODEL = "sampler_{}step.jax_export", "saved_model_{}step"
PLATFORMS, DEFAULT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu"), ("cpu", "cuda", "tpu")
MODEL_PREFIX, VAE_PREFIX = "model/", "vae/"
# A serialized artifact is one flatbuffer (2 GiB at most): embedded constants must stay below.
MAX_EMBEDDED_BYTES = 3 * 2**29
CALLING_CONVENTION = (
    "jax.export.deserialize(bytes of the artifact).call(*args) with args = [params,] noise, "
    "labels[, guidance_scale] as listed in 'inputs'; params = "
    "safetensors.numpy.load_file('params.safetensors') (a flat dict, left out when "
    "params_embedded); returns a dict of the 'outputs'. The batch size b is symbolic: any b >= 1."
)


class ExportError(RuntimeError):
    """The export cannot be made or written (exit status 1): a lowering failed, --out holds other
    files or cannot be written, the run's VAE does not fit it, TensorFlow is missing."""

    exit_code = cli_inputs.FAILURE_EXIT_CODE


def parse_steps(text: str, denoise_timesteps: int) -> tuple[int, ...]:
    """'1,4' -> (1, 4); each count in [1, denoise_timesteps], none twice.

    Raises:
      InputError: naming --steps, the bad entry and what is allowed.
    """
    allowed = f"allowed: integers 1..{denoise_timesteps} (denoise_timesteps), e.g. --steps 1,4"
    counts: list[int] = []
    for entry in (entry.strip() for entry in str(text).split(",")):
        if not (entry.isascii() and entry.isdigit()) or not 1 <= int(entry) <= denoise_timesteps:
            raise cli_inputs.InputError(f"--steps={text}: {entry!r} is not a step count; {allowed}")
        if int(entry) in counts:
            raise cli_inputs.InputError(f"--steps={text}: {entry} is listed twice")
        counts.append(int(entry))
    return tuple(counts)


def parse_platforms(text: str) -> tuple[str, ...]:
    """'cpu,tpu' -> ('cpu', 'tpu'). Raises InputError naming --platforms on an unknown one."""
    names = tuple(name.strip().lower() for name in str(text).split(","))
    if any(name not in PLATFORMS for name in names) or len(set(names)) != len(names):
        raise cli_inputs.InputError(
            f"--platforms={text}: allowed a comma-separated subset of {', '.join(PLATFORMS)}"
        )
    return names


def guides(config: ml_collections.ConfigDict, num_steps: int) -> bool:
    """Whether the run samples `num_steps` steps with guidance (then the artifact takes a scale):
    `latent_space.guidance_scale` asked with a scale other than 1; never for unconditional runs."""
    probe = 2.0
    guided = latent_space.guidance_scale(config, num_steps, probe) == probe
    return int(config.data.num_classes) > 0 and guided


def flat_params(model_params: Any, vae_params: Any | None) -> dict[str, np.ndarray]:
    """The parameters as one flat {name: array} dict: "model/<path>", "vae/<path>" (latent runs),
    flax paths joined with "/" (the safetensors names)."""
    from flax import traverse_util

    flat = {}
    for prefix, tree in ((MODEL_PREFIX, model_params), (VAE_PREFIX, vae_params)):
        for path, leaf in traverse_util.flatten_dict(jax.device_get(tree or {}), sep="/").items():
            flat[prefix + path] = np.ascontiguousarray(leaf)
    return flat


def split_params(flat: dict[str, Any]) -> tuple[Any, Any | None]:
    """`flat_params`' inverse: (model parameter tree, VAE decoder tree or None)."""
    from flax import traverse_util

    trees = []
    for prefix in (MODEL_PREFIX, VAE_PREFIX):
        part = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        trees.append(traverse_util.unflatten_dict(part, sep="/") if part else None)
    return trees[0], trees[1]


def serving_fn(
    config: ml_collections.ConfigDict, vae: Any | None, num_steps: int, guided: bool
) -> Callable[..., dict[str, jax.Array]]:
    """``fn(params, noise, labels[, guidance_scale]) -> outputs``: the k-step sampler and decode.

    params: the `flat_params` dict; noise: (B, *model_shape) float32; labels: (B,) int32;
    guidance_scale: () float32 (only when `guided`). Returns {"images": (B, H, W, C) float32 in
    [-1, 1], "images_uint8": (B, H, W, C) uint8}.
    """
    apply_fn = steps.make_apply_fn(models.get_model(config))
    pixels = latent_space.pixel_fn(vae)
    settings = {
        "num_steps": int(num_steps),
        "denoise_timesteps": int(config.denoise_timesteps),
        "num_classes": int(config.data.num_classes),
        "objective": objectives.ObjectiveConfig.from_config(config),
    }

    def fn(params: dict[str, jax.Array], noise, labels, *scale) -> dict[str, jax.Array]:
        model_params, vae_params = split_params(params)
        run = functools.partial(sampling.sample, apply_fn, model_params, noise, labels, **settings)
        if guided:  # scale 1 runs the unguided program, one network call per step, as `sample`
            value = jnp.asarray(scale[0], jnp.float32)
            samples = jax.lax.cond(
                value == 1.0, lambda: run(cfg_scale=1.0), lambda: run(cfg_scale=value)
            )
        else:
            samples = run(cfg_scale=1.0)
        images = pixels(vae_params, samples)
        return {"images": images, "images_uint8": quantize(images)}

    return fn


def quantize(images: jax.Array) -> jax.Array:
    """`images.quantize_adm` on the device: ((x + 1) * 127.5) clipped to [0, 255], truncated."""
    scaled = jnp.nan_to_num(images.astype(jnp.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return jnp.clip((scaled + 1.0) * 127.5, 0, 255).astype(jnp.uint8)


def input_specs(
    config: ml_collections.ConfigDict, guided: bool, batch: Any = "b"
) -> list[dict[str, Any]]:
    """The inputs after params: name, shape (`batch` for the batch size), dtype, meaning."""
    classes = int(config.data.num_classes)
    labels = f"0..{classes - 1}; {classes} = null class" if classes else "all 0 (unconditional)"
    specs = [
        {"name": "noise", "shape": [batch, *latent_space.model_shape(config)], "dtype": "float32",
         "meaning": "x0 ~ N(0, I)"},
        {"name": "labels", "shape": [batch], "dtype": "int32", "meaning": labels},
    ]  # fmt: skip
    if guided:
        meaning = f"guidance scale, 1 = none (run default {float(config.sample_cfg_scale)})"
        specs.append(
            {"name": "guidance_scale", "shape": [], "dtype": "float32", "meaning": meaning}
        )
    return specs


def output_specs(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The outputs (a dict) of every artifact of the run."""
    shape = ["b", *latent_space.pixel_shape(config)]
    quantized = "((images + 1) * 127.5) clipped to [0, 255], truncated (ADM)"
    return [
        {"name": "images", "shape": shape, "dtype": "float32", "meaning": "clipped to [-1, 1]"},
        {"name": "images_uint8", "shape": shape, "dtype": "uint8", "meaning": quantized},
    ]


def export_sampler(
    config: ml_collections.ConfigDict,
    vae: Any | None,
    params: dict[str, Any],
    num_steps: int,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    embed_params: bool = False,
) -> jax.export.Exported:
    """The `serving_fn` of `num_steps` exported with a symbolic batch for `platforms`.

    `params` may be arrays or shape/dtype structs; with `embed_params` (arrays only) they are
    constants of the program, not an argument.
    """
    guided = guides(config, num_steps)
    fn = serving_fn(config, vae, num_steps, guided)
    (batch,) = jax.export.symbolic_shape("b")
    arguments: list[Any] = [
        jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]))
        for spec in input_specs(config, guided, batch)
    ]
    if embed_params:
        program = jax.jit(lambda *inputs: fn(params, *inputs))
    else:
        program = jax.jit(fn)
        arguments.insert(0, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()})
    try:
        return jax.export.export(program, platforms=tuple(platforms))(*arguments)
    except Exception as error:  # lowering failures name the platform or the primitive
        hint = " (does --platforms cpu work?)" if tuple(platforms) != ("cpu",) else ""
        raise ExportError(
            f"exporting the {num_steps}-step sampler for {','.join(platforms)} failed: "
            f"{type(error).__name__}: {' '.join(str(error).split())[:500]}{hint}"
        ) from error


def write_saved_model(
    config: ml_collections.ConfigDict,
    vae: Any | None,
    params: dict[str, np.ndarray],
    num_steps: int,
    directory: str,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> None:
    """Writes the `num_steps`-step sampler as a TensorFlow SavedModel (jax2tf) into `directory`.

    The parameters are variables of the SavedModel; its "serving_default" signature takes the
    `input_specs` (an unknown batch size) and returns the `output_specs`.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    guided = guides(config, num_steps)
    specs = input_specs(config, guided, None)
    shapes = [", ".join("b" if size is None else str(size) for size in s["shape"]) for s in specs]
    converted = jax2tf.convert(
        serving_fn(config, vae, num_steps, guided),
        polymorphic_shapes=[None] + [f"({shape})" for shape in shapes],
        native_serialization_platforms=tuple(platforms),
        with_gradient=False,
    )
    module = tf.Module()
    module.params = {
        name: tf.Variable(value, trainable=False, name=name.replace("/", ".")[-200:])
        for name, value in params.items()
    }
    module.sample = tf.function(
        lambda *inputs: converted(module.params, *inputs),
        input_signature=[tf.TensorSpec(s["shape"], s["dtype"], name=s["name"]) for s in specs],
        autograph=False,
    )
    tf.saved_model.save(module, directory, signatures={"serving_default": module.sample})


def config_sha256(config: ml_collections.ConfigDict) -> str:
    """A hash of the run config as saved (without the `mesh` of the process that loaded it)."""
    fields = json.loads(config_lib.to_json(config))
    fields.pop("mesh", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def export_run(
    workdir: str,
    steps_text: str,
    out: str,
    *,
    checkpoint_step: int | None = None,
    raw_params: bool = False,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    embed_params: bool = False,
    saved_model: bool = False,
) -> dict[str, Any]:
    """Exports the run's samplers of `steps_text` ('1,4') into `out`; returns the manifest.

    Raises:
      InputError: a bad flag value (exit status 2) or, as `cli_inputs.checkpoint_step`, a
        workdir that is not a run.
      ExportError, CheckpointError, OSError: the export cannot be made or written (status 1).
    """
    if saved_model and importlib.util.find_spec("tensorflow") is None:
        raise ExportError(
            '--saved_model needs TensorFlow: pip install -e ".[tf]" (or use an installed one)'
        )
    step = cli_inputs.checkpoint_step(workdir, checkpoint_step)
    config = checkpoint.restore_config(workdir, step)
    counts = parse_steps(steps_text, int(config.denoise_timesteps))
    if len(latent_space.model_shape(config)) != 3:
        raise ExportError(f"--workdir={workdir} samples 2-D points, not images: export images runs")
    out = out if atomic_files.is_remote(out) else os.path.abspath(os.path.expanduser(out))
    _check_out(out)
    mesh = sharding.make_mesh(sharding.single_device_config(), jax.local_devices()[:1])
    config, model_params, step = checkpoint.load_params(workdir, step, raw=raw_params, mesh=mesh)
    try:
        vae = latent_space.load_run_vae(config) if latent_space.uses_vae(config) else None
    except ValueError as error:
        raise ExportError(f"config.vae.path={config.vae.path}: {error}") from None
    params = flat_params(model_params, None if vae is None else vae.decoder_params)
    del model_params
    size = sum(value.nbytes for value in params.values())
    if embed_params and size > MAX_EMBEDDED_BYTES:
        raise ExportError(
            f"--embed_params: the parameters are {size / 2**30:.2f} GiB, more than an artifact "
            f"holds ({MAX_EMBEDDED_BYTES / 2**30:.1f} GiB of constants): leave --embed_params out"
        )
    run = {
        "workdir": str(workdir),
        "checkpoint_step": int(step),
        "params": "raw" if raw_params else "ema",
        "config_sha256": config_sha256(config),
        "objective": str(config.get("objective", "shortcut")),
        "denoise_timesteps": int(config.denoise_timesteps),
        "num_classes": int(config.data.num_classes),
        "sample_guidance": str(config.get("sample_guidance", "auto")),
        "sample_cfg_scale": float(config.sample_cfg_scale),
        "noise_shape": list(latent_space.model_shape(config)),
        "vae": None if vae is None else {"checksum": vae.checksum, "path": str(config.vae.path)},
    }
    with _staging(out) as staging:
        params_bytes = _write_params(os.path.join(staging, PARAMS_FILE), params, run)
        samplers = []
        for count in counts:
            started = time.perf_counter()
            exported = export_sampler(
                config, vae, params, count, platforms=platforms, embed_params=embed_params
            )
            data = bytes(exported.serialize())
            with open(os.path.join(staging, ARTIFACT.format(count)), "wb") as handle:
                handle.write(data)
            entry = _sampler_entry(config, count, data, embed_params)
            if saved_model:
                entry["saved_model"] = SAVED_MODEL.format(count)
                directory = os.path.join(staging, entry["saved_model"])
                write_saved_model(config, vae, params, count, directory, platforms)
            entry["export_seconds"] = round(time.perf_counter() - started, 2)
            entry["calling_convention_version"] = int(exported.calling_convention_version)
            samplers.append(entry)
        manifest = {
            "format": FORMAT,
            "calling_convention": CALLING_CONVENTION,
            "jax_version": jax.__version__,
            "platforms": list(platforms),
            "params_file": PARAMS_FILE,
            "params_sha256": hashlib.sha256(params_bytes).hexdigest(),
            "params_count": int(sum(value.size for value in params.values())),
            "params_embedded": bool(embed_params),
            "run": run,
            "outputs": output_specs(config),
            "samplers": samplers,
        }
        with open(os.path.join(staging, MANIFEST), "w") as handle:
            handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _sampler_entry(
    config: ml_collections.ConfigDict, count: int, data: bytes, embedded: bool
) -> dict[str, Any]:
    guided = guides(config, count)
    t_start, step_size, _ = sampling.step_schedule(count, int(config.denoise_timesteps))
    params_input = [] if embedded else [{"name": "params", "meaning": f"dict of {PARAMS_FILE}"}]
    return {
        "steps": count,
        "file": ARTIFACT.format(count),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "guidance": {
            "input": guided,
            "default_scale": float(config.sample_cfg_scale) if guided else 1.0,
        },
        "schedule": {"t_start": t_start.tolist(), "step_size": step_size.tolist()},
        "inputs": params_input + input_specs(config, guided),
    }


def _write_params(path: str, params: dict[str, np.ndarray], run: dict[str, Any]) -> bytes:
    import safetensors.numpy

    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in run.items()}}
    data = safetensors.numpy.save(params, metadata=metadata)
    with open(path, "wb") as handle:
        handle.write(data)
    return data


def _check_out(out: str) -> None:
    """Refuses, before anything is computed, an --out that holds files but is not an earlier
    export (local) or holds any files (bucket), or that cannot be written."""
    from etils import epath

    path = epath.Path(out)
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out={out} is a file: give a folder to export into")
    if path.is_dir() and any(path.iterdir()):
        if atomic_files.is_remote(out):
            raise ExportError(f"--out={out} already holds files: give a new folder")
        if not (path / MANIFEST).exists():
            raise ExportError(
                f"--out={out} holds files and is not an earlier export (no {MANIFEST}): give a "
                "new folder (an earlier export is replaced whole)"
            )
    try:
        atomic_files.probe_writable(out if atomic_files.is_remote(out) else os.path.dirname(out))
    except OSError as error:
        raise ExportError(f"--out={out}: cannot write there ({error})") from None


@contextlib.contextmanager
def _staging(out: str) -> Iterator[str]:
    """Yields a local folder to fill; on success it becomes `out` (a local folder, replacing an
    earlier export) or its files are uploaded to the bucket folder `out`, manifest.json last."""
    remote = atomic_files.is_remote(out)
    directory = tempfile.mkdtemp() if remote else atomic_files.temporary_sibling(out)
    os.makedirs(directory, exist_ok=True)
    try:
        yield directory
        if remote:
            names = [
                os.path.relpath(os.path.join(root, name), directory)
                for root, _, files in os.walk(directory)
                for name in files
            ]
            for name in sorted(names, key=lambda name: (name == MANIFEST, name)):
                atomic_files.upload_file(os.path.join(directory, name), f"{out.rstrip('/')}/{name}")
        else:
            old = atomic_files.temporary_sibling(out) if os.path.lexists(out) else None
            if old is not None:
                os.replace(out, old)
            os.replace(directory, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 bad flags, 1 failed export)."""
    parser = argparse.ArgumentParser(
        prog="python -m shortcut_jax.tools.export",
        description="Export a run's k-step samplers (jax.export, StableHLO) for serving.",
    )
    parser.add_argument("--workdir", required=True, help="run directory (shortcut_jax.main)")
    parser.add_argument("--steps", required=True, help="step counts, comma-separated: 1,4")
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument("--checkpoint_step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--raw_params", action="store_true", help="raw params, not the EMA")
    parser.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help=f"where each artifact runs, a subset of {','.join(PLATFORMS)}",
    )
    parser.add_argument("--embed_params", action="store_true", help="params as constants")
    parser.add_argument("--saved_model", action="store_true", help="also a TF SavedModel")
    args = parser.parse_args(argv)
    try:
        manifest = export_run(
            args.workdir,
            args.steps,
            args.out,
            checkpoint_step=args.checkpoint_step,
            raw_params=args.raw_params,
            platforms=parse_platforms(args.platforms),
            embed_params=args.embed_params,
            saved_model=args.saved_model,
        )
    except (cli_inputs.InputError, ExportError, checkpoint.CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return cli_inputs.exit_code(error)  # 2 for a bad flag value (InputError), else 1
    sizes = ", ".join(f"{s['file']} {s['bytes'] / 1e6:.2f} MB" for s in manifest["samplers"])
    print(f"wrote {args.out}: {sizes}, {PARAMS_FILE} ({manifest['params_count']:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
