"""On-disk form of a ``refvlm_core.sample.Sample``: one JSON object per conversation.

Record (schema version 1)::

    {
      "schema_version": 1,
      "id": "coco_000000139_rec_3",          # unique within a dataset
      "task": "rec",                        # a templates.TASKS name, or "multi"
      "tasks": ["rec"],                     # task of each exchange (multi-turn: several)
      "image": {"member": "png", "height": 480, "width": 640},   # shard member suffix
      "depth": {"member": "depth.npy"} | null,                   # [H, W] float32 metres, NaN unknown
      "system": "...",
      "visual_prompts": [VisualPrompt.to_dict(), ...],           # one per <region>, in order
      "turns": [
        {"role": "user", "text": "<image>\\nPlease locate ..."},
        {"role": "assistant", "text": "<Phrase>dog</Phrase> (<Unit>box</Unit>[0]<REF>)",
         "targets": [{"phrase": "dog", "units": ["box"],
                      "boxes": [[x0, y0, x1, y1]],            # pixels, xyxy
                      "masks": [{"size": [H, W], "counts": "..."}],   # COCO RLE
                      "keypoints": [[[x, y, v] x 17]]}]}      # pixels, v in {0, 1, 2}
      ],
      "source": {"dataset": "coco_instances", ...}           # free-form provenance
    }

Images and depth live next to the record in the same shard (``shards``), so a record
names only the member suffix. Reading validates everything and raises ``SampleError``
naming the sample id, the field and a ``reason`` (used to count skipped samples).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from refvlm_core import rle, trp
from refvlm_core.errors import InputError
from refvlm_core.sample import RefTarget, Sample, Turn
from refvlm_core.visual_prompts import VisualPrompt
from refvlm_core.visual_prompts import validate as validate_prompt

SCHEMA_VERSION = 1
BOX_TOLERANCE_PX = 1.0   # boxes may stray this far outside the image (rounding in datasets)
NUM_KEYPOINTS = 17       # COCO person keypoints

# Why a sample can be rejected on read; the loader counts skips per reason.
REASONS = ("bad_json", "schema", "unreadable_image", "unreadable_depth", "bad_rle",
           "box_outside_image", "bad_keypoints", "bad_visual_prompt", "ref_count_mismatch")


class SampleError(InputError):
    """A stored sample that cannot be used; says which sample, which field and why."""

    def __init__(self, sample_id: str, field: str, reason: str, detail: str) -> None:
        super().__init__(f"sample {sample_id!r}, field {field}: {detail} "
                         f"(fix or regenerate this sample; the loader skips it)")
        self.sample_id = sample_id
        self.field = field
        self.reason = reason


# ---------------------------------------------------------------------- writing

def _target_to_dict(target: RefTarget) -> dict[str, Any]:
    out: dict[str, Any] = {"phrase": target.phrase, "units": list(target.units)}
    if target.boxes is not None:
        out["boxes"] = np.asarray(target.boxes, dtype=np.float64).round(2).tolist()
    if target.masks is not None:
        out["masks"] = [rle.encode(np.asarray(m, dtype=bool)) for m in target.masks]
    if target.keypoints is not None:
        out["keypoints"] = np.asarray(target.keypoints, dtype=np.float64).round(2).tolist()
    return out


def sample_to_record(sample: Sample, image_member: str, depth_member: str | None = None,
                     tasks: list[str] | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample -> JSON-ready record; the image/depth arrays are stored by the caller."""
    height, width = sample.image.shape[:2]
    turns = []
    for turn in sample.turns:
        entry: dict[str, Any] = {"role": turn.role, "text": turn.text}
        if turn.targets:
            entry["targets"] = [_target_to_dict(t) for t in turn.targets]
        turns.append(entry)
    return {
        "schema_version": SCHEMA_VERSION,
        "id": sample.id,
        "task": sample.task,
        "tasks": list(tasks) if tasks else [sample.task],
        "image": {"member": image_member, "height": int(height), "width": int(width)},
        "depth": {"member": depth_member} if depth_member else None,
        "system": sample.system,
        "visual_prompts": [p.to_dict() for p in sample.visual_prompts],
        "turns": turns,
        "source": source or {},
    }


