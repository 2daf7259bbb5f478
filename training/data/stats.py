"""Counts over a shard directory: samples per task, targets per unit, turns, instances
per target, image sizes; printed as text histograms (`refvlm data stats DIR`)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from refvlm_training.data.schema import SampleError
from refvlm_training.data.shards import iter_shard, list_shards, parse_record_json

BAR_WIDTH = 40


@dataclass
class DataStats:
    samples: int = 0
    shards: int = 0
    tasks: Counter = field(default_factory=Counter)
    units: Counter = field(default_factory=Counter)           # targets per unit name
    turns: Counter = field(default_factory=Counter)           # user turns per sample
    instances: Counter = field(default_factory=Counter)       # instances per target
    visual_prompts: Counter = field(default_factory=Counter)  # prompts per kind
    image_sizes: Counter = field(default_factory=Counter)     # "WxH"
    unreadable: Counter = field(default_factory=Counter)      # records that are not JSON


def collect(path: str | os.PathLike) -> DataStats:
    """Read only the JSON records (no image decoding): fast on large datasets."""
    stats = DataStats()
    for shard in list_shards(path):
        stats.shards += 1
        for entry, files in iter_shard(shard):
            try:
                record = parse_record_json(files.get("json", b""), entry.key)
            except SampleError as error:
                stats.unreadable[error.reason] += 1
                continue
            _add(stats, record)
    return stats


def _add(stats: DataStats, record: dict) -> None:
    stats.samples += 1
    stats.tasks[record.get("task", "?")] += 1
    turns = record.get("turns", [])
    stats.turns[sum(1 for t in turns if t.get("role") == "user")] += 1
    for turn in turns:
        for target in turn.get("targets", []):
            for unit in target.get("units", []):
                stats.units[unit] += 1
            arrays = [target.get(k) for k in ("boxes", "masks", "keypoints") if target.get(k) is not None]
            stats.instances[len(arrays[0]) if arrays else 1] += 1
    for prompt in record.get("visual_prompts", []):
        stats.visual_prompts[prompt.get("kind", "?")] += 1
    image = record.get("image", {})
    stats.image_sizes[f"{image.get('width')}x{image.get('height')}"] += 1


def histogram(title: str, counts: Counter, numeric: bool = False) -> str:
    """A text histogram, one bar per key, scaled to the largest count."""
    if not counts:
        return f"{title}: none"
    keys = sorted(counts) if numeric else sorted(counts, key=lambda k: (-counts[k], str(k)))
    peak = max(counts.values())
    lines = [f"{title}:"]
    for key in keys:
        bar = "#" * max(1, round(BAR_WIDTH * counts[key] / peak))
        lines.append(f"  {str(key):<18} {counts[key]:>8}  {bar}")
    return "\n".join(lines)


def to_text(stats: DataStats) -> str:
    parts = [f"{stats.samples} samples in {stats.shards} shard(s)",
             histogram("tasks", stats.tasks),
             histogram("targets per unit", stats.units),
             histogram("user turns per sample", stats.turns, numeric=True),
             histogram("instances per target", stats.instances, numeric=True),
             histogram("visual prompts", stats.visual_prompts),
             histogram("image sizes", stats.image_sizes)]
    if stats.unreadable:
        parts.append(histogram("unreadable records", stats.unreadable))
    return "\n\n".join(parts)
