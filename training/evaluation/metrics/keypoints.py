"""Keypoint metrics: COCO OKS AP through pycocotools, and PCK@0.1.

- OKS AP: AP over OKS thresholds 0.50:0.95 (and AP at 0.5), COCO's 17 per-keypoint
  sigmas, object scale from the ground-truth area (the box area when no other area is
  given). Ground truth with no labelled keypoint is ignored, as COCO does.
- PCK@0.1: ground-truth and predicted instances of an image are paired one to one
  (Hungarian on mean distance over labelled keypoints); a labelled keypoint is correct
  when its pair's keypoint lies within 0.1 x max(width, height) of the ground-truth
  box. Keypoints of unpaired ground truth count as wrong. PCK = correct / labelled.

Keypoints are [17, 3] arrays: x, y pixels and v (ground truth: 0 absent, 1 occluded,
2 visible; predictions: any confidence, unused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from refvlm_core.errors import InputError

from . import _coco


@dataclass
class PoseImage:
    gt_keypoints: list[np.ndarray] = field(default_factory=list)   # each [17, 3]
    gt_boxes: list[np.ndarray] = field(default_factory=list)       # each [4] xyxy
    pred_keypoints: list[np.ndarray] = field(default_factory=list) # each [17, 3]
    pred_scores: list[float] = field(default_factory=list)
    gt_areas: list[float] | None = None                            # default: box areas


def _check(image: PoseImage) -> None:
    if len(image.gt_keypoints) != len(image.gt_boxes):
        raise InputError("give one box per ground-truth pose")
    if len(image.pred_keypoints) != len(image.pred_scores):
        raise InputError("give one score per predicted pose")
    for kp in (*image.gt_keypoints, *image.pred_keypoints):
        if np.asarray(kp).shape != (17, 3):
            raise InputError(f"keypoints must be [17, 3] (x, y, v), got {np.asarray(kp).shape}")


def oks_ap(images: list[PoseImage]) -> dict[str, float]:
    """{"oks_ap", "oks_ap50"} from pycocotools' keypoint evaluation."""
    coco_images, gts, dets = [], [], []
    for image_id, image in enumerate(images, start=1):
        _check(image)
        coco_images.append({"id": image_id})
        areas = image.gt_areas or [(b[2] - b[0]) * (b[3] - b[1]) for b in image.gt_boxes]
        for kp, box, area in zip(image.gt_keypoints, image.gt_boxes, areas):
            kp = np.asarray(kp, np.float64)
            gts.append({"image_id": image_id, "category_id": 1, "keypoints": kp.ravel().tolist(),
                        "num_keypoints": int((kp[:, 2] > 0).sum()), "area": float(area),
                        "bbox": _coco.xyxy_to_xywh(box)})
        for kp, score in zip(image.pred_keypoints, image.pred_scores):
            flat = np.concatenate([np.asarray(kp, np.float64)[:, :2], np.ones((17, 1))], 1).ravel()
            dets.append({"image_id": image_id, "category_id": 1, "keypoints": flat.tolist(), "score": float(score)})
    gt = _coco.build_gt(coco_images, gts, [{"id": 1, "name": "person", "keypoints": [str(k) for k in range(17)],
                                            "skeleton": []}])
    stats = _coco.evaluate(gt, dets, "keypoints")
    return {"oks_ap": _coco.finite(stats[0]), "oks_ap50": _coco.finite(stats[1])}


def _pair_poses(gt: list[np.ndarray], pred: list[np.ndarray]) -> list[tuple[int, int]]:
    """Hungarian pairs (gt index, pred index) minimising mean labelled-keypoint distance."""
    if not gt or not pred:
        return []
    cost = np.zeros((len(gt), len(pred)))
    for i, g in enumerate(gt):
        labelled = g[:, 2] > 0
        for j, p in enumerate(pred):
            cost[i, j] = np.linalg.norm(g[labelled, :2] - p[labelled, :2], axis=1).mean() if labelled.any() else 0.0
    rows, cols = linear_sum_assignment(cost)
    return list(zip(rows.tolist(), cols.tolist()))


def pck(images: list[PoseImage], threshold: float = 0.1) -> float:
    """Fraction of labelled ground-truth keypoints within ``threshold`` x box size."""
    correct = labelled_total = 0
    for image in images:
        _check(image)
        gt = [np.asarray(k, np.float64) for k in image.gt_keypoints]
        pred = [np.asarray(k, np.float64) for k in image.pred_keypoints]
        labelled_total += sum(int((g[:, 2] > 0).sum()) for g in gt)
        for i, j in _pair_poses(gt, pred):
            x0, y0, x1, y1 = image.gt_boxes[i]
            labelled = gt[i][:, 2] > 0
            distance = np.linalg.norm(gt[i][labelled, :2] - pred[j][labelled, :2], axis=1)
            correct += int((distance <= threshold * max(x1 - x0, y1 - y0)).sum())
    return correct / labelled_total if labelled_total else 0.0


def keypoint_metrics(images: list[PoseImage]) -> dict[str, float]:
    """{"oks_ap", "oks_ap50", "pck@0.1"}."""
    return {**oks_ap(images), "pck@0.1": pck(images)}
