"""RefCOCO, RefCOCO+ and RefCOCOg in the layout of the ``refer`` toolkit.

Layout (github.com/lichengunc/refer, ``data/<dataset>/``)::

    root/refs(unc).p        # refcoco, refcoco+ ; refcocog: refs(umd).p or refs(google).p
    root/instances.json     # COCO-format images, annotations (boxes, polygons), categories
    root/images/<file_name> # COCO train2014 images (or --images DIR)

``refs(*).p`` is a Python pickle of a list of dicts: ref_id, ann_id, image_id, split,
category_id and ``sentences`` (each with ``sent``). It is read with an unpickler that
only accepts plain containers, so a tampered file cannot run code.
"""
from __future__ import annotations

import io
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from refvlm_core.errors import InputError

from refvlm_training.data.converters.coco import segmentation_mask, xywh_to_xyxy
from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, load_json, read_image
from refvlm_training.data.tasks import ImageAnnotations, ObjectAnnotation

TASKS = ("rec", "res", "reg_point", "reg_box", "reg_scribble", "reg_mask")
_PREFERRED_SPLITS = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google")}


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every class: the refs file holds only lists, dicts, strings and numbers."""

    def find_class(self, module: str, name: str):  # noqa: D401
        raise pickle.UnpicklingError(f"refs pickle refers to {module}.{name}; only plain data is allowed")


def load_refs(path: Path) -> list[dict]:
    try:
        refs = _PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise InputError(f"{path} is not a refer-toolkit refs pickle: {error}") from error
    if not isinstance(refs, list):
        raise InputError(f"{path} should hold a list of refs, got {type(refs).__name__}")
    return refs


def _refs_file(name: str, root: Path) -> Path:
    for split_by in _PREFERRED_SPLITS[name]:
        path = root / f"refs({split_by}).p"
        if path.is_file():
            return path
    found = sorted(root.glob("refs(*).p"))
    if not found:
        raise InputError(f"no refs(*).p under {root}: point --root at data/{name}/ of the refer layout")
    return found[0]


def open_dataset(name: str, root: Path, split: str | None = None, images: str | None = None,
                 limit: int | None = None) -> tuple[tuple[str, ...], Iterator, int]:
    refs = load_refs(_refs_file(name, root))
    if split:
        refs = [r for r in refs if r.get("split") == split]
    instances = load_json(root / "instances.json", "instances.json")
    anns = {a["id"]: a for a in instances.get("annotations", [])}
    infos = {i["id"]: i for i in instances.get("images", [])}
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ref in refs:
        by_image[ref["image_id"]].append(ref)
    image_dir = Path(images) if images else root / "images"
    total = len(by_image) if limit is None else min(limit, len(by_image))
    items = _items(name, by_image, anns, infos, names, image_dir)
    return TASKS, iter_limit(items, limit), total


def _items(name, by_image, anns, infos, names, image_dir: Path) -> Iterator[ImageItem | Skipped]:
    tag = name.replace("+", "plus")
    for image_id, refs in sorted(by_image.items()):
        info = infos.get(image_id)
        if info is None:
            yield Skipped(f"{tag}_image_{image_id}", "image_not_in_instances")
            continue
        path = image_dir / info["file_name"]
        image = read_image(path)
        if image is None:
            yield Skipped(path.name, "unreadable_image")
            continue
        height, width = image.shape[:2]
        objects = []
        for ref in refs:
            ann = anns.get(ref.get("ann_id"))
            box = xywh_to_xyxy(ann["bbox"], height, width) if ann else None
            sentences = [s.get("sent", "").strip() for s in ref.get("sentences", [])]
            sentences = [s for s in sentences if s]
            if box is None or not sentences:
                continue
            objects.append(ObjectAnnotation(
                name=names.get(ref.get("category_id"), "object"), box=box,
                mask=segmentation_mask(ann.get("segmentation"), height, width),
                expressions=sentences, description=sentences[0]))
        yield ImageItem(ImageAnnotations(image_id=f"{tag}_{image_id}", image=image, objects=objects), path)
