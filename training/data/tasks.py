"""Task builders: generic image annotations -> VT-Instruct Samples.

Converters (public datasets) and SimWorld both describe an image as
``ImageAnnotations`` (objects with name/box/mask/keypoints/expressions, captions,
grounded captions, QA pairs, depth); the builders here turn them into exchanges of each
task (a user prompt from ``templates``, an assistant answer from the TRP serialiser with
its RefTargets), and exchanges into single- or multi-turn Samples.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from refvlm_core import trp
from refvlm_core.errors import InputError
from refvlm_core.sample import RefTarget, Sample, Turn
from refvlm_core.visual_prompts import VisualPrompt

from refvlm_training.data import templates
from refvlm_training.data.templates import PROMPT_KINDS, TASKS


@dataclass
class ObjectAnnotation:
    """One object of an image; geometry in original pixels."""

    name: str                                   # category or short noun ("dog", "red cube")
    box: np.ndarray | None = None               # [4] float32 xyxy
    mask: np.ndarray | None = None              # [H, W] bool
    keypoints: np.ndarray | None = None         # [17, 3] float32 x, y, v
    expressions: list[str] = field(default_factory=list)  # referring expressions (REC/RES)
    description: str | None = None              # region description (REG answer)

    def xyxy(self) -> np.ndarray | None:
        """The box, or the mask's extent when only a mask is known."""
        if self.box is not None:
            return np.asarray(self.box, dtype=np.float32)
        if self.mask is not None and self.mask.any():
            return mask_extent(self.mask)
        return None


@dataclass
class GroundedCaption:
    """A caption whose spans refer to objects: (start, end, object indices)."""

    text: str
    spans: list[tuple[int, int, list[int]]]


@dataclass
class ImageAnnotations:
    """Everything known about one image, for every task builder."""

    image_id: str
    image: np.ndarray                           # [H, W, 3] uint8 RGB
    objects: list[ObjectAnnotation] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    grounded_captions: list[GroundedCaption] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)
    depth: np.ndarray | None = None             # [H, W] float32 metres, NaN unknown
    absent: list[str] = field(default_factory=list)  # expressions that match nothing in the image


@dataclass
class Exchange:
    """One user request and its answer, before it is placed in a conversation."""

    task: str
    user: str                                   # may hold <region>s, never <image>
    answer: str                                 # TRP from the serialiser, or plain text
    targets: list[RefTarget] = field(default_factory=list)
    visual_prompts: list[VisualPrompt] = field(default_factory=list)


Rng = random.Random


