"""glibc malloc settings that keep XLA:CPU's per-step temporaries mapped between steps.

XLA:CPU allocates each step's temporaries afresh and frees them at the end of the step. By default
glibc serves blocks above its mmap threshold with fresh mappings and trims freed heap memory back to
the kernel, so every step the kernel maps and zeroes the same pages again: one minor page fault per
4 KiB touched (about 147,000 a second and a quarter of the CPU time on the MNIST default). With one
arena, no mmap for large blocks and no trimming, the next step reuses the memory the last one freed.

`import shortcut_jax` applies the settings once (see `shortcut_jax/__init__.py`), before the
package imports jax, so every entry point (train, sample, evaluate, tools, notebooks) gets them
without the user knowing. Set SHORTCUT_JAX_MALLOC_TUNING=0 to keep glibc's defaults. The cost is
that freed memory stays with the process (its resident size does not shrink after a peak), which
is what a training or evaluation process wants.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VARIABLE = "SHORTCUT_JAX_MALLOC_TUNING"

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_TOP_PAD_BYTES = 256 * 2**20

_applied: bool | None = None


def settings() -> tuple[tuple[int, int], ...]:
    """(mallopt parameter, value) pairs: one arena, no mmap, no trimming, a 256 MiB top pad."""
    return (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, -1),  # -1 (as size_t: the maximum) never trims
        (_M_TOP_PAD, _TOP_PAD_BYTES),
    )


def tune_glibc_malloc() -> bool:
    """Applies `settings()` through mallopt unless SHORTCUT_JAX_MALLOC_TUNING=0; idempotent.

    Returns:
      True when the settings are in force (every mallopt call succeeded); False when disabled by
      the environment variable, or off glibc (macOS, musl), where nothing is changed.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        _applied = False
        return _applied
    _applied = False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return _applied  # not glibc: mallopt parameter numbers may mean something else
    except (OSError, AttributeError):
        return _applied
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(parameter, value) == 1 for parameter, value in settings())
    return _applied


def is_tuned() -> bool:
    """Whether this process runs with the settings (after `tune_glibc_malloc` was called)."""
    return bool(_applied)
