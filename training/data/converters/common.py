"""Shared driver of the dataset converters: annotations -> samples -> shards, with a
progress bar and a summary (samples per task, skipped items with reasons)."""
from __future__ import annotations

import importlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from refvlm_core.errors import InputError
from refvlm_core.sample import Sample

from refvlm_training.data.shards import ShardWriter, decode_image
from refvlm_training.data.tasks import ImageAnnotations, build_samples

log = logging.getLogger(__name__)


@dataclass
class ImageItem:
    """One image's annotations, its original file (stored as is) or ready samples."""

    annotations: ImageAnnotations
    image_file: Path | None = None
    samples: list[Sample] | None = None    # set by converters that build samples themselves


@dataclass
class Skipped:
    item_id: str
    reason: str


@dataclass
class ConvertSummary:
    dataset: str
    out_dir: str
    samples: int = 0
    shards: int = 0
    per_task: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def to_text(self) -> str:
        lines = [f"{self.dataset}: {self.samples} samples in {self.shards} shard(s) under {self.out_dir}"]
        lines += [f"  {task:<18} {count}" for task, count in sorted(self.per_task.items())]
        if self.skipped:
            lines.append("skipped:")
            lines += [f"  {reason:<18} {count}" for reason, count in sorted(self.skipped.items())]
        return "\n".join(lines)


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{what} not found at {path}: point --root at the dataset's folder "
                         "(see tests/fixtures/datasets/README.md for each layout)")
    return path


def need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{what} not found at {path}: point --root at the dataset's folder "
                         "(see tests/fixtures/datasets/README.md for each layout)")
    return path


def load_json(path: Path, what: str) -> Any:
    need_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{what} at {path} is not valid JSON: {error}") from error


def read_image(path: Path) -> np.ndarray | None:
    """[H, W, 3] uint8 RGB, or None when missing or unreadable."""
    try:
        return decode_image(path.read_bytes())
    except OSError:
        return None


def _image_suffix(path: Path) -> str | None:
    suffix = path.suffix.lower().lstrip(".")
    return suffix if suffix in ("png", "jpg", "jpeg") else None


def write_items(items: Iterable[ImageItem | Skipped], summary: ConvertSummary, writer: ShardWriter,
                tasks: tuple[str, ...], rng: random.Random, max_per_task: int | None,
                conversations: int) -> None:
    for item in items:
        if isinstance(item, Skipped):
            summary.skipped[item.reason] += 1
            log.warning("skipping %s: %s", item.item_id, item.reason)
            continue
        samples = item.samples if item.samples is not None else build_samples(
            item.annotations, rng, tasks, max_per_task=max_per_task, conversations=conversations)
        suffix = _image_suffix(item.image_file) if item.image_file else None
        image_bytes = item.image_file.read_bytes() if suffix else None
        if not samples:
            summary.skipped["no_usable_annotation"] += 1
        for sample in samples:
            writer.write(sample, image_bytes=image_bytes, image_suffix=suffix or "png",
                         source={"dataset": summary.dataset, "image_id": item.annotations.image_id})
            summary.per_task[sample.task] += 1
            summary.samples += 1


def convert(name: str, root: str | Path, out_dir: str | Path, *, seed: int = 0, max_per_task: int | None = 4,
            conversations: int = 1, max_samples_per_shard: int = 1000, progress: bool = True,
            **options: Any) -> ConvertSummary:
    """Convert dataset ``name`` found under ``root`` into shards under ``out_dir``."""
    from tqdm import tqdm

    from refvlm_training.data.converters import CONVERTERS
    if name not in CONVERTERS:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(CONVERTERS)}")
    module = importlib.import_module(CONVERTERS[name])
    root = need_dir(Path(root), f"the {name} root folder")
    tasks, items, total = module.open_dataset(name, root, **options)
    summary = ConvertSummary(dataset=name, out_dir=str(out_dir))
    bar = tqdm(items, total=total, desc=f"convert {name}", unit="image", disable=not progress)
    prefix = name.replace("+", "plus")
    with ShardWriter(out_dir, prefix, max_samples_per_shard) as writer:
        write_items(bar, summary, writer, tasks, random.Random(seed), max_per_task, conversations)
        summary.shards = len(writer.close())
    return summary


def iter_limit(items: Iterator, limit: int | None) -> Iterator:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item
