"""Flickr30k Entities: captions whose phrases are linked to boxes.

Layout (github.com/BryanPlummer/flickr30k_entities, annotations.zip)::

    root/Sentences/<image_id>.txt      # 5 lines: "[/EN#18/people A man] with [/EN#19/clothing glasses] ..."
    root/Annotations/<image_id>.xml    # PASCAL-VOC style: <size>, and per box an <object>
                                       # whose <name>s are entity ids, <bndbox> 1-based pixels
    root/flickr30k-images/<image_id>.jpg   (or --images DIR)

Entities without boxes (``<nobndbox>``, ``notvisual``) stay plain text in the caption.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, need_dir, read_image
from refvlm_training.data.tasks import GroundedCaption, ImageAnnotations, ObjectAnnotation

TASKS = ("caption", "gcg_box", "rec")
_ENTITY = re.compile(r"\[/EN#(\d+)/([^\s\]]+)\s([^\]]*)\]")


def parse_sentence(line: str) -> tuple[str, list[tuple[int, int, str]]]:
    """Annotated sentence -> plain text and (start, end, entity id) of each phrase."""
    text, spans, cursor = [], [], 0
    length = 0
    for match in _ENTITY.finditer(line):
        before = line[cursor:match.start()]
        text.append(before)
        length += len(before)
        phrase = match.group(3).strip()
        spans.append((length, length + len(phrase), match.group(1)))
        text.append(phrase)
        length += len(phrase)
        cursor = match.end()
    text.append(line[cursor:])
    return "".join(text).strip(), spans


def parse_boxes(xml_path: Path) -> tuple[dict[str, list[np.ndarray]], tuple[int, int] | None]:
    """Entity id -> its boxes (xyxy pixels), and the (height, width) in the file."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    hw = (int(size.findtext("height")), int(size.findtext("width"))) if size is not None else None
    boxes: dict[str, list[np.ndarray]] = defaultdict(list)
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        xyxy = np.array([float(box.findtext("xmin")) - 1, float(box.findtext("ymin")) - 1,
                         float(box.findtext("xmax")), float(box.findtext("ymax"))], dtype=np.float32)
        for name in obj.iter("name"):
            boxes[name.text.strip()].append(xyxy)
    return boxes, hw


def open_dataset(name: str, root: Path, images: str | None = None, limit: int | None = None,
                 split: str | None = None) -> tuple[tuple[str, ...], Iterator, int]:
    sentences = sorted(need_dir(root / "Sentences", "Sentences/").glob("*.txt"))
    need_dir(root / "Annotations", "Annotations/")
    if split:  # a file listing image ids, e.g. train.txt of the release
        wanted = set((root / f"{split}.txt").read_text().split())
        sentences = [p for p in sentences if p.stem in wanted]
    image_dir = Path(images) if images else root / "flickr30k-images"
    total = len(sentences) if limit is None else min(limit, len(sentences))
    return TASKS, iter_limit(_items(root, sentences, image_dir), limit), total


def _items(root: Path, sentence_files: list[Path], image_dir: Path) -> Iterator[ImageItem | Skipped]:
    for sentence_file in sentence_files:
        image_id = sentence_file.stem
        path = image_dir / f"{image_id}.jpg"
        image = read_image(path)
        xml_path = root / "Annotations" / f"{image_id}.xml"
        if image is None:
            yield Skipped(path.name, "unreadable_image")
            continue
        if not xml_path.is_file():
            yield Skipped(image_id, "missing_annotation_xml")
            continue
        boxes, hw = parse_boxes(xml_path)
        height, width = image.shape[:2]
        objects: list[ObjectAnnotation] = []
        entity_objects: dict[str, list[int]] = {}
        captions, grounded = [], []
        for line in sentence_file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            text, spans = parse_sentence(line)
            captions.append(text)
            linked = []
            for start, end, entity in spans:
                if entity not in boxes:
                    continue
                if entity not in entity_objects:
                    clipped = [np.clip(b, 0, [width, height, width, height]) for b in boxes[entity]]
                    entity_objects[entity] = list(range(len(objects), len(objects) + len(clipped)))
                    phrase = text[start:end]
                    single = len(clipped) == 1
                    objects += [ObjectAnnotation(name=phrase, box=b, expressions=[phrase] if single else [])
                                for b in clipped]
                linked.append((start, end, entity_objects[entity]))
            if linked:
                grounded.append(GroundedCaption(text, linked))
        ann = ImageAnnotations(image_id=f"flickr30k_{image_id}", image=image, objects=objects,
                               captions=captions, grounded_captions=grounded)
        yield ImageItem(ann, path)
