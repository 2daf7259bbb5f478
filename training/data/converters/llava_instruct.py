"""LLaVA-Instruct-150K conversations (plain-text answers, several turns per image).

Layout (huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K)::

    root/llava_instruct_150k.json   # [{"id", "image": "000000033471.jpg",
                                    #   "conversations": [{"from": "human"|"gpt", "value": ...}]}]
    root/images/<image>             # COCO train2017 images (or --images DIR)

The ``<image>`` marker inside the first human turn is moved to the front, where every
VT-Instruct sample has it; other tag-like text is neutralised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from refvlm_core import trp
from refvlm_core.sample import Sample, Turn

from refvlm_training.data import templates
from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, load_json, read_image
from refvlm_training.data.tasks import ImageAnnotations

TASKS = ("vqa",)
_ROLES = {"human": "user", "gpt": "assistant"}


def open_dataset(name: str, root: Path, file: str = "llava_instruct_150k.json", images: str | None = None,
                 limit: int | None = None) -> tuple[tuple[str, ...], Iterator, int]:
    records = load_json(root / file, file)
    image_dir = Path(images) if images else root / "images"
    total = len(records) if limit is None else min(limit, len(records))
    return TASKS, iter_limit(_items(records, image_dir), limit), total


def conversation_turns(conversations: list[dict]) -> list[Turn] | None:
    """LLaVA turns -> our turns (user first, alternating); None when malformed."""
    turns = []
    for i, message in enumerate(conversations):
        role = _ROLES.get(message.get("from"))
        text = str(message.get("value", "")).replace(trp.IMAGE, "").strip()
        if role != ("user" if i % 2 == 0 else "assistant") or not text:
            return None
        turns.append(Turn(role, trp.neutralize(text)))
    if len(turns) < 2 or len(turns) % 2:
        return None
    turns[0].text = f"{templates.IMAGE_TOKEN}\n{turns[0].text}"
    return turns


def _items(records, image_dir: Path) -> Iterator[ImageItem | Skipped]:
    for record in records:
        record_id = str(record.get("id", ""))
        path = image_dir / str(record.get("image", ""))
        image = read_image(path)
        if image is None:
            yield Skipped(path.name or record_id, "unreadable_image")
            continue
        turns = conversation_turns(record.get("conversations", []))
        if turns is None:
            yield Skipped(record_id, "malformed_conversation")
            continue
        sample = Sample(id=f"llava_{record_id}", image=image, turns=turns, task="vqa",
                        system=templates.MULTI_TASK_SYSTEM)
        yield ImageItem(ImageAnnotations(image_id=f"llava_{record_id}", image=image), path, samples=[sample])
