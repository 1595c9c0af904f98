"""A NaN or inf in the data stops the run naming the source, step and examples; with
`data.skip_non_finite` the run replaces those examples, counts them and goes on."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import tiny_mnist_config

from shortcut_jax import data, train
from shortcut_jax.data import checks

BAD_STEP, BAD_POSITION = 3, 2


class _Poisoned:
    """The MNIST source with a NaN pixel in one example of one step."""

    def __init__(self, source):
        self.source = source
        self.element_shape, self.num_classes = source.element_shape, source.num_classes
        self.local_indices = source.local_indices
        self.real_examples = source.real_examples

    def iterate(self, start_step: int = 0):
        for step, batch in enumerate(self.source.iterate(start_step), start=start_step + 1):
            if step == BAD_STEP:
                batch = dict(batch, image=batch["image"].copy())
                batch["image"][BAD_POSITION, 5, 5, 0] = np.nan
            yield batch


@pytest.fixture
def poisoned(monkeypatch):
    real = data.get_source
    monkeypatch.setattr(data, "get_source", lambda *args: _Poisoned(real(*args)))
    return real


def test_a_nan_in_the_data_names_the_source_step_and_examples(poisoned, tmp_path):
    config = tiny_mnist_config(6)
    expected = poisoned(config).local_indices(BAD_STEP)[BAD_POSITION]
    with pytest.raises(checks.BadDataError) as stopped:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(stopped.value)
    assert f"(mnist_embedded) holds NaN or inf at step {BAD_STEP}" in message
    assert f"positions [{BAD_POSITION}]" in message and f"dataset examples [{expected}]" in message
    assert "--config.data.skip_non_finite=true" in message


def test_skip_non_finite_replaces_and_counts_the_bad_examples(poisoned, tmp_path):
    config = tiny_mnist_config(6)
    config.data.skip_non_finite = True
    history = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert history[6]["data/skipped_examples"] == 1.0
    assert all(np.isfinite(row["loss"]) for row in history.values())


def test_a_batch_with_no_good_example_stops_even_when_skipping():
    class _AllBad:
        def iterate(self, start_step: int = 0):
            while True:
                yield {"image": np.full((2, 3), np.inf, np.float32), "label": np.zeros(2, np.int32)}

    batches = checks.FiniteBatches(_AllBad(), "toy", start_step=7, skip=True)
    with pytest.raises(checks.BadDataError, match="at step 8, positions \\[0, 1\\].*every example"):
        next(batches)


def test_an_unreadable_image_stops_the_run_naming_the_file(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(8):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    broken = tmp_path / "images" / "b" / "3.png"
    broken.write_bytes(b"not a png")
    config = tiny_mnist_config(4)
    config.data.name = "image_folder"
    config.data.image_dir = str(tmp_path / "images")
    config.data.num_classes = 2
    config.data.channels = 1
    config.eval_every_steps = 0
    with pytest.raises(checks.BadDataError, match=f"could not be read at step .*{broken}"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
