"""Evaluation runner: a Predictor over an evaluation set of Samples for one task.

Each sample's first exchange is evaluated: the task's fixed evaluation prompt (never
seen in training, ``templates.eval_prompt``) with the slots taken from the sample's
ground truth (the referring phrase, the category list, the question), the sample's
visual prompts, and its answer's RefTargets as ground truth. Multi-task conversations
are skipped. Captions are evaluated once per image against all of that image's
captions (COCO-style references).

Evaluation tasks and the sample tasks they read:

    caption  caption            vqa / pope  vqa (pope: yes/no questions only)
    rec      rec                res         res
    reg      reg_{point,box,scribble,mask}  (CIDEr, METEOR, BLEU-4 of region captions)
    ig       ig_{kind}_{box,mask}           (mIoU, cIoU per prompt type)
    gcg      gcg_mask           gcg_box     gcg_box
    ovd, ovs, freeform_ovd, freeform_ovs    (mAP_S: phrases mapped to the set's classes)
    keypoint keypoint           depth       depth

Every report also has ``valid_trp`` (fraction of answers that parse as TRP).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from refvlm_core import trp
from refvlm_core.errors import InputError
from refvlm_core.results import Result
from refvlm_core.sample import Sample
from refvlm_core.visual_prompts import PROMPT_KINDS, VisualPrompt

_REG = tuple(f"reg_{kind}" for kind in PROMPT_KINDS)
_IG = tuple(f"ig_{kind}_{unit}" for kind in PROMPT_KINDS for unit in ("box", "mask"))

# evaluation task -> sample tasks it reads
EVAL_TASKS: dict[str, tuple[str, ...]] = {
    "caption": ("caption",), "vqa": ("vqa",), "pope": ("vqa",), "rec": ("rec",), "res": ("res",),
    "reg": _REG, "ig": _IG, "gcg": ("gcg_mask",), "gcg_box": ("gcg_box",),
    "ovd": ("ovd",), "ovs": ("ovs",), "freeform_ovd": ("freeform_ovd",), "freeform_ovs": ("freeform_ovs",),
    "keypoint": ("keypoint",), "depth": ("depth",),
}


def check_eval_task(task: str) -> str:
    if task not in EVAL_TASKS:
        raise InputError(f"unknown evaluation task {task!r}; choose one of {', '.join(EVAL_TASKS)}")
    return task


# ---------------------------------------------------------------- evaluation items

@dataclass
class EvalItem:
    """One model call: the prompt, its visual prompts and the ground truth."""

    sample: Sample
    prompt: str
    visual_prompts: list[VisualPrompt]
    references: list[str] = field(default_factory=list)   # caption-like tasks: reference texts

    @property
    def answer(self):
        """The evaluated assistant turn (text + RefTargets)."""
        return self.sample.turns[1]


def image_key(sample: Sample) -> str:
    """"<image_id>_<task>_<k>" -> "<image_id>" (the whole id when it has no such suffix)."""
    head, sep, _ = sample.id.rpartition(f"_{sample.task}_")
    return head if sep else sample.id


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _question(user_text: str) -> str:
    """The user turn without the image placeholder: the question as the sample asks it."""
    return user_text.replace(trp.IMAGE, " ").strip()


def eval_slots(sample: Sample) -> dict[str, str]:
    """The evaluation template's slots, from the sample's ground truth."""
    targets = sample.turns[1].targets
    if sample.task in ("rec", "res"):
        return {"phrase": targets[0].phrase}
    if sample.task == "keypoint":
        target = targets[0]
        return {"phrase": f"every {target.phrase}" if target.count > 1 else f"the {target.phrase}"}
    if sample.task in ("ovd", "ovs"):
        return {"categories": _join_names([t.phrase for t in targets])}
    if sample.task == "vqa":
        return {"question": _question(sample.turns[0].text)}
    return {}


REFERRING_TASKS = ("rec", "res", "keypoint", "ovd", "ovs")


def _usable(sample: Sample, sample_tasks: tuple[str, ...]) -> bool:
    turns = sample.turns
    return (sample.task in sample_tasks and len(turns) >= 2 and turns[0].role == "user"
            and turns[1].role == "assistant"
            and (bool(turns[1].targets) or sample.task not in REFERRING_TASKS))  # "nothing matches" has no box


def _is_yes_no(sample: Sample) -> bool:
    return sample.turns[1].text.strip().lower().rstrip(".!") in ("yes", "no")


def eval_items(samples: Iterable[Sample], task: str, limit: int | None = None) -> list[EvalItem]:
    """The items of ``task`` among ``samples`` (at most ``limit``); captions grouped per image."""
    from refvlm_training.data.templates import eval_prompt

    sample_tasks = EVAL_TASKS[check_eval_task(task)]
    items: list[EvalItem] = []
    by_image: dict[str, EvalItem] = {}
    for sample in samples:
        if not _usable(sample, sample_tasks) or (task == "pope" and not _is_yes_no(sample)):
            continue
        text = sample.turns[1].text
        if task == "caption":
            key = image_key(sample)
            if key in by_image:
                by_image[key].references.append(trp.plain_text(text))
                continue
        if limit is not None and len(items) >= limit:
            if task == "caption":
                continue  # later captions of images already chosen still become references
            break
        regions = sample.turns[0].text.count(trp.REGION)
        item = EvalItem(sample, eval_prompt(sample.task, **eval_slots(sample)),
                        list(sample.visual_prompts[:regions]), [trp.plain_text(text)])
        items.append(item)
        if task == "caption":
            by_image[image_key(sample)] = item
    return items


# ---------------------------------------------------------------- predictions

def predict_all(predictor, items: Sequence[EvalItem], progress: bool = True) -> list[Result]:
    """One ``predictor.predict`` per item, in order, with a tqdm bar."""
    from tqdm import tqdm

    bar = tqdm(items, desc="eval", unit="sample", disable=not progress)
    return [predictor.predict(item.sample.image, item.prompt, item.visual_prompts,
                              system=item.sample.system) for item in bar]


def _first(result: Result, attribute: str):
    """The first referred object's box/mask/keypoints/depth that the answer produced."""
    for obj in result.objects:
        value = getattr(obj, attribute)
        if value is not None:
            return value
    return None