def mask_extent(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool -> [4] xyxy box covering every set pixel (pixel edges)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ----------------------------------------------------------------- visual prompts

def _inside_points(obj: ObjectAnnotation, rng: Rng, count: int) -> np.ndarray:
    """``count`` random points on the object: mask pixels, or the box's inner half."""
    if obj.mask is not None and obj.mask.any():
        ys, xs = np.nonzero(obj.mask)
        picks = [rng.randrange(len(xs)) for _ in range(count)]
        return np.stack([xs[picks] + 0.5, ys[picks] + 0.5], axis=1).astype(np.float32)
    x0, y0, x1, y1 = obj.xyxy()
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
    return np.array([[cx + rng.uniform(-hw, hw), cy + rng.uniform(-hh, hh)] for _ in range(count)],
                    dtype=np.float32)


def visual_prompt_for(obj: ObjectAnnotation, kind: str, rng: Rng) -> VisualPrompt | None:
    """A prompt of ``kind`` marking ``obj`` as a user would; None when it cannot."""
    box = obj.xyxy()
    if box is None or (kind == "mask" and (obj.mask is None or not obj.mask.any())):
        return None
    if kind == "point":
        (x, y), = _inside_points(obj, rng, 1)
        return VisualPrompt.point(float(x), float(y))
    if kind == "box":
        return VisualPrompt.box(*[float(v) for v in box])
    if kind == "scribble":
        points = _inside_points(obj, rng, rng.randint(3, 6))
        return VisualPrompt.scribble(points[np.argsort(points[:, 0], kind="stable")])
    if kind == "mask":
        return VisualPrompt.from_mask(obj.mask)
    raise InputError(f"unknown visual prompt kind {kind!r}; use one of {PROMPT_KINDS}")


# ----------------------------------------------------------------- targets

def target_for(objects: list[ObjectAnnotation], phrase: str, units: tuple[str, ...]) -> RefTarget:
    """One RefTarget for ``objects`` (one instance each) decoded by ``units``."""
    target = RefTarget(phrase=phrase, units=units)
    if "box" in units or "keypoint" in units:
        target.boxes = np.stack([o.xyxy() for o in objects]).astype(np.float32)
    if "mask" in units:
        target.masks = np.stack([o.mask for o in objects]).astype(bool)
    if "keypoint" in units:
        target.keypoints = np.stack([o.keypoints for o in objects]).astype(np.float32)
    return target


def _has(obj: ObjectAnnotation, unit: str) -> bool:
    if unit == "mask":
        return obj.mask is not None and bool(obj.mask.any())
    if unit == "keypoint":
        return obj.keypoints is not None and bool((obj.keypoints[:, 2] > 0).any())
    return obj.xyxy() is not None


def _safe(text: str) -> str:
    return trp.neutralize(" ".join(text.split()))


def grouped_answer(groups: list[tuple[str, list[ObjectAnnotation]]], units: tuple[str, ...]) -> tuple[str, list[RefTarget]]:
    """"<Phrase>a</Phrase> (...), <Phrase>b</Phrase> (...)" and its targets, in order."""
    parts = [trp.format_phrase(_safe(name), units, len(objs)) for name, objs in groups]
    return ", ".join(parts) + ".", [target_for(objs, _safe(name), units) for name, objs in groups]


def _by_name(objects: list[ObjectAnnotation], unit: str) -> list[tuple[str, list[ObjectAnnotation]]]:
    groups: dict[str, list[ObjectAnnotation]] = {}
    for obj in objects:
        if _has(obj, unit) and obj.name.strip():
            groups.setdefault(obj.name.strip(), []).append(obj)
    return list(groups.items())


# ----------------------------------------------------------------- builders per task

def caption_exchanges(ann: ImageAnnotations, rng: Rng) -> list[Exchange]:
    return [Exchange("caption", templates.render_user_prompt("caption", rng), _safe(c))
            for c in ann.captions if c.strip()]


def vqa_exchanges(ann: ImageAnnotations, rng: Rng) -> list[Exchange]:
    return [Exchange("vqa", templates.render_user_prompt("vqa", rng, question=q), _safe(a))
            for q, a in ann.qa if q.strip() and a.strip()]


def _expressions(ann: ImageAnnotations, obj: ObjectAnnotation) -> list[str]:
    """Referring expressions of ``obj``; its name only when no other object shares it."""
    if obj.expressions:
        return obj.expressions
    same = sum(o.name == obj.name for o in ann.objects)
    return [f"the {obj.name}"] if same == 1 and obj.name.strip() else []


def referring_exchanges(ann: ImageAnnotations, rng: Rng, task: str) -> list[Exchange]:
    """REC (box) or RES (mask): one exchange per referring expression."""
    unit = "box" if task == "rec" else "mask"
    out = []
    for obj in ann.objects:
        if not _has(obj, unit):
            continue
        for expression in _expressions(ann, obj):
            phrase = _safe(expression)
            user = templates.render_user_prompt(task, rng, phrase=phrase)
            out.append(Exchange(task, user, trp.format_phrase(phrase, (unit,), 1),
                                [target_for([obj], phrase, (unit,))]))
    for expression in ann.absent:  # "nothing matches": a plain answer, no <REF>
        phrase = _safe(expression)
        out.append(Exchange(task, templates.render_user_prompt(task, rng, phrase=phrase),
                            f"There is no {phrase.removeprefix('the ')} in the image."))
    return out


def region_caption_exchanges(ann: ImageAnnotations, rng: Rng, kind: str) -> list[Exchange]:
    """REG: a visual prompt of ``kind`` on an object -> its description."""
    out = []
    for obj in ann.objects:
        answer = obj.description or (obj.expressions[0] if obj.expressions else obj.name)
        prompt = visual_prompt_for(obj, kind, rng) if answer.strip() else None
        if prompt is not None:
            out.append(Exchange(f"reg_{kind}", templates.render_user_prompt(f"reg_{kind}", rng),
                                _safe(answer), visual_prompts=[prompt]))
    return out


def interactive_exchanges(ann: ImageAnnotations, rng: Rng, kind: str, unit: str) -> list[Exchange]:
    """Interactive grounding: a visual prompt of ``kind`` -> the object's name and ``unit``."""
    task = f"ig_{kind}_{unit}"
    out = []
    for obj in ann.objects:
        prompt = visual_prompt_for(obj, kind, rng) if _has(obj, unit) and obj.name.strip() else None
        if prompt is not None:
            phrase = _safe(obj.name)
            out.append(Exchange(task, templates.render_user_prompt(task, rng),
                                trp.format_phrase(phrase, (unit,), 1),
                                [target_for([obj], phrase, (unit,))], [prompt]))
    return out


def _grounded_text(ann: ImageAnnotations, caption: GroundedCaption, unit: str) -> tuple[str, list[RefTarget]] | None:
    pieces, targets, cursor = [], [], 0
    for start, end, indices in sorted(caption.spans):
        objects = [ann.objects[i] for i in indices]
        if start < cursor or not objects or not all(_has(o, unit) for o in objects):
            return None  # overlapping spans or an object without this unit: not groundable
        phrase = _safe(caption.text[start:end])
        if not phrase:
            return None
        pieces += [_safe_keep_spaces(caption.text[cursor:start]), trp.format_phrase(phrase, (unit,), len(objects))]
        targets.append(target_for(objects, phrase, (unit,)))
        cursor = end
    pieces.append(_safe_keep_spaces(caption.text[cursor:]))
    return "".join(pieces).strip(), targets


def _safe_keep_spaces(text: str) -> str:
    return trp.neutralize(text)


def gcg_exchanges(ann: ImageAnnotations, rng: Rng, unit: str) -> list[Exchange]:
    """GCG: a caption with every mentioned object grounded. Without grounded captions,
    one listing the objects by name is composed."""
    task = f"gcg_{unit}"
    out = []
    for caption in ann.grounded_captions:
        grounded = _grounded_text(ann, caption, unit)
        if grounded and grounded[1]:
            out.append(Exchange(task, templates.render_user_prompt(task, rng), grounded[0], grounded[1]))
    if not out:
        groups = _by_name(ann.objects, unit)
        if groups:
            parts = [trp.format_phrase(_safe(name), (unit,), len(objs)) for name, objs in groups]
            text = "The image shows " + _join_names(parts) + "."
            targets = [target_for(objs, _safe(name), (unit,)) for name, objs in groups]
            out.append(Exchange(task, templates.render_user_prompt(task, rng), text, targets))
    return out


def open_vocabulary_exchanges(ann: ImageAnnotations, rng: Rng, task: str) -> list[Exchange]:
    """OVD / OVS (categories named by the user) and their freeform variants."""
    unit = "box" if task.endswith("ovd") else "mask"
    groups = _by_name(ann.objects, unit)
    if not groups:
        return []
    answer, targets = grouped_answer(groups, (unit,))
    if task.startswith("freeform"):
        user = templates.render_user_prompt(task, rng)
    else:
        user = templates.render_user_prompt(task, rng, categories=_join_names([_safe(n) for n, _ in groups]))
    return [Exchange(task, user, answer, targets)]


def keypoint_exchanges(ann: ImageAnnotations, rng: Rng) -> list[Exchange]:
    """Pose: every object with labelled keypoints, grouped by name."""
    out = []
    for name, objects in _by_name([o for o in ann.objects if _has(o, "keypoint")], "keypoint"):
        slot = f"every {name}" if len(objects) > 1 else f"the {name}"
        phrase = _safe(name)
        out.append(Exchange("keypoint", templates.render_user_prompt("keypoint", rng, phrase=_safe(slot)),
                            trp.format_phrase(phrase, ("keypoint",), len(objects)),
                            [target_for(objects, phrase, ("keypoint",))]))
    return out


DEPTH_PHRASE = "depth map"


def depth_exchanges(ann: ImageAnnotations, rng: Rng) -> list[Exchange]:
    if ann.depth is None:
        return []
    return [Exchange("depth", templates.render_user_prompt("depth", rng),
                     trp.format_phrase(DEPTH_PHRASE, ("depth",), 1),
                     [RefTarget(phrase=DEPTH_PHRASE, units=("depth",))])]


def _builders() -> dict[str, Callable[[ImageAnnotations, Rng], list[Exchange]]]:
    table: dict[str, Callable[[ImageAnnotations, Rng], list[Exchange]]] = {
        "caption": caption_exchanges, "vqa": vqa_exchanges,
        "keypoint": keypoint_exchanges, "depth": depth_exchanges,
    }
    for task in ("rec", "res"):
        table[task] = lambda a, r, t=task: referring_exchanges(a, r, t)
    for kind in PROMPT_KINDS:
        table[f"reg_{kind}"] = lambda a, r, k=kind: region_caption_exchanges(a, r, k)
        for unit in ("box", "mask"):
            table[f"ig_{kind}_{unit}"] = lambda a, r, k=kind, u=unit: interactive_exchanges(a, r, k, u)
    for unit in ("box", "mask"):
        table[f"gcg_{unit}"] = lambda a, r, u=unit: gcg_exchanges(a, r, u)
    for task in ("ovd", "freeform_ovd", "ovs", "freeform_ovs"):
        table[task] = lambda a, r, t=task: open_vocabulary_exchanges(a, r, t)
    return table


BUILDERS = _builders()
assert set(BUILDERS) == set(TASKS)


def exchanges_for(ann: ImageAnnotations, task: str, rng: Rng) -> list[Exchange]:
    """Every exchange of ``task`` the annotations support (may be empty)."""
    return BUILDERS[templates.check_task(task)](ann, rng)


# ----------------------------------------------------------------- samples

SYSTEM_CHOICES = ("task", "default")


def make_sample(ann: ImageAnnotations, exchanges: list[Exchange], sample_id: str, system: str = "task") -> Sample:
    """Exchanges -> one Sample: ``<image>`` opens the first user turn. ``system="task"``: one
    task's system instruction, or the multi-task one when tasks are mixed; ``"default"``:
    none stored, so the model's own default prompt is used, as the node and the CLI do."""
    if system not in SYSTEM_CHOICES:
        raise InputError(f"system={system!r}: use one of {SYSTEM_CHOICES}")
    if not exchanges:
        raise InputError(f"sample {sample_id!r} needs at least one exchange")
    turns: list[Turn] = []
    prompts: list[VisualPrompt] = []
    for i, exchange in enumerate(exchanges):
        user = f"{templates.IMAGE_TOKEN}\n{exchange.user}" if i == 0 else exchange.user
        turns += [Turn("user", user), Turn("assistant", exchange.answer, list(exchange.targets))]
        prompts += exchange.visual_prompts
    task_names = {e.task for e in exchanges}
    task = exchanges[0].task if len(task_names) == 1 else "multi"
    depth = ann.depth if any(e.task == "depth" for e in exchanges) else None
    return Sample(id=sample_id, image=ann.image, turns=turns, task=task, visual_prompts=prompts,
                  depth=depth, system=templates.system_instruction(task) if system == "task" else None)


def make_conversation(ann: ImageAnnotations, rng: Rng, tasks: tuple[str, ...] | list[str] = TASKS,
                      max_turns: int = 3, sample_id: str | None = None, system: str = "task") -> Sample | None:
    """A multi-turn Sample on one image: up to ``max_turns`` exchanges, from as many
    different tasks as the annotations support; None when fewer than two exist."""
    pool = [exchanges_for(ann, task, rng) for task in tasks]
    pool = [options for options in pool if options]
    rng.shuffle(pool)
    for options in pool:
        rng.shuffle(options)
    chosen = [options[0] for options in pool[:max_turns]]
    spare = [e for options in pool[:max_turns] for e in options[1:]]
    chosen += spare[:max_turns - len(chosen)]
    if len(chosen) < 2:
        return None
    return make_sample(ann, chosen, sample_id or f"{ann.image_id}_multi", system)


def build_samples(ann: ImageAnnotations, rng: Rng, tasks: tuple[str, ...] | list[str] = TASKS,
                  max_per_task: int | None = None, conversations: int = 0,
                  max_turns: int = 3, system: str = "task") -> list[Sample]:
    """Single-task Samples (at most ``max_per_task`` each) plus ``conversations`` mixed
    multi-turn ones. Ids: ``<image_id>_<task>_<k>`` and ``<image_id>_multi_<k>``."""
    samples = []
    for task in tasks:
        exchanges = exchanges_for(ann, task, rng)
        if max_per_task is not None and len(exchanges) > max_per_task:
            exchanges = rng.sample(exchanges, max_per_task)
        samples += [make_sample(ann, [e], f"{ann.image_id}_{task}_{k}", system) for k, e in enumerate(exchanges)]
    for k in range(conversations):
        sample = make_conversation(ann, rng, tasks, max_turns, f"{ann.image_id}_multi_{k}", system)
        if sample is not None:
            samples.append(sample)
    return samples
