"""Importing shortcut_jax tunes glibc malloc (every entry point), unless the user opts out."""

import os
import subprocess
import sys

import pytest

from shortcut_jax import allocator

PROBE = (
    "import shortcut_jax, sys; from shortcut_jax import allocator; "
    "print(allocator.is_tuned(), 'jax' in sys.modules)"
)


def _probe(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV_VARIABLE}
    if value is not None:
        env[allocator.ENV_VARIABLE] = value
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_import_tunes_malloc_before_jax_is_imported():
    assert _probe(None) == ["True", "False"]


@pytest.mark.parametrize("value", ["0", "off"])
def test_environment_variable_keeps_glibc_defaults(value):
    assert _probe(value) == ["False", "False"]


def test_settings_never_trim_and_never_mmap():
    values = dict(allocator.settings())
    assert values[-4] == 0  # M_MMAP_MAX: no mmap for large blocks
    assert values[-1] == -1  # M_TRIM_THRESHOLD: never give freed heap back
    assert values[-8] == 1  # M_ARENA_MAX
