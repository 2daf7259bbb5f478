"""Every converter on its fixture (tests/fixtures/datasets), through `refvlm data`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refvlm_cli.main import main as refvlm
from refvlm_core import trp
from refvlm_training.data import shards, stats
from refvlm_training.data.converters.common import convert

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"

# name, fixture folder, tasks that must appear, skipped reasons expected
CASES = [
    ("coco_instances", "coco", {"rec", "res", "ovd", "ovs", "ig_scribble_mask", "reg_mask", "gcg_box"},
     {"unreadable_image": 1}),
    ("coco_keypoints", "coco", {"keypoint"}, {"unreadable_image": 1, "no_usable_annotation": 1}),
    ("coco_captions", "coco", {"caption"}, {"unreadable_image": 1}),
    ("refcoco", "refcoco", {"rec", "res", "reg_point", "reg_box", "multi"}, {}),
    ("flickr30k_entities", "flickr30k_entities", {"caption", "gcg_box", "rec"}, {}),
    ("visual_genome", "visual_genome", {"rec", "reg_box", "reg_scribble"}, {}),
    ("vqav2", "vqav2", {"vqa"}, {}),
    ("llava_instruct", "llava_instruct", {"vqa"}, {"unreadable_image": 1}),
    ("ade20k", "ade20k", {"ovs", "res", "ig_point_mask", "gcg_mask"}, {}),
    ("nyu_depth_v2", "nyu_depth_v2", {"depth"}, {}),
]


@pytest.mark.parametrize("name, folder, tasks, skipped", CASES, ids=[c[0] for c in CASES])
def test_converter_on_fixture(tmp_path, name, folder, tasks, skipped):
    summary = convert(name, FIXTURES / folder, tmp_path, progress=False)
    assert tasks <= set(summary.per_task), summary.to_text()
    assert dict(summary.skipped) == skipped
    samples = list(shards.read_samples(tmp_path))  # validates every record
    assert len(samples) == summary.samples > 0
    for sample in samples:
        assert sample.turns[0].text.startswith("<image>\n")
        for turn in sample.turns:
            if turn.role == "assistant":
                assert trp.parse(turn.text).ok


def test_coco_geometry_is_faithful(tmp_path):
    convert("coco_instances", FIXTURES / "coco", tmp_path, progress=False, max_per_task=None)
    res = [s for s in shards.read_samples(tmp_path) if s.task == "res" and s.id.startswith("coco_instances_1_")]
    box = next(s for s in res if "box" in s.turns[1].text).turns[1].targets[0]
    # the red rectangle of image 1 covers rows 3..11, columns 2..11 (polygon = its outline)
    np.testing.assert_array_equal(np.argwhere(box.masks[0]).min(0), [3, 2])
    np.testing.assert_array_equal(np.argwhere(box.masks[0]).max(0), [11, 11])


def test_keypoints_and_depth_values(tmp_path):
    convert("coco_keypoints", FIXTURES / "coco", tmp_path / "k", progress=False)
    person = next(shards.read_samples(tmp_path / "k")).turns[1].targets[0]
    assert person.units == ("keypoint",) and person.keypoints.shape == (1, 17, 3)
    assert person.keypoints[0, 0].tolist() == [16, 3, 2] and person.keypoints[0, 1].tolist() == [0, 0, 0]
    convert("nyu_depth_v2", FIXTURES / "nyu_depth_v2", tmp_path / "d", progress=False)
    depth = next(shards.read_samples(tmp_path / "d")).depth
    assert np.isnan(depth[0, 0]) and depth[5, 0] == pytest.approx(0.8) and depth[5, -1] == pytest.approx(4.0)


def test_refcoco_expressions_and_split(tmp_path):
    convert("refcoco", FIXTURES / "refcoco", tmp_path, progress=False, split="testA", max_per_task=None)
    rec = [s.turns[1].text for s in shards.read_samples(tmp_path) if s.task == "rec"]
    assert rec == [trp.format_phrase("blue ball", ("box",), 1)]


def test_cli_convert_stats_show(tmp_path, capsys):
    out = tmp_path / "shards"
    assert refvlm(["data", "convert", "ade20k", "--root", str(FIXTURES / "ade20k"), "--out", str(out)]) == 0
    assert "ade20k:" in capsys.readouterr().out
    assert refvlm(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    collected = stats.collect(out)
    assert f"{collected.samples} samples in 1 shard(s)" in text and "mask" in text
    assert collected.units["mask"] > 0 and collected.tasks["ovs"] == 1
    png = tmp_path / "x.png"
    shard = shards.list_shards(out)[0]
    assert refvlm(["data", "show", f"{shard}:2", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert refvlm(["data", "convert", "vqav2", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "--root" in capsys.readouterr().err


def test_cli_simworld_shards_pass_the_loader(tmp_path):
    from refvlm_training.data.loader import VTInstructDataset

    out = tmp_path / "sim"
    assert refvlm(["data", "simworld", "--split", "val", "--n", "1", "--out", str(out), "--size", "64x48"]) == 0
    dataset = VTInstructDataset(out)
    samples = list(dataset)
    assert samples and not dataset.skipped
    assert all(s.image.shape == (48, 64, 3) for s in samples)
