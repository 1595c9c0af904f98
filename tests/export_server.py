"""A stand-in server for exported samplers: runs jobs using only jax, safetensors and manifest.json.

    python -I tests/export_server.py JOBS.json INPUTS.npz RESULTS.npz

It first makes `shortcut_jax` unimportable (drops the path entries and import hooks that find it,
then asserts that it cannot be found) and at the end asserts that it was never imported. Each job
of JOBS.json is {"key", "dir", "steps", "noise", "labels", "scale"}: the export folder, the step
count, the names of arrays in INPUTS.npz and the guidance scale (passed only if the manifest lists
a guidance_scale input). RESULTS.npz gets "<key>/<output>" for every output the sampler returns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys


def _finds_shortcut_jax(finder) -> bool:
    """Whether the meta path `finder` (an instance or a class, e.g. an editable install's) finds
    shortcut_jax once the path entries holding it are gone."""
    try:
        return finder.find_spec("shortcut_jax", None) is not None
    except Exception:  # a finder that cannot answer this query keeps its place
        return False


def _forget_shortcut_jax() -> None:
    """Removes every sys.path entry and meta path finder that can find shortcut_jax."""
    sys.path[:] = [
        entry
        for entry in sys.path
        if not os.path.isdir(os.path.join(entry or os.getcwd(), "shortcut_jax"))
    ]
    sys.meta_path[:] = [finder for finder in sys.meta_path if not _finds_shortcut_jax(finder)]
    importlib.invalidate_caches()
    assert importlib.util.find_spec("shortcut_jax") is None, "shortcut_jax is still importable"
    try:
        import shortcut_jax  # noqa: F401
    except ImportError:
        return
    raise AssertionError("import shortcut_jax succeeded")


_forget_shortcut_jax()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402


def _manifest(directory: str) -> dict:
    with open(os.path.join(directory, "manifest.json")) as handle:
        return json.load(handle)


def _entry(manifest: dict, steps: int) -> dict:
    (entry,) = [entry for entry in manifest["samplers"] if entry["steps"] == steps]
    return entry


def _arguments(manifest: dict, entry: dict, directory: str, job: dict, inputs) -> list:
    """The call's arguments in the order of the manifest's inputs."""
    arguments = []
    for spec in entry["inputs"]:
        name = spec["name"]
        if name == "params":
            path = os.path.join(directory, manifest["params_file"])
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
            assert digest == manifest["params_sha256"], f"{path} does not match the manifest"
            arguments.append(safetensors.numpy.load_file(path))
        elif name == "guidance_scale":
            arguments.append(np.asarray(job["scale"], np.dtype(spec["dtype"])))
        else:
            arguments.append(np.asarray(inputs[job[name]], np.dtype(spec["dtype"])))
    return arguments


def _run(entry: dict, directory: str, arguments: list) -> dict:
    with open(os.path.join(directory, entry["file"]), "rb") as handle:
        data = handle.read()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{entry['file']} is not intact"
    exported = jax.export.deserialize(bytearray(data))
    return {name: np.asarray(value) for name, value in exported.call(*arguments).items()}


def main(jobs_path: str, inputs_path: str, results_path: str) -> None:
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    results = {}
    with np.load(inputs_path) as inputs:
        for job in jobs:
            manifest = _manifest(job["dir"])
            entry = _entry(manifest, job["steps"])
            arguments = _arguments(manifest, entry, job["dir"], job, inputs)
            outputs = _run(entry, job["dir"], arguments)
            expected = {spec["name"] for spec in manifest["outputs"]}
            assert set(outputs) == expected, (sorted(outputs), sorted(expected))
            for name, value in outputs.items():
                results[f"{job['key']}/{name}"] = value
    leaked = sorted(name for name in sys.modules if name.split(".")[0] == "shortcut_jax")
    assert not leaked, f"shortcut_jax modules were imported: {leaked}"
    np.savez(results_path, **results)
    print(json.dumps({"jobs": len(jobs), "platform": jax.devices()[0].platform}))


if __name__ == "__main__":
    main(*sys.argv[1:])
