"""Stored noise/sample pairs of a teacher run (`python -m shortcut_jax.tools.reflow_pairs`) as a
`DataSource`, for objective 'reflow'.

The directory holds `pairs.json` (what wrote them: teacher run, step, checksum, sampler steps;
shapes) and shards `shard_00000.npz`, ... with 'noise' (x0), 'sample' (x1 = teacher ODE(x0)) and
'label'. All shards are read into host memory at start. Batches are addressed by step: global batch
position p = step * batch_size + i reads pair permutation_e[p mod num] of epoch e = p // num, a
permutation seeded by (config.seed, e), so resuming at any step sees the same batches. Reference
examples (grids, scores) are real data of the dataset config.data describes, not teacher samples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import ml_collections
import numpy as np
from etils import epath

from shortcut_jax import latent_space
from shortcut_jax.data import check_seed, local_batch_size

METADATA_NAME = "pairs.json"
_EPOCH_TAG = 0x7061


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"shard_{index:05d}.npz"


def read_metadata(directory: str) -> dict:
    """The pairs.json of `directory`.

    Raises:
      FileNotFoundError: naming config.data.pairs_dir when there is none.
    """
    path = epath.Path(directory) / METADATA_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"config.data.pairs_dir = {directory!r} holds no {METADATA_NAME}: write pairs with "
            "python -m shortcut_jax.tools.reflow_pairs --workdir TEACHER_RUN --out DIR --num N."
        )
    return json.loads(path.read_text())


def load_pairs(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, {'noise', 'sample', 'label'}) of every shard in `directory`.

    Raises:
      FileNotFoundError: a shard is missing (the writer did not finish).
    """
    metadata = read_metadata(directory)
    parts: dict[str, list[np.ndarray]] = {"noise": [], "sample": [], "label": []}
    for index in range(int(metadata["num_shards"])):
        path = epath.Path(directory) / shard_name(index)
        if not path.exists():
            raise FileNotFoundError(
                f"config.data.pairs_dir = {directory!r} lacks {path.name} of "
                f"{metadata['num_shards']} shards: rerun the reflow_pairs command to finish it."
            )
        with path.open("rb") as file, np.load(file) as shard:
            for key in parts:
                parts[key].append(np.asarray(shard[key]))
    arrays = {key: np.concatenate(values)[: int(metadata["num"])] for key, values in parts.items()}
    return metadata, arrays


class PairSource:
    """Teacher noise/sample pairs as a `DataSource` (see the module docstring).

    Attributes:
      element_shape: shape of one example. num_classes: from the pairs' teacher.
      metadata: the pairs.json contents.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
    ):
        """Reads the pairs and checks they fit the config.

        Raises:
          ValueError: the pairs' shape or classes differ from what config.data describes.
        """
        directory = str(config.data.pairs_dir)
        self.metadata, arrays = load_pairs(directory)
        self.element_shape = tuple(int(n) for n in self.metadata["element_shape"])
        self.num_classes = int(self.metadata["num_classes"])
        expected = tuple(latent_space.model_shape(config))
        if self.element_shape != expected:
            raise ValueError(
                f"config.data.pairs_dir = {directory!r} holds examples of shape "
                f"{self.element_shape}, config.data describes {expected}: use the teacher's data "
                "config."
            )
        if self.num_classes != int(config.data.num_classes):
            raise ValueError(
                f"config.data.pairs_dir = {directory!r} has {self.num_classes} classes, "
                f"config.data.num_classes = {config.data.num_classes}: they must match."
            )
        self.noise = arrays["noise"].astype(np.float32)
        self.sample = arrays["sample"].astype(np.float32)
        self.label = arrays["label"].astype(np.int32)
        self.seed = check_seed(config)
        self.batch_size = int(config.batch_size)
        self.local_batch_size = local_batch_size(config, process_index, process_count)
        self.process_index = process_index
        self._permutations: dict[int, np.ndarray] = {}
        self._data_config = config.copy_and_resolve_references()
        self._data_config.data.pairs_dir = ""

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, epoch, _EPOCH_TAG])
            self._permutations[epoch] = rng.permutation(self.noise.shape[0])
        return self._permutations[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Pair indices of this process's share of the global batch of `step`."""
        num = self.noise.shape[0]
        start = step * self.batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size)
        return np.array([self._permutation(p // num)[p % num] for p in positions])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{'noise': x0, 'image': x1, 'label'} of this process's share of batch `step`."""
        index = self.indices(step)
        return {"noise": self.noise[index], "image": self.sample[index], "label": self.label[index]}

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields `batch(step)` for step = start_step, start_step + 1, ... (endless)."""
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def real_examples(self, n: int) -> dict[str, np.ndarray]:
        """`n` real examples of the data config.data describes (what samples are scored against;
        the teacher's samples would flatter the student)."""
        from shortcut_jax import data

        return data.get_source(self._data_config).real_examples(n)
