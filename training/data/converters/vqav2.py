"""VQAv2 open-ended questions with their annotations.

Layout (visualqa.org, "Balanced Real Images")::

    root/v2_OpenEnded_mscoco_<split>_questions.json   # {"questions": [{"image_id", "question", "question_id"}]}
    root/v2_mscoco_<split>_annotations.json           # {"annotations": [{"question_id", "image_id",
                                                      #   "multiple_choice_answer", "answers": [...]}]}
    root/<split>/COCO_<split>_<image_id:012d>.jpg     # COCO 2014 images (or --images DIR)
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterator

from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, load_json, read_image
from refvlm_training.data.tasks import ImageAnnotations

TASKS = ("vqa",)


def open_dataset(name: str, root: Path, split: str = "val2014", images: str | None = None,
                 limit: int | None = None) -> tuple[tuple[str, ...], Iterator, int]:
    questions = load_json(root / f"v2_OpenEnded_mscoco_{split}_questions.json", "VQAv2 questions json")
    annotations = load_json(root / f"v2_mscoco_{split}_annotations.json", "VQAv2 annotations json")
    answers = {a["question_id"]: a.get("multiple_choice_answer", "") for a in annotations.get("annotations", [])}
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q in questions.get("questions", []):
        answer = answers.get(q["question_id"], "")
        if answer:
            by_image[q["image_id"]].append((q["question"], answer))
    image_dir = Path(images) if images else root / split
    total = len(by_image) if limit is None else min(limit, len(by_image))
    return TASKS, iter_limit(_items(by_image, image_dir, split), limit), total


def _items(by_image, image_dir: Path, split: str) -> Iterator[ImageItem | Skipped]:
    for image_id, qa in sorted(by_image.items()):
        path = image_dir / f"COCO_{split}_{image_id:012d}.jpg"
        image = read_image(path)
        if image is None:
            yield Skipped(path.name, "unreadable_image")
            continue
        yield ImageItem(ImageAnnotations(image_id=f"vqav2_{image_id}", image=image, qa=qa), path)
