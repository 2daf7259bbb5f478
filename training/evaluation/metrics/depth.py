"""Monocular depth metrics (Eigen et al. 2014) over valid pixels only: ground truth
finite and > 0, prediction finite. Per image, then averaged over images.

- AbsRel = mean |pred - gt| / gt
- RMSE   = sqrt(mean (pred - gt)^2), metres
- delta1 = fraction of pixels with max(pred / gt, gt / pred) < 1.25 (a prediction
  <= 0 never passes)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from refvlm_core.errors import InputError


def image_depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float] | None:
    """Metrics of one [H, W] depth map; None when no pixel is valid."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise InputError(f"predicted depth {pred.shape} and ground truth {gt.shape} differ in size")
    valid = np.isfinite(gt) & (gt > 0) & np.isfinite(pred)
    if not valid.any():
        return None
    p, g = pred[valid], gt[valid]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, np.maximum(p / g, g / p), np.inf)
    return {"absrel": float(np.mean(np.abs(p - g) / g)), "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
            "delta1": float(np.mean(ratio < 1.25))}


def depth_metrics(preds: Sequence[np.ndarray | None], gts: Sequence[np.ndarray]) -> dict[str, float]:
    """{"absrel", "rmse", "delta1", "valid_images"}. A missing prediction (None) counts as
    a failed image: AbsRel 1, delta1 0, RMSE of a zero prediction."""
    if len(preds) != len(gts):
        raise InputError(f"{len(preds)} depth predictions but {len(gts)} ground truths")
    rows = []
    for pred, gt in zip(preds, gts):
        if pred is None:
            pred = np.zeros_like(np.asarray(gt, np.float64))
        row = image_depth_metrics(pred, gt)
        if row is not None:
            rows.append(row)
    if not rows:
        return {"absrel": 0.0, "rmse": 0.0, "delta1": 0.0, "valid_images": 0.0}
    out = {key: float(np.mean([r[key] for r in rows])) for key in ("absrel", "rmse", "delta1")}
    out["valid_images"] = float(len(rows))
    return out
