"""Fuzzes one CLI's own flags in one process (for tests/test_cli_flag_fuzz.py):

    python tests/cli_flag_fuzz_worker.py MODULE WORKDIR SCRATCH

Each of the module's flags is set to wrong values by kind, one at a time, beside the few flags
that point it at the tiny run in WORKDIR and at SCRATCH for outputs; the flags are parsed by the
CLIs' parser and its `main` runs. Prints one JSON list: flag, value, and how it ended ('exit N'
for a clean exit, 'ran' for an accepted value that ran to the end, 'traceback ...' otherwise).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from shortcut_jax import cli_inputs  # noqa: E402

SKIP = {"distributed", "coordinator_address", "num_processes", "process_id"}  # would wait for peers


def bad_values(flag: flags.Flag, scratch: str) -> list[str]:
    kind = flag.flag_type()
    if kind == "bool":
        return ["maybe"]
    if kind == "int":
        return ["-1", "0", "abc", "1e99", str(2**63 + 1)]
    if kind == "float":
        return ["nan", "inf", "-1", "abc"]
    if "list" in kind or "comma" in kind:
        return ["", "a,b", "-1,0"]
    return ["", f"{scratch}/a_file/below_a_file", "x" * 300, "a\nb"]


def main() -> None:
    module_name, workdir, scratch = sys.argv[1:4]
    module = importlib.import_module(module_name)
    if hasattr(module, "_define_flags"):
        module._define_flags()
    with open(os.path.join(scratch, "a_file"), "w") as handle:
        handle.write("a file, not a directory")
    base = {
        "shortcut_jax.sample": [f"--workdir={workdir}", f"--out={scratch}/s.npz", "--num=4"],
        "shortcut_jax.evaluate": [f"--workdir={workdir}", f"--out={scratch}/e", "--num=4",
                                  "--steps=1", "--metrics=fd_mnist", "--pr_num=0"],
        "shortcut_jax.tools.fid_stats": [f"--out={scratch}/st.npz", "--num=8",
                                         "--network=fd_mnist",
                                         f"--config={os.path.dirname(__file__)}/tiny.py"],
    }[module_name]  # fmt: skip
    own = flags.FLAGS.flags_by_module_dict().get(module_name, [])
    results = []
    for flag in [f for f in own if f.name not in SKIP]:
        for value in bad_values(flag, scratch):
            argv = [module_name, *[a for a in base if not a.startswith(f"--{flag.name}=")]]
            argv.append(f"--{flag.name}={value}")
            flags.FLAGS.unparse_flags()
            stderr = io.StringIO()
            outcome = "ran"
            try:
                with contextlib.redirect_stderr(stderr):
                    module.main(cli_inputs.parse_flags(argv))
            except SystemExit as stop:
                outcome = f"exit {stop.code if isinstance(stop.code, int) else 1}"
            except BaseException as error:  # noqa: BLE001 - what the fuzz looks for
                text = "".join(traceback.format_exception_only(type(error), error)).strip()
                outcome = f"traceback {text[:300]}"
            results.append({"flag": flag.name, "value": value, "outcome": outcome})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
