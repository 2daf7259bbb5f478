"""The nano model shipped in models/nano: its files, its size, and that it loads over the
installed base LLM and answers SimWorld test-split requests under its default system
prompt (what the node and `refvlm infer` send) with the held-out evaluation phrasings, in
valid TRP with a registered unit, boxes, masks, keypoints and depth. Its accuracy is
measured by `refvlm eval` (models/nano/MODEL_CARD.md); here a few held-out scenes guard
against a broken or mismatched model landing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refvlm_core import trp
from refvlm_simworld import SimWorld, SimWorldConfig
from refvlm_training.data.simworld import world_samples
from refvlm_training.evaluation.runner import eval_items

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "nano"
SIZE_LIMIT_MB = 50


@pytest.fixture(scope="module")
def predictor():
    from refvlm_core.predictor import Predictor

    return Predictor.from_pretrained(MODEL_DIR)


def _test_items(task: str, count: int):
    """The first ``count`` evaluation items (prompt + ground truth) of the test split."""
    world = SimWorld(SimWorldConfig(width=256, height=192), "test")
    samples = (s for index in range(50) for s in world_samples(world, index, 1, 0, tasks=(task,), system="default"))
    items = eval_items(samples, task, limit=count)
    assert len(items) == count, f"fewer than {count} {task} samples in 50 test scenes"
    return items


def test_files_size_and_card():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "MODEL_CARD.md"} <= names, names
    size_mb = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= SIZE_LIMIT_MB, f"models/nano is {size_mb:.1f} MB"
    assert json.loads((MODEL_DIR / "config.json").read_text())["name"] == "nano"
    card = (MODEL_DIR / "MODEL_CARD.md").read_text().lower()
    for needed in ("tools/train_nano.sh", "wall time", "hardware", "acc@0.5", "ciou", "pck@0.1", "absrel"):
        assert needed in card, needed


def _predict(predictor, item):
    assert item.sample.system is None  # the model's default prompt, as the node sends
    return predictor.predict(item.sample.image, item.prompt, max_new_tokens=48)


def test_answers_name_registered_units(predictor):
    for task in ("rec", "res", "keypoint", "depth"):
        item, = _test_items(task, 1)
        parse = trp.parse(_predict(predictor, item).trp_text, strict=True)
        assert parse.errors == [] and parse.refs, (task, parse)
        assert {u for ref in parse.refs for u in ref.units} <= set(predictor.model.decoders), (task, parse)


def test_rec_answers_are_valid_trp_with_boxes_on_held_out_scenes(predictor):
    for item in _test_items("rec", 3):
        result = _predict(predictor, item)
        assert trp.parse(result.trp_text, strict=True).errors == [], result.trp_text
        boxes = [o.box_xyxy for o in result.objects if o.box_xyxy is not None]
        assert boxes and np.isfinite(boxes[0]).all(), result.trp_text


def test_masks_and_keypoints_where_asked(predictor):
    res, = _test_items("res", 1)
    result = _predict(predictor, res)
    assert any(o.mask is not None and o.mask.shape == res.sample.image.shape[:2] for o in result.objects), \
        result.trp_text
    pose, = _test_items("keypoint", 1)
    result = _predict(predictor, pose)
    assert any(o.keypoints is not None and o.keypoints.shape == (17, 3) for o in result.objects), result.trp_text


def test_depth_on_held_out_scenes_is_close_to_the_truth(predictor):
    errors = []
    for item in _test_items("depth", 3):
        result = _predict(predictor, item)
        [predicted] = [o.depth for o in result.objects if o.depth is not None]
        truth = item.sample.depth
        valid = np.isfinite(truth) & np.isfinite(predicted) & (truth > 0)
        errors.append(float(np.mean(np.abs(predicted[valid] - truth[valid]) / truth[valid])))
    print("depth AbsRel on 3 held-out scenes:", [round(e, 3) for e in errors])
    assert np.mean(errors) < 0.2, errors   # the card: 0.107 over 100 test scenes
