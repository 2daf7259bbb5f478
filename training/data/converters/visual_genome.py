"""Visual Genome region descriptions.

Layout (visualgenome.org, version 1.2)::

    root/region_descriptions.json   # [{"id": image_id, "regions": [{"region_id", "image_id",
                                    #   "phrase", "x", "y", "width", "height"}, ...]}, ...]
    root/image_data.json            # [{"image_id", "width", "height", "url", ...}, ...]
    root/VG_100K/<image_id>.jpg     # or VG_100K_2/ (both are searched), or --images DIR
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, load_json, read_image
from refvlm_training.data.tasks import ImageAnnotations, ObjectAnnotation

TASKS = ("rec", "reg_point", "reg_box", "reg_scribble")
MIN_SIDE_PX = 2.0


def open_dataset(name: str, root: Path, images: str | None = None, limit: int | None = None,
                 max_regions: int = 20) -> tuple[tuple[str, ...], Iterator, int]:
    regions = load_json(root / "region_descriptions.json", "region_descriptions.json")
    image_data = load_json(root / "image_data.json", "image_data.json") if (root / "image_data.json").is_file() else []
    sizes = {d.get("image_id", d.get("id")): (d.get("height"), d.get("width")) for d in image_data}
    dirs = [Path(images)] if images else [root / "VG_100K", root / "VG_100K_2"]
    total = len(regions) if limit is None else min(limit, len(regions))
    return TASKS, iter_limit(_items(regions, sizes, dirs, max_regions), limit), total


def _find(dirs: list[Path], image_id: int) -> Path:
    for folder in dirs:
        path = folder / f"{image_id}.jpg"
        if path.is_file():
            return path
    return dirs[0] / f"{image_id}.jpg"


def _items(regions, sizes, dirs, max_regions: int) -> Iterator[ImageItem | Skipped]:
    for entry in regions:
        image_id = entry.get("id", entry.get("image_id"))
        path = _find(dirs, image_id)
        image = read_image(path)
        if image is None:
            yield Skipped(path.name, "unreadable_image")
            continue
        height, width = image.shape[:2]
        if sizes.get(image_id, (height, width)) != (height, width):
            yield Skipped(path.name, "image_size_mismatch")
            continue
        objects = []
        for region in entry.get("regions", [])[:max_regions]:
            phrase = " ".join(str(region.get("phrase", "")).split())
            x, y, w, h = (float(region.get(k, 0)) for k in ("x", "y", "width", "height"))
            box = np.array([max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)], dtype=np.float32)
            if phrase and box[2] - box[0] >= MIN_SIDE_PX and box[3] - box[1] >= MIN_SIDE_PX:
                objects.append(ObjectAnnotation(name=phrase, box=box, expressions=[phrase], description=phrase))
        yield ImageItem(ImageAnnotations(image_id=f"vg_{image_id}", image=image, objects=objects), path)