_UNIT_FIELD = {"box": "box_xyxy", "mask": "mask", "keypoint": "keypoints", "depth": "depth"}


# ---------------------------------------------------------------- metrics per task

def compute_metrics(task: str, items: Sequence[EvalItem], results: Sequence[Result],
                    embedder=None) -> dict[str, float]:
    """The task's metrics (see the module doc) plus ``valid_trp``."""
    from .metrics.trp_validity import valid_trp_rate

    if len(items) != len(results):
        raise InputError(f"{len(items)} evaluation items but {len(results)} results")
    metrics = _TASK_METRICS[check_eval_task(task)](task, items, results, embedder)
    metrics["valid_trp"] = valid_trp_rate([r.trp_text for r in results])
    return metrics


def _text_metrics(task, items, results, embedder) -> dict[str, float]:
    from .metrics.caption import caption_metrics

    ids = [item.sample.id for item in items]
    return caption_metrics({i: r.answer for i, r in zip(ids, results)},
                           {i: item.references for i, item in zip(ids, items)})


def _vqa(task, items, results, embedder) -> dict[str, float]:
    from .metrics.vqa import vqa_metrics

    return vqa_metrics([r.answer for r in results], [[item.answer.text] for item in items])


def _pope(task, items, results, embedder) -> dict[str, float]:
    from .metrics.pope import pope_metrics

    return pope_metrics([r.answer for r in results], [item.answer.text for item in items])


def _rec(task, items, results, embedder) -> dict[str, float]:
    from refvlm_simworld.language import expression_kind

    from .metrics.grounding import rec_metrics

    return rec_metrics([_first(r, "box_xyxy") for r in results], [i.answer.targets[0].boxes[0] for i in items],
                       kinds=[expression_kind(i.answer.targets[0].phrase) for i in items])


