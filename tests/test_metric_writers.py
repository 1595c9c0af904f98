"""The run's metric writers: TensorBoard events without TensorFlow, CLU's writers through them,
and the optional Weights & Biases writer (tested with a fake `wandb` module: wandb is not a
dependency and is not installed here)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import types
import wave
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from shortcut_jax import metric_files, tensorboard_events

REPO = Path(__file__).resolve().parents[1]


def events_by_tag(logdir: Path) -> dict[str, list]:
    """{tag: [(step, Summary.Value), ...]} of every event file in `logdir`."""
    found: dict[str, list] = {}
    for path in sorted(logdir.glob(tensorboard_events.EVENTS_GLOB)):
        for event in tensorboard_events.read_events(str(path)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_events_are_tensorflow_2_summaries_that_read_back(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    writer = tensorboard_events.metric_writer_class()(str(tmp_path))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
    writer.write_hparams({"lr": np.float32(0.5), "model": {"depth": 4}, "shape": (1, 2)})
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": np.float32(1.0 / step), "count": step})
    writer.write_images(3, {"grid": image, "gray": np.full((2, 4, 4, 1), 0.5, np.float32)})
    writer.write_histograms(3, {"weights": rng.normal(size=500)}, {"weights": 10})
    writer.write_texts(3, {"note": "hello"})
    writer.write_audios(3, {"clip": np.zeros((2, 80, 1), np.float32)}, sample_rate=8000)
    writer.write_summaries(3, {"raw": np.arange(3.0)})
    writer.close()

    assert tensorboard_events.read_scalars(str(tmp_path), "loss") == pytest.approx(
        {1: 1.0, 2: 0.5, 3: 1 / 3}
    )
    found = events_by_tag(tmp_path)
    plugins = {tag: values[0][1].metadata.plugin_data.plugin_name for tag, values in found.items()}
    assert plugins == {
        "_hparams_/session_start_info": "hparams",
        "loss": "scalars",
        "count": "scalars",
        "grid": "images",
        "gray": "images",
        "weights": "histograms",
        "note": "text",
        "clip": "audio",
        "raw": "",
    }
    # Images: [width, height, PNG...] strings, the PNG holding the exact pixels.
    strings = tensor_util.make_ndarray(found["grid"][0][1].tensor)
    assert strings[:2].tolist() == [b"7", b"5"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(strings[2]))), image[0])
    gray = tensor_util.make_ndarray(found["gray"][0][1].tensor)
    assert len(gray) == 4 and np.asarray(Image.open(io.BytesIO(gray[2]))).max() == 127
    assert tensor_util.make_ndarray(found["weights"][0][1].tensor).shape == (10, 3)
    assert tensor_util.make_ndarray(found["note"][0][1].tensor) == b"hello"
    clip = tensor_util.make_ndarray(found["clip"][0][1].tensor)
    with wave.open(io.BytesIO(clip[0][0])) as wav:
        assert (wav.getframerate(), wav.getnframes(), wav.getnchannels()) == (8000, 80, 1)
    np.testing.assert_array_equal(tensor_util.make_ndarray(found["raw"][0][1].tensor), [0, 1, 2])
    # Hyperparameters: flattened, numpy scalars as numbers, anything else as its string.
    start = plugin_data_pb2.HParamsPluginData.FromString(
        found["_hparams_/session_start_info"][0][1].metadata.plugin_data.content
    ).session_start_info
    assert start.hparams["lr"].number_value == 0.5
    assert start.hparams["model.depth"].number_value == 4
    assert start.hparams["shape"].string_value == "(1, 2)"


def test_a_record_cut_short_ends_the_file_and_a_corrupt_one_is_refused(tmp_path):
    writer = tensorboard_events.metric_writer_class()(str(tmp_path))
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_scalars(2, {"loss": 2.0})
    writer.close()
    path = Path(writer.path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # a writer killed in its last record
    assert tensorboard_events.read_scalars(str(tmp_path), "loss") == {1: 1.0}
    path.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    with pytest.raises(ValueError, match="corrupt record"):
        tensorboard_events.read_scalars(str(tmp_path), "loss")


def test_events_go_to_a_local_directory_only():
    with pytest.raises(ValueError, match="local directory"):
        tensorboard_events.EventFileWriter("gs://bucket/run")


def test_clu_writers_are_the_tensorflow_free_ones_once_shortcut_jax_is_imported(tmp_path):
    from clu import metric_writers

    assert metric_writers.SummaryWriter is tensorboard_events.metric_writer_class()
    assert issubclass(metric_writers.SummaryWriter, metric_writers.MetricWriter)
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    writer.write_scalars(4, {"loss": 0.25})
    writer.close()
    assert tensorboard_events.read_scalars(str(tmp_path), "loss") == {4: 0.25}


def test_create_writer_writes_events_and_the_log_and_nothing_on_other_processes(tmp_path):
    writer = metric_files.create_writer(str(tmp_path / "run"))
    writer.write_scalars(7, {"loss": 0.5})
    writer.flush()
    assert tensorboard_events.read_scalars(str(tmp_path / "run"), "loss") == {7: 0.5}
    writer.close()
    other = metric_files.create_writer(str(tmp_path / "other"), is_chief=False)
    other.write_scalars(7, {"loss": 0.5})
    other.close()
    assert not (tmp_path / "other").exists()


# --- Without TensorFlow ------------------------------------------------------------------------

# Makes `import tensorflow` fail as it does where TensorFlow is not installed (no sys.modules
# entry: `sys.modules["tensorflow"] = None` would make tfds believe TensorFlow was loaded).
BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoTensorFlow())
    """
)