def record_to_json(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------- reading

def parse_record_json(data: bytes, key: str) -> dict[str, Any]:
    """Bytes of a ``.json`` member -> record dict (SampleError "bad_json" otherwise)."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError(key, "<json>", "bad_json", f"not valid UTF-8 JSON: {error}") from error
    if not isinstance(record, dict):
        raise SampleError(key, "<json>", "bad_json", "the record must be a JSON object")
    return record


def _require(record: dict[str, Any], sample_id: str, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record:
        raise SampleError(sample_id, name, "schema", "missing")
    value = record[name]
    if not isinstance(value, kind):
        raise SampleError(sample_id, name, "schema", f"expected {kind}, got {type(value).__name__}")
    return value


def check_header(record: dict[str, Any], sample_id: str) -> tuple[int, int]:
    """Version, id and image size of a record; returns (height, width)."""
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SampleError(sample_id, "schema_version", "schema",
                          f"is {version!r}, this reader handles {SCHEMA_VERSION}; convert the data again")
    _require(record, sample_id, "id", str)
    _require(record, sample_id, "task", str)
    image = _require(record, sample_id, "image", dict)
    height, width = image.get("height"), image.get("width")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise SampleError(sample_id, "image", "schema", f"needs positive integer height/width, got {image}")
    _require(record, sample_id, "turns", list)
    return height, width


def _boxes(value: Any, sample_id: str, field: str, height: int, width: int) -> np.ndarray:
    try:
        boxes = np.asarray(value, dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError) as error:
        raise SampleError(sample_id, field, "schema", f"boxes must be [[x0, y0, x1, y1], ...]: {error}") from error
    if not np.isfinite(boxes).all():
        raise SampleError(sample_id, field, "box_outside_image", "box has NaN or infinite coordinates")
    tol = BOX_TOLERANCE_PX
    bad = ((boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > width + tol)
           | (boxes[:, 3] > height + tol) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if bad.any():
        raise SampleError(sample_id, field, "box_outside_image",
                          f"box {boxes[bad][0].tolist()} is empty or outside the {height}x{width} image")
    return boxes


def _masks(value: Any, sample_id: str, field: str, height: int, width: int) -> np.ndarray:
    masks = []
    for i, item in enumerate(value):
        try:
            mask = rle.decode(item)
        except (InputError, TypeError, ValueError, KeyError) as error:
            raise SampleError(sample_id, f"{field}[{i}]", "bad_rle", str(error)) from error
        if mask.shape != (height, width):
            raise SampleError(sample_id, f"{field}[{i}]", "bad_rle",
                              f"mask is {mask.shape}, the image is {height}x{width}")
        masks.append(mask)
    return np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)


def _keypoints(value: Any, sample_id: str, field: str, height: int, width: int) -> np.ndarray:
    try:
        kps = np.asarray(value, dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 3)
    except (TypeError, ValueError) as error:
        raise SampleError(sample_id, field, "bad_keypoints",
                          f"keypoints must be [M, {NUM_KEYPOINTS}, 3] (x, y, v): {error}") from error
    visible = kps[..., 2] > 0
    xs, ys = kps[..., 0][visible], kps[..., 1][visible]
    tol = BOX_TOLERANCE_PX
    if ((xs < -tol) | (xs > width + tol) | (ys < -tol) | (ys > height + tol)).any():
        raise SampleError(sample_id, field, "bad_keypoints", "a labelled keypoint lies outside the image")
    if not np.isin(kps[..., 2], (0, 1, 2)).all():
        raise SampleError(sample_id, field, "bad_keypoints", "visibility must be 0, 1 or 2")
    return kps


def _target(value: Any, sample_id: str, field: str, height: int, width: int) -> RefTarget:
    if not isinstance(value, dict) or not isinstance(value.get("phrase"), str):
        raise SampleError(sample_id, field, "schema", 'a target needs "phrase" (str) and "units" (list)')
    units = value.get("units")
    if not isinstance(units, list) or not units or not all(isinstance(u, str) for u in units):
        raise SampleError(sample_id, f"{field}.units", "schema", "must be a non-empty list of unit names")
    target = RefTarget(phrase=value["phrase"], units=tuple(units))
    if "boxes" in value:
        target.boxes = _boxes(value["boxes"], sample_id, f"{field}.boxes", height, width)
    if "masks" in value:
        target.masks = _masks(value["masks"], sample_id, f"{field}.masks", height, width)
    if "keypoints" in value:
        target.keypoints = _keypoints(value["keypoints"], sample_id, f"{field}.keypoints", height, width)
    counts = {name: len(arr) for name, arr in
              (("boxes", target.boxes), ("masks", target.masks), ("keypoints", target.keypoints)) if arr is not None}
    if len(set(counts.values())) > 1:
        raise SampleError(sample_id, field, "schema", f"instance counts differ between arrays: {counts}")
    return target


def ref_counts(text: str) -> list[int]:
    """Number of <REF>s of each unit block of a TRP answer, in text order."""
    return [len(block.refs) for _, block in trp.parse(text).blocks()]


def check_ref_counts(text: str, targets: list[RefTarget], sample_id: str, field: str) -> None:
    """Raise unless block k of ``text`` has exactly ``targets[k].count`` <REF>s."""
    counts = ref_counts(text)
    wanted = [t.count for t in targets]
    if counts != wanted:
        raise SampleError(sample_id, field, "ref_count_mismatch",
                          f"the answer's unit blocks have {counts} <REF>s but the targets have {wanted} instances")


def record_to_sample(record: dict[str, Any], image: np.ndarray, depth: np.ndarray | None = None) -> Sample:
    """Validated record + decoded image (and depth) -> Sample; raises SampleError."""
    sample_id = str(record.get("id", "<no id>"))
    height, width = check_header(record, sample_id)
    if image.shape[:2] != (height, width):
        raise SampleError(sample_id, "image", "unreadable_image",
                          f"decoded image is {image.shape[:2]}, the record says {height}x{width}")
    if depth is not None and depth.shape != (height, width):
        raise SampleError(sample_id, "depth", "unreadable_depth",
                          f"depth is {depth.shape}, the image is {height}x{width}")
    turns = []
    for i, entry in enumerate(record["turns"]):
        field = f"turns[{i}]"
        if not isinstance(entry, dict) or entry.get("role") not in ("user", "assistant") \
                or not isinstance(entry.get("text"), str):
            raise SampleError(sample_id, field, "schema", 'needs "role" (user|assistant) and "text"')
        targets = [_target(t, sample_id, f"{field}.targets[{k}]", height, width)
                   for k, t in enumerate(entry.get("targets", []))]
        if entry["role"] == "assistant":
            check_ref_counts(entry["text"], targets, sample_id, field)
        turns.append(Turn(role=entry["role"], text=entry["text"], targets=targets))
    prompts = []
    for i, item in enumerate(record.get("visual_prompts") or []):
        try:
            prompt = VisualPrompt.from_dict(item)
            validate_prompt(prompt, height, width)
        except InputError as error:
            raise SampleError(sample_id, f"visual_prompts[{i}]", "bad_visual_prompt", str(error)) from error
        prompts.append(prompt)
    regions = sum(t.text.count("<region>") for t in turns if t.role == "user")
    if regions != len(prompts):
        raise SampleError(sample_id, "visual_prompts", "schema",
                          f"{len(prompts)} visual prompts for {regions} <region> placeholders")
    return Sample(id=sample_id, image=image, turns=turns, task=record["task"], visual_prompts=prompts,
                  depth=depth, system=record.get("system"))
