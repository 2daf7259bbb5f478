"""Freeform open-vocabulary detection / segmentation: the paper's mAP_S.

The model names what it finds in its own words. Each predicted phrase is mapped to the
dataset class whose name is most similar in a sentence-embedding space; that cosine
similarity becomes the detection's score (a confident, on-vocabulary name ranks
first). Then COCO-style AP over IoU 0.50:0.95 through pycocotools, per class and
averaged ("map"), plus AP at 0.5 ("ap50").

With the class names given in the prompt (plain OVD/OVS) the same code applies: a
phrase equal to a class name maps to it with similarity 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refvlm_core.errors import InputError

from . import _coco
from .text_similarity import PhraseEmbedder


@dataclass
class DetectionImage:
    """Predicted regions with their phrases; ground truth regions with class names.
    Regions: xyxy boxes (``kind="box"``) or [H, W] bool masks (``kind="mask"``)."""

    pred_regions: list[np.ndarray] = field(default_factory=list)
    pred_phrases: list[str] = field(default_factory=list)
    gt_regions: list[np.ndarray] = field(default_factory=list)
    gt_classes: list[str] = field(default_factory=list)
    height: int = 0
    width: int = 0


def map_phrases(phrases: list[str], class_names: list[str], embedder: PhraseEmbedder) -> tuple[np.ndarray, np.ndarray]:
    """Each phrase -> (index of its most similar class name, that similarity)."""
    if not phrases:
        return np.zeros(0, int), np.zeros(0)
    sims = embedder.similarity(phrases, class_names)   # [P, C]
    best = sims.argmax(axis=1)
    return best, sims[np.arange(len(phrases)), best]


def freeform_map(images: list[DetectionImage], class_names: list[str], embedder: PhraseEmbedder,
                 kind: str = "box") -> dict[str, float]:
    """{"map", "ap50"}: COCO mAP of phrase-mapped detections (see module doc)."""
    if kind not in ("box", "mask"):
        raise InputError(f"detections are boxes or masks, not {kind!r}")
    if not class_names:
        raise InputError("freeform mAP needs the dataset's class names")
    class_id = {name: k + 1 for k, name in enumerate(class_names)}
    coco_images, gts, dets = [], [], []
    for image_id, image in enumerate(images, start=1):
        if len(image.pred_regions) != len(image.pred_phrases) or len(image.gt_regions) != len(image.gt_classes):
            raise InputError("give one phrase per predicted region and one class per ground-truth region")
        coco_images.append({"id": image_id, "height": image.height, "width": image.width})
        for region, name in zip(image.gt_regions, image.gt_classes):
            if name not in class_id:
                raise InputError(f"ground-truth class {name!r} is not among the class names")
            gts.append(dict(_coco.region_annotation(image_id, region, kind), category_id=class_id[name]))
        best, score = map_phrases(image.pred_phrases, class_names, embedder)
        for region, k, s in zip(image.pred_regions, best, score):
            dets.append(dict(_coco.region_annotation(image_id, region, kind), category_id=int(k) + 1, score=float(s)))
    gt = _coco.build_gt(coco_images, gts, [{"id": i, "name": n} for n, i in class_id.items()])
    stats = _coco.evaluate(gt, dets, "bbox" if kind == "box" else "segm")
    return {"map": _coco.finite(stats[0]), "ap50": _coco.finite(stats[1])}
