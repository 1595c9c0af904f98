"""shortcut_jax: shortcut models (Frans et al., ICLR 2025) in JAX/Flax, from one CPU to TPU pods."""

import os as _os

from shortcut_jax import allocator as _allocator

# Before anything imports jax: keep XLA:CPU's per-step temporaries mapped (see allocator.py).
_allocator.tune_glibc_malloc()

# Bucket paths (gs://...) go through etils.epath on fsspec/gcsfs, never tf.io.gfile: one client
# for every file we read or write, that honours STORAGE_EMULATOR_HOST and needs no TensorFlow.
# etils reads this once, at its first gs:// use; set EPATH_USE_TF=true before importing us to
# route through TensorFlow instead.
_os.environ.setdefault("EPATH_USE_TF", "false")

# TensorFlow is not a dependency: CLU's metric writers (`from clu import metric_writers`) get the
# TensorBoard writer of tensorboard_events.py instead of importing TensorFlow's. Before anything
# imports clu.metric_writers.
from shortcut_jax import tensorboard_events as _tensorboard_events  # noqa: E402

_tensorboard_events.install_clu_summary_writer()

__version__ = "0.1.0"
