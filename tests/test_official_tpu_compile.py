"""benchmarks/official_tpu_compile.py without the official code or a compile: parsing, report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location(
        "official_tpu_compile", BENCHMARKS / "official_tpu_compile.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


otc = _load()

# One line per command as in their README (a backslash at a line end joins the lines).
README = """
or on CelebAHQ-256:
```
python train.py --model.hidden_size 768 --model.depth 12 --dataset_name celebahq256 \
--model.cfg_scale 0 --batch_size 64
```
or on Imagenet-256:
```
python train.py --model.hidden_size 768 --model.patch_size 2 --dataset_name imagenet256 \
--model.cfg_scale 1.5 --model.bootstrap_cfg 1 --batch_size 256 --max_steps 810_000 \
--model.train_type shortcut
```
A larger model:
```
python train.py --model.hidden_size=1152 --model.depth 28 --dataset_name imagenet256 \
--batch_size 256
```
"""


def test_readme_command_line_of_the_dataset_and_width_gives_their_flags():
    flags = otc.readme_command_flags(README)
    assert flags["batch_size"] == 256
    assert flags["model"] == {
        "hidden_size": 768,
        "patch_size": 2,
        "cfg_scale": 1.5,
        "bootstrap_cfg": 1,
        "train_type": "shortcut",
    }
    assert flags["other"] == {"dataset_name": "imagenet256", "max_steps": 810_000}
    larger = otc.readme_command_flags(README, hidden_size=1152)
    assert larger["model"] == {"hidden_size": 1152, "depth": 28}  # --flag=value form too


def test_a_readme_without_the_command_line_is_one_error():
    with pytest.raises(ValueError, match="imagenet256.*768"):
        otc.readme_command_flags("python train.py --dataset_name celebahq256 --batch_size 8")


def test_layouts_meshes_and_result_paths():
    assert otc.parse_layouts("dp, fsdp") == ["dp", "fsdp"]
    with pytest.raises(ValueError, match="--layouts"):
        otc.parse_layouts("tp")
    assert otc.parse_sides("official, ours") == ["ours", "official"]
    with pytest.raises(ValueError, match="--sides"):
        otc.parse_sides("theirs")
    assert otc.our_mesh("dp", 16) == {"data": 16, "fsdp": 1, "tensor": 1}
    assert otc.our_mesh("fsdp", 4) == {"data": 1, "fsdp": 4, "tensor": 1}
    path = otc.results_path("v5p:2x2x1", Path("/r"))
    assert path == Path("/r/official_tpu_compile_v5p_2x2x1.json")


def _entry(side, layout, gib, flops, **extra):
    return {
        "side": side,
        "layout": layout,
        "argument_bytes": int(gib * otc.GiB),
        "output_bytes": int(gib * otc.GiB),
        "alias_bytes": int(gib * otc.GiB) if side == "ours" else 0,
        "temp_bytes": int(2 * gib * otc.GiB),
        "code_bytes": 0,
        "total_bytes": int((3 if side == "ours" else 4) * gib * otc.GiB),
        "flops": flops,
        "params": 130_000_000,
        "mesh": otc.our_mesh(layout, 16) if side == "ours" else {"devices": 16},
        "sharding": "" if side == "ours" else layout,
        "compile_seconds": 60.0,
        "error": "",
        **extra,
    }


def test_report_has_a_row_per_side_and_the_official_to_ours_ratios():
    results = {
        "chips": 16,
        "chip": "v5e",
        "settings": {"topology": "v5e:4x4", "layouts": ["dp", "fsdp"], "batch_size": 256},
        "meta": {"date": "today", "versions": {"jax": "0.10.2"}, "our_commit": "abcdef0123"},
        "runs": [
            _entry("ours", "dp", 1.0, 2.5e12),
            _entry("official", "dp", 1.0, 3.0e12),
            _entry("ours", "fsdp", 0.5, 5e12),
            _entry("official", "fsdp", 0.5, 0.0, error="RESOURCE_EXHAUSTED: 30G exceeds HBM"),
        ],
    }
    text = otc.report(results)
    row = "| ours | data=16 | 1.00 | 0.00 | 2.00 | 3.00 | 2.500 | 130,000,000 | abcdef0 |"
    assert row in text  # a file without per-entry records: the commit of its meta
    assert "| official | devices=16, dp | 1.00 | 1.00 | 2.00 | 4.00 | 3.000 |" in text
    assert "| ours | fsdp=16 |" in text
    assert "| official | devices=16, fsdp | refused by the compiler: RESOURCE_EXHAUSTED" in text
    assert "30G exceeds HBM |||||| abcdef0 |" in text
    assert "dp: official / ours: total memory 1.33x, temporaries 1.00x, FLOPs 1.20x." in text
    assert "fsdp: official / ours" not in text  # no ratio against a refused compile


def _file(commit, runs, changes=(), fingerprint="theirs-1"):
    return {
        "chips": 16,
        "chip": "v5e",
        "settings": {
            "topology": "v5e:4x4",
            "layouts": sorted({entry["layout"] for entry in runs}),
            "batch_size": 256,
            "image_shape": [32, 32, 4],
            "official_fingerprint": {"train.py": fingerprint},
        },
        "meta": {
            "date": f"day of {commit}",
            "versions": {"jax": "0.10.2"},
            "libtpu": "0.0.42",
            "our_commit": commit,
            "our_tree_changes": list(changes),
        },
        "runs": runs,
    }


def test_a_run_of_some_sides_keeps_the_other_entries_each_with_its_commit():
    previous = _file(
        "aaaaaaa111",
        [
            _entry("ours", "dp", 1.0, 2.5e12),
            _entry("official", "dp", 1.0, 3.0e12),
            _entry("ours", "fsdp", 4.0, 5e12),
            _entry("official", "fsdp", 0.5, 2.4e12),
        ],
    )
    new = _file("bbbbbbb222", [], changes=[" M shortcut_jax/dit.py"])
    new["runs"] = [otc.stamp(_entry("ours", "fsdp", 0.5, 2.5e12), new["meta"])]
    new["settings"]["layouts"] = ["fsdp"]
    merged = otc.merge_results(previous, new)
    assert [(e["side"], e["layout"], e["commit"]) for e in merged["runs"]] == [
        ("ours", "dp", "aaaaaaa111"),
        ("official", "dp", "aaaaaaa111"),
        ("ours", "fsdp", "bbbbbbb222"),  # recompiled: replaced, in its place
        ("official", "fsdp", "aaaaaaa111"),
    ]
    assert merged["runs"][2]["temp_bytes"] == int(1.0 * otc.GiB)
    assert merged["runs"][2]["tree_changes"] == [" M shortcut_jax/dit.py"]
    assert merged["runs"][0]["date"] == "day of aaaaaaa111"  # the kept entry's own record
    assert merged["settings"]["layouts"] == ["dp", "fsdp"]
    assert merged["settings"]["sides"] == ["ours", "official"]
    assert merged["meta"]["our_commit"] == "bbbbbbb222"
    assert "bbbbbbb222" not in str(previous)  # the previous file is not changed
    text = otc.report(merged)
    assert "| ours | data=16 | 1.00 | 0.00 | 2.00 | 3.00 | 2.500 | 130,000,000 | aaaaaaa |" in text
    row = "| ours | fsdp=16 | 0.50 | 0.00 | 1.00 | 1.50 | 2.500 | 130,000,000 | bbbbbbb+changes |"
    assert row in text
    assert (
        "day of aaaaaaa111, jax 0.10.2, libtpu 0.0.42: ours dp, official dp, official fsdp" in text
    )
    assert otc.merge_results(None, new) is new  # no file yet


def test_a_merge_refuses_a_file_of_other_settings():
    previous = _file("aaaaaaa111", [_entry("official", "dp", 1.0, 3.0e12)])
    new = _file("bbbbbbb222", [_entry("ours", "dp", 1.0, 2.5e12)], fingerprint="theirs-2")
    with pytest.raises(ValueError, match="official_fingerprint"):
        otc.merge_results(previous, new)  # their kept entry is of another checkout
    new["runs"].append(_entry("official", "dp", 1.0, 3.0e12))
    assert len(otc.merge_results(previous, new)["runs"]) == 2  # nothing of theirs kept
    new["settings"]["batch_size"] = 128
    with pytest.raises(ValueError, match="batch_size"):
        otc.merge_results(previous, new)
