"""In-memory COCO ground truth and detections for pycocotools (no files), with its
printing silenced. Masks go in as compressed RLE, boxes as xywh."""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def xyxy_to_xywh(box: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def build_gt(images: list[dict[str, Any]], annotations: list[dict[str, Any]],
             categories: list[dict[str, Any]]):
    """A pycocotools COCO object from lists (ids assigned to annotations here)."""
    from pycocotools.coco import COCO

    coco = COCO()
    for k, ann in enumerate(annotations, start=1):
        ann.setdefault("id", k)
        ann.setdefault("iscrowd", 0)
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate(gt, detections: list[dict[str, Any]], iou_type: str, **params: Any) -> np.ndarray:
    """COCOeval stats (12 numbers for bbox/segm, 10 for keypoints); pycocotools' -1
    for "no ground truth" stays -1. No detections -> zeros where ground truth exists."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        size = 10 if iou_type == "keypoints" else 12
        return np.zeros(size) if gt.getAnnIds() else -np.ones(size)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        runner = COCOeval(gt, dt, iou_type)
        for name, value in params.items():
            setattr(runner.params, name, value)
        runner.evaluate()
        runner.accumulate()
        runner.summarize()
    return np.asarray(runner.stats, dtype=np.float64)


def finite(value: float) -> float:
    """pycocotools' -1 (no ground truth) -> 0.0 so that reports stay numeric."""
    return float(value) if value >= 0 else 0.0


def region_annotation(image_id: int, region: np.ndarray, kind: str) -> dict[str, Any]:
    """A box (xyxy) or a [H, W] bool mask -> COCO annotation fields (no category)."""
    if kind == "box":
        bbox = xyxy_to_xywh(region)
        return {"image_id": image_id, "bbox": bbox, "area": bbox[2] * bbox[3]}
    mask = np.asarray(region, bool)
    ys, xs = np.nonzero(mask)
    bbox = ([float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            if len(xs) else [0.0, 0.0, 0.0, 0.0])
    return {"image_id": image_id, "segmentation": mask_rle(mask), "area": float(mask.sum()), "bbox": bbox}
