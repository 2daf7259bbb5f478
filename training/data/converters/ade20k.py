"""ADE20K, the MIT Scene Parsing release (ADEChallengeData2016).

Layout (sceneparsing.csail.mit.edu)::

    root/images/<training|validation>/ADE_train_00000001.jpg
    root/annotations/<training|validation>/ADE_train_00000001.png   # uint8 class index per pixel,
                                                                    # 0 = other, 1..150
    root/objectInfo150.csv     # Idx,Ratio,Train,Val,Name   ("wall", "building;edifice", ...)
    root/sceneCategories.txt   # "ADE_train_00000001 airport_terminal" (optional)

Labels are semantic (one region per class, not instances): each class present becomes
one object whose mask is its region, named by the first synonym of its Name.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from refvlm_core.errors import InputError

from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, need_dir, need_file, read_image
from refvlm_training.data.tasks import ImageAnnotations, ObjectAnnotation

TASKS = ("res", "reg_mask", "ig_point_mask", "ig_scribble_mask", "ovs", "freeform_ovs", "gcg_mask")
MIN_AREA_FRACTION = 0.001   # smaller class regions are label noise at this resolution


def read_class_names(path: Path) -> dict[int, str]:
    names = {}
    with open(need_file(path, "objectInfo150.csv"), newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                names[int(row["Idx"])] = row["Name"].split(";")[0].strip()
            except (KeyError, ValueError) as error:
                raise InputError(f"{path}: expected columns Idx,Ratio,Train,Val,Name ({error})") from error
    return names


def open_dataset(name: str, root: Path, split: str = "validation", limit: int | None = None,
                 images: str | None = None) -> tuple[tuple[str, ...], Iterator, int]:
    names = read_class_names(root / "objectInfo150.csv")
    image_dir = Path(images) if images else need_dir(root / "images" / split, f"images/{split}")
    label_dir = need_dir(root / "annotations" / split, f"annotations/{split}")
    files = sorted(image_dir.glob("*.jpg"))
    total = len(files) if limit is None else min(limit, len(files))
    return TASKS, iter_limit(_items(files, label_dir, names), limit), total


def _items(files: list[Path], label_dir: Path, names: dict[int, str]) -> Iterator[ImageItem | Skipped]:
    for path in files:
        image = read_image(path)
        labels = cv2.imread(str(label_dir / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        if image is None:
            yield Skipped(path.name, "unreadable_image")
            continue
        if labels is None or labels.ndim != 2 or labels.shape != image.shape[:2]:
            yield Skipped(path.name, "bad_label_png")
            continue
        min_area = MIN_AREA_FRACTION * labels.size
        objects = []
        for index in np.unique(labels):
            mask = labels == index
            if index == 0 or int(index) not in names or mask.sum() < min_area:
                continue
            objects.append(ObjectAnnotation(name=names[int(index)], mask=mask))
        yield ImageItem(ImageAnnotations(image_id=f"ade20k_{path.stem}", image=image, objects=objects), path)
