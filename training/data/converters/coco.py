"""COCO 2017 instances, person keypoints and captions.

Layout (cocodataset.org, "2017 Train/Val annotations")::

    root/annotations/instances_<split>.json
    root/annotations/person_keypoints_<split>.json
    root/annotations/captions_<split>.json
    root/<split>/<file_name>                 # e.g. val2017/000000000139.jpg

Boxes are ``[x, y, w, h]`` pixels; ``segmentation`` is polygons, or RLE when ``iscrowd``
(crowd regions are skipped: they are not one instance); keypoints are 17 x (x, y, v).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, load_json, read_image
from refvlm_training.data.tasks import ImageAnnotations, ObjectAnnotation

INSTANCE_TASKS = ("rec", "res", "reg_point", "reg_box", "reg_scribble", "reg_mask",
                  "ig_point_box", "ig_point_mask", "ig_box_box", "ig_box_mask", "ig_scribble_box",
                  "ig_scribble_mask", "ig_mask_box", "ig_mask_mask", "gcg_box", "gcg_mask",
                  "ovd", "freeform_ovd", "ovs", "freeform_ovs")
_FILES = {"coco_instances": "instances", "coco_keypoints": "person_keypoints", "coco_captions": "captions"}
_TASKS = {"coco_instances": INSTANCE_TASKS, "coco_keypoints": ("keypoint",), "coco_captions": ("caption",)}


def xywh_to_xyxy(box: list[float], height: int, width: int) -> np.ndarray | None:
    """COCO [x, y, w, h] -> [4] xyxy clipped to the image; None when empty."""
    x, y, w, h = (float(v) for v in box)
    xyxy = np.array([max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)], dtype=np.float32)
    return xyxy if xyxy[2] > xyxy[0] and xyxy[3] > xyxy[1] else None


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray | None:
    """COCO polygons or RLE -> [H, W] bool (None when empty or malformed)."""
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        mask = mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return mask if mask.any() else None


def _objects(anns: list[dict], names: dict[int, str], height: int, width: int, keypoints: bool) -> list[ObjectAnnotation]:
    objects = []
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        box = xywh_to_xyxy(ann.get("bbox", [0, 0, 0, 0]), height, width)
        if box is None:
            continue
        obj = ObjectAnnotation(name=names.get(ann.get("category_id"), "object"), box=box)
        if keypoints:
            kps = np.asarray(ann.get("keypoints", []), dtype=np.float32)
            if kps.size != 51 or ann.get("num_keypoints", 0) == 0:
                continue
            kps = kps.reshape(17, 3)
            kps[kps[:, 2] == 0, :2] = 0  # unlabelled keypoints carry no position
            obj.keypoints = kps
        else:
            obj.mask = segmentation_mask(ann.get("segmentation"), height, width)
        objects.append(obj)
    return objects


def open_dataset(name: str, root: Path, split: str = "val2017", images: str | None = None,
                 limit: int | None = None) -> tuple[tuple[str, ...], Iterator, int]:
    data = load_json(root / "annotations" / f"{_FILES[name]}_{split}.json", f"COCO {_FILES[name]} json")
    image_dir = Path(images) if images else root / split
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    infos = data.get("images", [])
    total = len(infos) if limit is None else min(limit, len(infos))
    return _TASKS[name], iter_limit(_items(name, infos, by_image, names, image_dir), limit), total


def _items(name, infos, by_image, names, image_dir: Path) -> Iterator[ImageItem | Skipped]:
    for info in infos:
        path = image_dir / info["file_name"]
        image = read_image(path)
        if image is None:
            yield Skipped(str(path.name), "unreadable_image")
            continue
        height, width = image.shape[:2]
        if (height, width) != (info.get("height", height), info.get("width", width)):
            yield Skipped(str(path.name), "image_size_mismatch")
            continue
        anns = by_image.get(info["id"], [])
        ann = ImageAnnotations(image_id=f"{name}_{info['id']}", image=image)
        if name == "coco_captions":
            ann.captions = [a["caption"].strip() for a in anns if a.get("caption", "").strip()]
        else:
            ann.objects = _objects(anns, names, height, width, keypoints=name == "coco_keypoints")
        yield ImageItem(ann, path)
