"""The nano model shipped in models/nano: its files, its size, and that it loads over the
installed base LLM and answers SimWorld test-split requests in valid TRP with boxes,
masks, keypoints and depth where asked. Its accuracy is measured by `refvlm eval`
(numbers in models/nano/MODEL_CARD.md); here a few held-out scenes guard against a
broken or mismatched model landing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refvlm_core import trp
from refvlm_core.geometry import box_iou
from refvlm_training.evaluation.runner import eval_items
from refvlm_training.simworld import SimWorld, SimWorldConfig

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "nano"
SIZE_LIMIT_MB = 50
pytestmark = pytest.mark.skipif(not MODEL_DIR.is_dir(), reason="models/nano is not trained yet")


@pytest.fixture(scope="module")
def predictor():
    from refvlm_core.predictor import Predictor

    return Predictor.from_pretrained(MODEL_DIR)


def _test_items(task: str, count: int):
    """The first ``count`` evaluation items (prompt + ground truth) of the test split."""
    world = SimWorld(SimWorldConfig(width=256, height=192), "test")
    samples = (s for index in range(50) for s in world.samples(index, 1, 0, tasks=(task,)))
    items = eval_items(samples, task, limit=count)
    assert len(items) == count, f"fewer than {count} {task} samples in 50 test scenes"
    return items


def test_files_size_and_card():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "MODEL_CARD.md"} <= names, names
    size_mb = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= SIZE_LIMIT_MB, f"models/nano is {size_mb:.1f} MB"
    assert json.loads((MODEL_DIR / "config.json").read_text())["name"] == "nano"
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    for needed in ("tools/train_nano.sh", "Wall time", "Hardware", "Acc@0.5", "cIoU", "PCK", "AbsRel"):
        assert needed in card, needed


def test_rec_answers_are_valid_trp_with_boxes_on_held_out_scenes(predictor):
    ious = []
    for item in _test_items("rec", 4):
        result = predictor.predict(item.sample.image, item.prompt, max_new_tokens=48)
        assert trp.parse(result.trp_text, strict=True).errors == [], result.trp_text
        boxes = [o.box_xyxy for o in result.objects if o.box_xyxy is not None]
        assert boxes and np.isfinite(boxes[0]).all(), result.trp_text
        truth = item.sample.turns[1].targets[0].boxes[:1]
        ious.append(float(box_iou(np.asarray(boxes[:1]), truth)[0, 0]))
    print("IoU on 4 held-out referring expressions:", [round(i, 2) for i in ious])
    assert max(ious) >= 0.5, ious   # the card reports Acc@0.5 over the test split


def test_mask_keypoints_and_depth_where_asked(predictor):
    res, = _test_items("res", 1)
    result = predictor.predict(res.sample.image, res.prompt, max_new_tokens=48)
    assert any(o.mask is not None and o.mask.shape == res.sample.image.shape[:2] and o.mask.any()
               for o in result.objects), result.trp_text
    pose, = _test_items("keypoint", 1)
    result = predictor.predict(pose.sample.image, pose.prompt, max_new_tokens=48)
    assert any(o.keypoints is not None and o.keypoints.shape == (17, 3) for o in result.objects), result.trp_text
    depth, = _test_items("depth", 1)
    result = predictor.predict(depth.sample.image, depth.prompt, max_new_tokens=48)
    maps = [o.depth for o in result.objects if o.depth is not None]
    assert maps and np.nanmedian(maps[0]) > 0, result.trp_text
