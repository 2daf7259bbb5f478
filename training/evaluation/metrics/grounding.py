"""Referring and interactive grounding metrics.

- REC: Acc@0.5 (the predicted box overlaps the target with IoU >= 0.5) and mean IoU.
- RES: cIoU = total intersection / total union over the set (large objects weigh
  more) and gIoU = mean of per-sample IoU.
- Interactive grounding: mIoU and cIoU per visual prompt type (point, box, scribble,
  mask), with box IoU for box answers and mask IoU for mask answers.

A missing prediction (None) counts as IoU 0 and adds the target's area to the union.
Boxes are xyxy pixels; masks are [H, W] bool at the image's size.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from refvlm_core.errors import InputError


def box_area(box: np.ndarray) -> float:
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def box_intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[float, float]:
    """(intersection, union) areas of two xyxy boxes; pred None -> (0, area(gt))."""
    if pred is None:
        return 0.0, box_area(gt)
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    inter = box_area(np.concatenate([np.maximum(p[:2], g[:2]), np.minimum(p[2:], g[2:])]))
    return inter, box_area(p) + box_area(g) - inter


def mask_intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[float, float]:
    """(intersection, union) pixel counts of two [H, W] masks; pred None -> (0, |gt|)."""
    gt = np.asarray(gt, bool)
    if pred is None:
        return 0.0, float(gt.sum())
    pred = np.asarray(pred, bool)
    if pred.shape != gt.shape:
        raise InputError(f"predicted mask {pred.shape} and target mask {gt.shape} differ in size; "
                         "bring the prediction back to the image's pixels first")
    return float(np.logical_and(pred, gt).sum()), float(np.logical_or(pred, gt).sum())


def iou(inter: float, union: float) -> float:
    """Intersection over union; two empty regions agree perfectly (1.0)."""
    return float(inter / union) if union > 0 else 1.0


def _pairs(preds: Sequence, gts: Sequence, kind: str) -> list[tuple[float, float]]:
    if len(preds) != len(gts):
        raise InputError(f"{len(preds)} predictions but {len(gts)} targets")
    measure = box_intersection_union if kind == "box" else mask_intersection_union
    return [measure(p, g) for p, g in zip(preds, gts)]


def rec_metrics(pred_boxes: Sequence[np.ndarray | None], gt_boxes: Sequence[np.ndarray],
                threshold: float = 0.5, kinds: Sequence[str] | None = None) -> dict[str, float]:
    """{"acc@0.5", "miou"} over referring expressions (one box each); with ``kinds`` (each
    expression's kind, e.g. "relation") also "acc@0.5/<kind>" and "count/<kind>"."""
    ious = np.array([iou(*pair) for pair in _pairs(pred_boxes, gt_boxes, "box")])
    if not len(ious):
        return {"acc@0.5": 0.0, "miou": 0.0}
    out = {"acc@0.5": float(np.mean(ious >= threshold)), "miou": float(np.mean(ious))}
    for kind in sorted(set(kinds or ())):
        chosen = np.array([k == kind for k in kinds])
        out[f"acc@0.5/{kind}"] = float(np.mean(ious[chosen] >= threshold))
        out[f"count/{kind}"] = int(chosen.sum())
    return out


def ciou_giou(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """cIoU (cumulative) and gIoU (mean per sample) of (intersection, union) pairs."""
    if not pairs:
        return {"ciou": 0.0, "giou": 0.0}
    inter, union = (float(sum(values)) for values in zip(*pairs))
    return {"ciou": iou(inter, union), "giou": float(np.mean([iou(*pair) for pair in pairs]))}


def res_metrics(pred_masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray]) -> dict[str, float]:
    """{"ciou", "giou"} over referring expressions (one mask each)."""
    return ciou_giou(_pairs(pred_masks, gt_masks, "mask"))


def interactive_metrics(prompt_kinds: Sequence[str], units: Sequence[str], preds: Sequence,
                        gts: Sequence) -> dict[str, float]:
    """Per prompt type and answer unit: ``"{kind}_{unit}/miou"`` and ``"{kind}_{unit}/ciou"``
    (e.g. "point_mask/miou"), plus "all/miou" and "all/ciou" over every sample."""
    if not len(prompt_kinds) == len(units) == len(preds) == len(gts):
        raise InputError("interactive grounding needs one prompt kind, unit, prediction and target per sample")
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for kind, unit, pred, gt in zip(prompt_kinds, units, preds, gts):
        if unit not in ("box", "mask"):
            raise InputError(f"interactive grounding answers with a box or a mask, not {unit!r}")
        pair = _pairs([pred], [gt], unit)[0]
        groups[f"{kind}_{unit}"].append(pair)
        groups["all"].append(pair)
    out: dict[str, float] = {}
    for name in sorted(groups):
        scores = ciou_giou(groups[name])
        out[f"{name}/miou"], out[f"{name}/ciou"] = scores["giou"], scores["ciou"]
    return out