def run_without_tensorflow(script: str, tmp_path: Path, timeout: float = 600) -> str:
    """Runs `script` in a fresh interpreter where TensorFlow cannot be imported; its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORFLOW + textwrap.dedent(script)],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "TMP_PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_a_run_trains_and_writes_tensorboard_events_without_tensorflow(tmp_path):
    """The default install has no TensorFlow: the train loop (CLU's writers and periodic
    actions included) runs, and its events hold the losses and the sample grids."""
    out = run_without_tensorflow(
        """
        import os, sys
        sys.path.insert(0, "tests")
        try:
            import tensorflow
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("TensorFlow was importable")
        from tiny import tiny_mnist_config
        from shortcut_jax import tensorboard_events, train
        from clu import metric_writers, periodic_actions

        workdir = os.path.join(os.environ["TMP_PATH"], "run")
        history = train.train_and_evaluate(tiny_mnist_config(2), workdir)
        losses = tensorboard_events.read_scalars(workdir, "loss")
        assert losses.keys() == history.keys() == {1, 2}, (losses, history)
        for step, loss in losses.items():
            assert abs(loss - history[step]["loss"]) < 1e-6 * max(1.0, abs(loss))
        tags = set()
        for path in os.listdir(workdir):
            if path.startswith("events.out.tfevents."):
                for event in tensorboard_events.read_events(os.path.join(workdir, path)):
                    tags.update(value.tag for value in event.summary.value)
        assert {"samples/1_step", "samples/3_steps", "_hparams_/session_start_info"} <= tags, tags
        print("tensorflow" in sys.modules, metric_writers.SummaryWriter.__module__)
        """,
        tmp_path,
    )
    assert out.split() == ["False", "shortcut_jax.tensorboard_events"]


# --- Weights & Biases --------------------------------------------------------------------------


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.logged: list[tuple[int, dict]] = []
        self.config = FakeConfig()
        self.finished = False

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


class FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        assert allow_val_change
        super().update(values)


class Media:
    def __init__(self, data=None, **kwargs):
        self.data, self.kwargs = data, kwargs


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        module.runs.append(FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    module.Image = type("Image", (Media,), {})
    module.Histogram = type("Histogram", (Media,), {})
    module.Audio = type("Audio", (Media,), {})
    module.Video = type("Video", (Media,), {})
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def wandb_config(project: str = "shortcut", entity: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"wandb_project": project, "wandb_entity": entity})


def test_wandb_is_off_without_a_project(tmp_path, fake_wandb):
    for config in (None, ml_collections.ConfigDict({"seed": 0}), wandb_config("")):
        metric_files.create_writer(str(tmp_path / "run"), config=config).close()
    assert fake_wandb.runs == []


def test_wandb_writer_logs_what_tensorboard_gets_and_resumes_the_same_run(tmp_path, fake_wandb):
    workdir = tmp_path / "mnist"
    writer = metric_files.create_writer(str(workdir), config=wandb_config(entity="team"))
    writer.write_hparams({"lr": 0.1, "model.depth": 4})
    writer.write_scalars(3, {"loss": np.float32(0.5)})
    writer.write_images(3, {"grid": np.zeros((1, 4, 4, 3), np.uint8)})
    writer.write_images(3, {"one": np.ones((4, 4, 3), np.float32)})
    writer.write_histograms(3, {"w": np.arange(10.0)}, {"w": 5})
    writer.write_texts(3, {"note": "hi"})
    writer.write_audios(3, {"clip": np.zeros((2, 8, 1))}, sample_rate=800)
    writer.write_videos(3, {"video": np.zeros((2, 4, 4, 3), np.uint8)})
    writer.write_summaries(3, {"raw": np.zeros(2)})  # not for W&B: a warning, nothing logged
    writer.flush()
    writer.close()

    (run,) = fake_wandb.runs
    assert run.kwargs["project"] == "shortcut" and run.kwargs["entity"] == "team"
    assert run.kwargs["name"] == "mnist" and run.kwargs["resume"] == "allow"
    assert run.kwargs["dir"] == str(workdir)
    run_id = (workdir / metric_files.WANDB_RUN_ID_FILE).read_text().strip()
    assert run.kwargs["id"] == run_id and len(run_id) == 8
    assert run.config == {"lr": 0.1, "model.depth": 4}
    assert [step for step, _ in run.logged] == [3] * 7
    logged = {key: value for _, values in run.logged for key, value in values.items()}
    assert logged["loss"] == 0.5 and isinstance(logged["loss"], float)
    assert [image.data.shape for image in logged["grid"]] == [(4, 4, 3)]
    assert logged["one"].data.dtype == np.uint8 and logged["one"].data.max() == 255
    counts, edges = logged["w"].kwargs["np_histogram"]
    assert counts.sum() == 10 and len(edges) == 6
    assert logged["note"] == "hi"
    assert [clip.kwargs["sample_rate"] for clip in logged["clip"]] == [800, 800]
    assert logged["video"].data.shape == (2, 3, 4, 4)  # T, C, H, W
    assert run.finished
    # The events were written too.
    assert tensorboard_events.read_scalars(str(workdir), "loss") == {3: 0.5}

    metric_files.create_writer(str(workdir), config=wandb_config()).close()  # a resumed run
    assert fake_wandb.runs[1].kwargs["id"] == run_id


def test_wandb_on_another_process_starts_no_run(tmp_path, fake_wandb):
    metric_files.create_writer(str(tmp_path), is_chief=False, config=wandb_config()).close()
    assert fake_wandb.runs == []


def test_a_missing_wandb_fails_at_once_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match=r"pip install wandb") as error:
        metric_files.create_writer(str(tmp_path / "run"), config=wandb_config())
    assert "config.wandb_project='shortcut'" in str(error.value)
    assert not list((tmp_path / "run").glob(tensorboard_events.EVENTS_GLOB))


def test_the_config_check_names_wandb_project_when_wandb_is_missing(monkeypatch):
    from shortcut_jax import config_lib, configs

    config = configs.base_config()
    assert config.wandb_project == "" and config.wandb_entity == ""
    config_lib.validate(config, device_count=1)  # off by default: no wandb needed
    config.wandb_project = "shortcut"
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(config_lib.ConfigError, match=r"config.wandb_project = 'shortcut'.*pip"):
        config_lib.validate(config, device_count=1)
    config_lib.validate(config, device_count=1, check_files=False)  # planning for another machine