def _res(task, items, results, embedder) -> dict[str, float]:
    from .metrics.grounding import res_metrics

    return res_metrics([_first(r, "mask") for r in results], [i.answer.targets[0].masks[0] for i in items])


def _ig(task, items, results, embedder) -> dict[str, float]:
    from .metrics.grounding import interactive_metrics

    kinds, units, preds, gts = [], [], [], []
    for item, result in zip(items, results):
        _, kind, unit = item.sample.task.split("_")
        target = item.answer.targets[0]
        kinds.append(kind)
        units.append(unit)
        preds.append(_first(result, _UNIT_FIELD[unit]))
        gts.append(target.boxes[0] if unit == "box" else target.masks[0])
    return interactive_metrics(kinds, units, preds, gts)


def _regions(target, unit: str) -> list[np.ndarray]:
    array = target.boxes if unit == "box" else target.masks
    return [] if array is None else list(array)


def _gcg(task, items, results, embedder) -> dict[str, float]:
    from .metrics.gcg import GcgImage, gcg_metrics
    from .metrics.text_similarity import default_embedder

    unit = "box" if task == "gcg_box" else "mask"
    field_name = _UNIT_FIELD[unit]
    images = []
    for item, result in zip(items, results):
        image = GcgImage()
        for obj in result.objects:
            if getattr(obj, field_name) is not None:
                image.pred_regions.append(getattr(obj, field_name))
                image.pred_labels.append(obj.phrase)
        for target in item.answer.targets:
            regions = _regions(target, unit)
            image.gt_regions += regions
            image.gt_labels += [target.phrase] * len(regions)
        images.append(image)
    out = gcg_metrics(images, embedder or default_embedder(), unit)
    out.update({f"caption/{k}": v for k, v in _text_metrics(task, items, results, embedder).items()})
    return out


def _detection(task, items, results, embedder) -> dict[str, float]:
    from .metrics.ovd import DetectionImage, freeform_map
    from .metrics.text_similarity import default_embedder

    unit = "box" if task.endswith("ovd") else "mask"
    field_name = _UNIT_FIELD[unit]
    images = []
    for item, result in zip(items, results):
        height, width = item.sample.image.shape[:2]
        image = DetectionImage(height=height, width=width)
        for obj in result.objects:
            if getattr(obj, field_name) is not None:
                image.pred_regions.append(getattr(obj, field_name))
                image.pred_phrases.append(obj.phrase)
        for target in item.answer.targets:
            regions = _regions(target, unit)
            image.gt_regions += regions
            image.gt_classes += [target.phrase] * len(regions)
        images.append(image)
    class_names = sorted({name for image in images for name in image.gt_classes})
    if not class_names:
        raise InputError(f"no ground-truth {unit}es in the {task} samples: nothing to evaluate")
    return freeform_map(images, class_names, embedder or default_embedder(), unit)


def _keypoint(task, items, results, embedder) -> dict[str, float]:
    from .metrics.keypoints import PoseImage, keypoint_metrics

    images = []
    for item, result in zip(items, results):
        target = item.answer.targets[0]
        poses = [obj for obj in result.objects if obj.keypoints is not None]
        images.append(PoseImage(gt_keypoints=list(target.keypoints), gt_boxes=list(target.boxes),
                                pred_keypoints=[o.keypoints for o in poses],
                                pred_scores=[1.0 if o.score is None else float(o.score) for o in poses]))
    return keypoint_metrics(images)


def _depth(task, items, results, embedder) -> dict[str, float]:
    from .metrics.depth import depth_metrics

    missing = [item.sample.id for item in items if item.sample.depth is None]
    if missing:
        raise InputError(f"depth samples without a ground-truth depth map: {missing[:3]}")
    return depth_metrics([_first(r, "depth") for r in results], [item.sample.depth for item in items])


