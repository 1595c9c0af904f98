"""`python -m shortcut_jax.main` with test hooks, for the preemption and kill tests.

    SHORTCUT_JAX_TEST_STEP_SECONDS=0.05 SHORTCUT_JAX_TEST_SAVE_DELAY_SECONDS=2 \
        python tests/hooked_main.py --config tests/tiny.py --workdir DIR [main's flags]

Hooks (environment variables, all optional), none of which touches the library's code:
  SHORTCUT_JAX_TEST_STEP_SECONDS: sleep this long before each batch, so a signal can land at a
    chosen step of a tiny model whose steps take milliseconds.
  SHORTCUT_JAX_TEST_EVAL_SECONDS: print `eval N` and sleep this long before each evaluation of
    the train loop, so a signal can land inside the final evaluation.
  SHORTCUT_JAX_TEST_SAVE_DELAY_SECONDS: hold every async checkpoint this long after its arrays
    are written and before Orbax renames its temporary directory into place, so a SIGKILL can
    land inside a save.
Each finished step prints `step N` to stdout, which the tests read to time their signals, and
each checkpoint save that starts prints `save N`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402

from shortcut_jax import checkpoint, data, main, train  # noqa: E402


class _SlowSource:
    """Wraps a data source: sleeps before each batch and reports the step it feeds."""

    def __init__(self, source, seconds: float):
        self.source, self.seconds = source, seconds
        self.element_shape, self.num_classes = source.element_shape, source.num_classes

    def iterate(self, start_step: int = 0):
        for step, batch in enumerate(self.source.iterate(start_step), start=start_step + 1):
            if step > start_step + 1:
                print(f"step {step - 1}", flush=True)  # the previous step has finished
            time.sleep(self.seconds)
            yield batch


def _install_hooks() -> None:
    real_save = checkpoint.save

    def announced_save(manager, state, config, step, *args, **kwargs):
        print(f"save {step}", flush=True)
        return real_save(manager, state, config, step, *args, **kwargs)

    checkpoint.save = announced_save

    step_seconds = float(os.environ.get("SHORTCUT_JAX_TEST_STEP_SECONDS", "0"))
    if step_seconds > 0:
        real_get_source = data.get_source
        data.get_source = lambda *args: _SlowSource(real_get_source(*args), step_seconds)

    eval_seconds = float(os.environ.get("SHORTCUT_JAX_TEST_EVAL_SECONDS", "0"))
    if eval_seconds > 0:
        real_run = train.PeriodicEvaluator.run

        def slow_run(self, state, step):
            print(f"eval {step}", flush=True)
            time.sleep(eval_seconds)
            return real_run(self, state, step)

        train.PeriodicEvaluator.run = slow_run

    save_delay = float(os.environ.get("SHORTCUT_JAX_TEST_SAVE_DELAY_SECONDS", "0"))
    if save_delay > 0:
        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def slow_finalize(self, *args, **kwargs):
            await asyncio.sleep(save_delay)
            return await real_finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize


if __name__ == "__main__":
    _install_hooks()
    app.run(main.main)
