"""Grounded conversation generation (GCG) metrics as GLaMM (Rasheed et al. 2024)
defines them in its evaluation script:

- AP50: COCO AP at IoU 0.5 of every predicted region against every ground-truth
  region of the image, all in one class and every score 1.0 (the caption decides
  which regions exist; there is no ranking).
- mIoU: per image, pair predictions and ground truths one to one by repeatedly taking
  the highest remaining IoU (while it is > 0); the image's score is the mean IoU of
  those pairs (0 without any); mIoU is the mean over images.
- Recall: per image, the same greedy pairing, but a pair counts only while its IoU
  >= 0.5 and the text similarity of the two phrases >= 0.5 (the first pair failing
  either ends the image); recall = counted pairs / ground-truth regions.

GLaMM embeds phrases with BERT mean pooling; we use the sentence embedder of
``text_similarity`` (MiniLM, trained for sentence similarity). Regions are masks
(``kind="mask"``, [H, W] bool) or boxes (``kind="box"``, xyxy) for the box variant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refvlm_core.errors import InputError

from . import _coco
from .grounding import box_intersection_union, iou, mask_intersection_union
from .text_similarity import PhraseEmbedder


@dataclass
class GcgImage:
    """One image: predicted regions with the phrase each belongs to, and ground truth."""

    pred_regions: list[np.ndarray] = field(default_factory=list)
    pred_labels: list[str] = field(default_factory=list)
    gt_regions: list[np.ndarray] = field(default_factory=list)
    gt_labels: list[str] = field(default_factory=list)

    def check(self) -> None:
        if len(self.pred_regions) != len(self.pred_labels) or len(self.gt_regions) != len(self.gt_labels):
            raise InputError("GCG: give one phrase label per predicted and per ground-truth region")


def iou_matrix(preds: list[np.ndarray], gts: list[np.ndarray], kind: str) -> np.ndarray:
    """[P, G] IoU of every prediction with every ground truth."""
    measure = box_intersection_union if kind == "box" else mask_intersection_union
    out = np.zeros((len(preds), len(gts)))
    for i, pred in enumerate(preds):
        for j, gt in enumerate(gts):
            out[i, j] = iou(*measure(pred, gt))
    return out


def greedy_pairs(ious: np.ndarray, text_sims: np.ndarray | None = None, iou_threshold: float = 0.0,
                 sim_threshold: float = 0.0) -> list[tuple[int, int]]:
    """One-to-one pairs by descending IoU. Without thresholds: while IoU > 0. With them,
    stop at the first best pair below either threshold (GLaMM's recall matching)."""
    ious = ious.copy()
    pairs: list[tuple[int, int]] = []
    while ious.size and ious.max() > 0:
        i, j = np.unravel_index(int(np.argmax(ious)), ious.shape)
        if ious[i, j] < iou_threshold or (text_sims is not None and text_sims[i, j] < sim_threshold):
            break
        pairs.append((int(i), int(j)))
        ious[i, :], ious[:, j] = 0.0, 0.0
    return pairs


def gcg_miou(images: list[GcgImage], kind: str = "mask") -> float:
    scores = []
    for image in images:
        ious = iou_matrix(image.pred_regions, image.gt_regions, kind)
        pairs = greedy_pairs(ious)
        scores.append(float(np.mean([ious[p] for p in pairs])) if pairs else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def gcg_recall(images: list[GcgImage], embedder: PhraseEmbedder, kind: str = "mask",
               iou_threshold: float = 0.5, sim_threshold: float = 0.5) -> float:
    found = total = 0
    for image in images:
        total += len(image.gt_labels)
        ious = iou_matrix(image.pred_regions, image.gt_regions, kind)
        sims = embedder.similarity(image.pred_labels, image.gt_labels)
        found += len(greedy_pairs(ious, sims, iou_threshold, sim_threshold))
    return found / total if total else 0.0


def gcg_ap50(images: list[GcgImage], kind: str = "mask") -> float:
    """COCO AP@0.5 of all regions as one class with score 1.0 (pycocotools)."""
    coco_images, gts, dets = [], [], []
    for image_id, image in enumerate(images, start=1):
        regions = image.gt_regions + image.pred_regions
        height, width = _image_size(regions, kind)
        coco_images.append({"id": image_id, "height": height, "width": width})
        gts += [dict(_coco.region_annotation(image_id, r, kind), category_id=1) for r in image.gt_regions]
        dets += [dict(_coco.region_annotation(image_id, r, kind), category_id=1, score=1.0) for r in image.pred_regions]
    gt = _coco.build_gt(coco_images, gts, [{"id": 1, "name": "object"}])
    return _coco.finite(_coco.evaluate(gt, dets, "segm" if kind == "mask" else "bbox")[1])


def _image_size(regions: list[np.ndarray], kind: str) -> tuple[int, int]:
    if kind == "mask":
        return tuple(regions[0].shape) if regions else (1, 1)  # type: ignore[return-value]
    far = max((float(max(r[2], r[3])) for r in regions), default=1.0)
    return int(np.ceil(far)) + 1, int(np.ceil(far)) + 1


def gcg_metrics(images: list[GcgImage], embedder: PhraseEmbedder, kind: str = "mask") -> dict[str, float]:
    """{"ap50", "miou", "recall"} over images (caption metrics come from ``caption``)."""
    if kind not in ("mask", "box"):
        raise InputError(f"GCG regions are masks or boxes, not {kind!r}")
    for image in images:
        image.check()
    return {"ap50": gcg_ap50(images, kind), "miou": gcg_miou(images, kind),
            "recall": gcg_recall(images, embedder, kind)}