_TASK_METRICS = {
    "caption": _text_metrics, "reg": _text_metrics, "vqa": _vqa, "pope": _pope, "rec": _rec, "res": _res,
    "ig": _ig, "gcg": _gcg, "gcg_box": _gcg, "ovd": _detection, "ovs": _detection,
    "freeform_ovd": _detection, "freeform_ovs": _detection, "keypoint": _keypoint, "depth": _depth,
}
assert set(_TASK_METRICS) == set(EVAL_TASKS)


# ---------------------------------------------------------------- report

@dataclass
class EvalReport:
    task: str
    metrics: dict[str, float]
    count: int
    seconds: float
    predictions: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)     # model, data, ...

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.meta, "count": self.count, "seconds": round(self.seconds, 3),
                "metrics": {k: float(v) for k, v in self.metrics.items()}, "predictions": self.predictions}

    def table(self) -> str:
        """The metrics as a two-column text table."""
        width = max([len(k) for k in self.metrics] + [6])
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
        lines += [f"{name:<{width}}  {value:.4f}" for name, value in self.metrics.items()]
        lines.append(f"({self.task}: {self.count} samples in {self.seconds:.1f} s)")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def _prediction_record(item: EvalItem, result: Result) -> dict[str, Any]:
    return {"id": item.sample.id, "task": item.sample.task, "prompt": item.prompt, "answer": result.answer,
            "trp_text": result.trp_text, "reference": trp.plain_text(item.answer.text),
            "objects": len(result.objects), "errors": list(result.errors)}


def evaluate(predictor, samples: Iterable[Sample], task: str, limit: int | None = None,
             progress: bool = True, embedder=None) -> EvalReport:
    """Run ``predictor`` on the ``task`` items of ``samples`` and score them."""
    items = eval_items(samples, task, limit)
    if not items:
        raise InputError(f"no samples for evaluation task {task!r} (it reads sample tasks "
                         f"{', '.join(EVAL_TASKS[task])}); check --data")
    start = time.perf_counter()
    results = predict_all(predictor, items, progress)
    metrics = compute_metrics(task, items, results, embedder)
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise RuntimeError(f"non-finite metrics {bad}: a metric function is broken")
    return EvalReport(task, metrics, len(items), time.perf_counter() - start,
                      [_prediction_record(i, r) for i, r in zip(items, results)])


# ---------------------------------------------------------------- inputs

def load_predictor(model: str, device: str = "cpu", quantize: str = "none"):
    """A preset name ("tiny", "nano": built as configured) or a checkpoint folder, its LLM
    weights as ``quantize`` says (refvlm_core.quantize)."""
    from refvlm_core.config import PRESET_NAMES
    from refvlm_core.predictor import Predictor

    if model in PRESET_NAMES:
        return Predictor.from_preset(model, device)
    if not Path(model).is_dir():
        raise InputError(f"--model {model!r} is neither a preset ({', '.join(PRESET_NAMES)}) "
                         "nor a checkpoint folder (config.json + model.safetensors)")
    return Predictor.from_pretrained(model, device, quantize=quantize)


def load_samples(data: str) -> Iterable[Sample]:
    """Samples from a shard folder/file, or ``simworld:SPLIT:N[:SEED]`` rendered on the fly."""
    if data.startswith("simworld:"):
        return _simworld_samples(data)
    from refvlm_training.data.shards import list_shards, read_samples

    list_shards(data)  # a clear error now when the path holds no shards
    return read_samples(data)


def _simworld_samples(spec: str) -> Iterable[Sample]:
    from refvlm_simworld import SimWorld, SimWorldConfig
    from refvlm_training.data.simworld import world_samples

    parts = spec.split(":")
    try:
        split, count, seed = parts[1], int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
    except (IndexError, ValueError):
        raise InputError(f"--data {spec!r}: write simworld:SPLIT:N[:SEED], e.g. simworld:test:50") from None
    world = SimWorld(SimWorldConfig(seed=seed), split)
    return (sample for index in range(count) for sample in world_samples(world, index))
