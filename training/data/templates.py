"""Task templates of VT-Instruct: a system instruction per task, many natural user
phrasings per task (composed from hand-written parts), and one fixed evaluation prompt
per task kept apart from the training phrasings.

User prompts may hold two placeholders the model's processor replaces by features:
``<image>`` (the image tokens, added once per conversation by ``tasks``) and
``<region>`` (one visual prompt, in order). Slots in braces are filled by the caller:
``{phrase}`` (a referring expression or category), ``{question}``, ``{categories}``.
"""
from __future__ import annotations

import itertools
import random
import string
from functools import lru_cache

import numpy as np

from refvlm_core import trp
from refvlm_core.config import DEFAULT_SYSTEM_PROMPT
from refvlm_core.errors import InputError

IMAGE_TOKEN = trp.IMAGE
REGION_TOKEN = trp.REGION
PROMPT_KINDS = ("point", "box", "scribble", "mask")
OUTPUT_UNITS = ("box", "mask")

# Every task name the pipeline knows, in a stable order.
TASKS: tuple[str, ...] = (
    "caption", "vqa", "rec", "res",
    *(f"reg_{kind}" for kind in PROMPT_KINDS),
    *(f"ig_{kind}_{unit}" for kind in PROMPT_KINDS for unit in OUTPUT_UNITS),
    "gcg_box", "gcg_mask", "ovd", "freeform_ovd", "ovs", "freeform_ovs",
    "keypoint", "depth",
)

# How a request is framed: "{req}" is an imperative clause ("locate the dog").
_FRAMES = (
    "{req}.", "Please {req}.", "Could you {req}?", "Can you {req}?",
    "I need you to {req}.", "Would you {req}?", "Kindly {req}.",
)

# ------------------------------------------------------------------- parts per task
_CAPTION_REQS = (
    "describe this image", "describe the picture", "write a caption for this image",
    "give a caption for the photo", "summarise what the image shows",
    "tell me what is in this image", "describe the scene", "caption this picture",
    "explain what you see in the image", "give a description of the scene",
    "say what this photo shows", "describe what is happening in the image",
)
_CAPTION_TAILS = ("", " in one sentence", " in a few words", " concisely")

_VQA_HEADS = (
    "{question}", "Answer the question: {question}", "Please answer this: {question}",
    "Look at the image and answer: {question}", "Question: {question}",
    "Based on the image, {question_lc}", "Here is a question about the picture. {question}",
    "Using what you see, answer: {question}", "I have a question about this image: {question}",
    "Tell me, {question_lc}", "Check the image and reply: {question}",
    "From the photo, {question_lc}",
)
_VQA_TAILS = (
    "", " Answer briefly.", " Answer with a single word or phrase.", " Keep it short.",
    " Reply in a few words.", " Give a short answer.", " Be concise.",
    " One word or a short phrase, please.", " A brief answer is enough.",
)

_REC_REQS = (
    "locate {phrase}", "find {phrase}", "give the bounding box of {phrase}",
    "draw a box around {phrase}", "detect {phrase}", "mark {phrase} with a bounding box",
    "show me where {phrase} is with a box", "output the box of {phrase}",
    "ground {phrase} with a box", "put a bounding box on {phrase}",
)
_RES_REQS = (
    "segment {phrase}", "give the mask of {phrase}", "produce a segmentation mask for {phrase}",
    "outline {phrase} pixel by pixel", "cut out {phrase}", "mask {phrase}",
    "highlight the pixels of {phrase}", "draw the segmentation of {phrase}",
    "separate {phrase} from the background", "show the exact region of {phrase}",
)
_IN_IMAGE = ("", " in the image", " in this picture", " in the photo")

# How a visual prompt of each kind is named in a sentence (each holds one <region>).
_REGION_NAMES = {
    "point": ("the point <region>", "the location <region>", "the spot marked <region>"),
    "box": ("the box <region>", "the region <region>", "the area inside <region>"),
    "scribble": ("the scribble <region>", "the stroke <region>", "the line drawn at <region>"),
    "mask": ("the mask <region>", "the masked area <region>", "the highlighted region <region>"),
}
_REG_REQS = (
    "describe the object at {region}", "tell me what is at {region}",
    "give a short description of {region}", "say what {region} shows",
    "name the thing at {region}", "explain what can be seen at {region}",
    "write a caption for {region}", "describe what {region} covers",
)
_REG_FRAMES = ("{req}.", "Please {req}.", "Could you {req}?", "Can you {req}?", "Kindly {req}.")

_UNIT_WORDS = {"box": ("bounding box", "box"), "mask": ("segmentation mask", "mask")}
_IG_REQS = (
    "give the {unit} of the object at {region}",
    "locate the object indicated by {region} with a {unit}",
    "output a {unit} for what {region} marks",
    "detect the thing at {region} and return its {unit}",
    "ground the object referred to by {region} as a {unit}",
    "find the object under {region} and draw its {unit}",
)
_IG_FRAMES = ("{req}.", "Please {req}.", "Could you {req}?", "Can you {req}?", "Kindly {req}.")

_GCG_REQS = (
    "describe the image and ground every object you mention with a {unit}",
    "write a caption and link each object in it to a {unit}",
    "give a grounded description of the scene using a {unit} per object",
    "describe the picture, marking each mentioned object with a {unit}",
    "caption the image with every noun phrase tied to a {unit}",
    "tell me what the image shows and give a {unit} for each thing you name",
    "produce a grounded caption with a {unit} for every object",
    "summarise the scene and attach a {unit} to each object you mention",
    "describe this photo, grounding the objects with a {unit} each",
    "write a short grounded caption, one {unit} per mentioned object",
)
_GCG_FRAMES = ("{req}.", "Please {req}.", "Could you {req}?", "Can you {req}?", "Kindly {req}.")

_OVD_REQS = (
    "detect {categories}", "find all instances of {categories}",
    "give bounding boxes for {categories}", "locate every {categories}",
    "draw boxes around all {categories}", "detect every object of these categories: {categories}",
    "mark each {categories} with a box", "output the boxes of all {categories}",
    "find and box {categories}", "show me all {categories} with boxes",
)
_FREEFORM_OVD_REQS = (
    "detect all objects", "find every object and name it", "give boxes for all the objects you can see",
    "locate and label each object", "draw a box around every object and say what it is",
    "detect everything in the scene", "list the objects with their bounding boxes",
    "name and box each thing", "find all the things you can recognise and box them",
    "box and name every object",
)
_OVS_REQS = (
    "segment {categories}", "give masks for all {categories}", "produce segmentation masks of {categories}",
    "segment every instance of {categories}", "mask all {categories}",
    "cut out each of these categories: {categories}", "outline all {categories} pixel by pixel",
    "highlight the pixels of every {categories}", "find and segment {categories}",
    "show the exact regions of all {categories}",
)
_FREEFORM_OVS_REQS = (
    "segment all objects", "segment every object and name it", "give masks for all the objects you can see",
    "name and segment each thing", "produce a mask for every object and say what it is",
    "segment everything in the scene", "list the objects with their masks",
    "outline and label each object", "find all the things you can recognise and mask them",
    "mask and name every object",
)
_KEYPOINT_REQS = (
    "detect the keypoints of {phrase}", "estimate the pose of {phrase}",
    "find the body joints of {phrase}", "give the skeleton of {phrase}",
    "locate the keypoints of {phrase}", "mark the joints of {phrase}",
    "output the pose keypoints of {phrase}", "predict the human pose of {phrase}",
    "annotate the body keypoints of {phrase}", "show where the joints of {phrase} are",
)
_DEPTH_REQS = (
    "estimate the depth of the scene", "predict a depth map", "give the depth map of this image",
    "tell me how far each pixel is", "estimate the distance of everything from the camera",
    "produce a metric depth map", "compute the depth of the image", "infer the scene depth",
    "show the depth of each point in the picture", "output a depth map for the picture",
)
_DEPTH_TAILS = ("", " in metres", " for this image", " from this view")


def _compose(reqs, frames, tails=("",), **fills) -> list[str]:
    """All frame x request x tail combinations, capitalised, as format templates."""
    out: list[str] = []
    fill_lists = {key: values for key, values in fills.items()}
    keys = list(fill_lists)
    for req, tail, frame in itertools.product(reqs, tails, frames):
        for values in itertools.product(*(fill_lists[k] for k in keys)):
            clause = req.format_map(_Partial(dict(zip(keys, values)))) + tail
            text = frame.replace("{req}", clause)
            out.append(text[0].upper() + text[1:])
    return out


class _Partial(dict):
    """format_map helper that leaves unknown slots (e.g. {phrase}) in place."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@lru_cache(maxsize=None)
def _templates(task: str) -> tuple[str, ...]:
    if task == "caption":
        return tuple(_compose(_CAPTION_REQS, _FRAMES[:3] + _FRAMES[4:5], _CAPTION_TAILS))
    if task == "vqa":
        return tuple(head + tail for head in _VQA_HEADS for tail in _VQA_TAILS)
    if task == "rec":
        return tuple(_compose(_REC_REQS, _FRAMES, _IN_IMAGE))
    if task == "res":
        return tuple(_compose(_RES_REQS, _FRAMES, _IN_IMAGE))
    if task.startswith("reg_"):
        return tuple(_compose(_REG_REQS, _REG_FRAMES, region=_REGION_NAMES[task[4:]]))
    if task.startswith("ig_"):
        _, kind, unit = task.split("_")
        return tuple(_compose(_IG_REQS, _IG_FRAMES, region=_REGION_NAMES[kind], unit=_UNIT_WORDS[unit]))
    if task in ("gcg_box", "gcg_mask"):
        return tuple(_compose(_GCG_REQS, _GCG_FRAMES, unit=_UNIT_WORDS[task[4:]]))
    if task == "ovd":
        return tuple(_compose(_OVD_REQS, _FRAMES, _IN_IMAGE))
    if task == "freeform_ovd":
        return tuple(_compose(_FREEFORM_OVD_REQS, _FRAMES, _IN_IMAGE))
    if task == "ovs":
        return tuple(_compose(_OVS_REQS, _FRAMES, _IN_IMAGE))
    if task == "freeform_ovs":
        return tuple(_compose(_FREEFORM_OVS_REQS, _FRAMES, _IN_IMAGE))
    if task == "keypoint":
        return tuple(_compose(_KEYPOINT_REQS, _FRAMES, _IN_IMAGE))
    if task == "depth":
        return tuple(_compose(_DEPTH_REQS, _FRAMES, _DEPTH_TAILS))
    raise InputError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


SYSTEM_INSTRUCTIONS: dict[str, str] = {
    "caption": "You describe images. Answer in plain text.",
    "vqa": "You answer questions about the image in plain text, briefly.",
    "rec": "You locate the object a sentence refers to. Answer with the phrase and a box unit: "
           "<Phrase>expression</Phrase> (<Unit>box</Unit>[0]<REF>).",
    "res": "You segment the object a sentence refers to. Answer with the phrase and a mask unit: "
           "<Phrase>expression</Phrase> (<Unit>mask</Unit>[0]<REF>).",
    "gcg_box": "You write a caption and ground each object you mention: every noun phrase is a "
               "<Phrase> followed by a box unit with one <REF> per instance.",
    "gcg_mask": "You write a caption and ground each object you mention: every noun phrase is a "
                "<Phrase> followed by a mask unit with one <REF> per instance.",
    "ovd": "You detect every instance of the named categories: one <Phrase> per category with a "
           "box unit and one <REF> per instance.",
    "freeform_ovd": "You detect and name every object you can see: one <Phrase> per category with a "
                    "box unit and one <REF> per instance.",
    "ovs": "You segment every instance of the named categories: one <Phrase> per category with a "
           "mask unit and one <REF> per instance.",
    "freeform_ovs": "You segment and name every object you can see: one <Phrase> per category with a "
                    "mask unit and one <REF> per instance.",
    "keypoint": "You estimate human poses: one <Phrase> with a keypoint unit and one <REF> per person "
                "(17 COCO keypoints each).",
    "depth": "You estimate metric depth: answer with a <Phrase> and a depth unit with one <REF> for "
             "the whole image.",
}
for _kind in PROMPT_KINDS:
    SYSTEM_INSTRUCTIONS[f"reg_{_kind}"] = (
        f"You describe the region a user marks with a {_kind} (<region>). Answer in plain text.")
    for _unit in OUTPUT_UNITS:
        SYSTEM_INSTRUCTIONS[f"ig_{_kind}_{_unit}"] = (
            f"You find the object a user marks with a {_kind} (<region>) and answer with its name "
            f"and a {_unit} unit: <Phrase>name</Phrase> (<Unit>{_unit}</Unit>[0]<REF>).")
MULTI_TASK_SYSTEM = DEFAULT_SYSTEM_PROMPT  # mixed conversations: the model's default prompt

# Fixed evaluation prompts, one per task, never sampled in training (our own wording,
# following the slot layout of the paper's evaluation table).
EVAL_TEMPLATES: dict[str, str] = {
    "caption": "Please describe the image in one short sentence.",
    "vqa": "{question} Answer with a single word or phrase.",
    "rec": "Please locate {phrase} in the image with a bounding box.",
    "res": "Please segment {phrase} in the image with a mask.",
    "gcg_box": "Please describe the image and ground each mentioned object with a bounding box.",
    "gcg_mask": "Please describe the image and ground each mentioned object with a mask.",
    "ovd": "Please detect all {categories} in the image.",
    "freeform_ovd": "Please detect all objects in the image and name them.",
    "ovs": "Please segment all {categories} in the image.",
    "freeform_ovs": "Please segment all objects in the image and name them.",
    "keypoint": "Please detect the keypoints of {phrase} in the image.",
    "depth": "Please estimate the depth map of the image.",
}
for _kind in PROMPT_KINDS:
    EVAL_TEMPLATES[f"reg_{_kind}"] = f"Please describe the object in the {_kind} <region> briefly."
    for _unit in OUTPUT_UNITS:
        EVAL_TEMPLATES[f"ig_{_kind}_{_unit}"] = (
            f"Please give the {_UNIT_WORDS[_unit][0]} of the object marked by the {_kind} <region>.")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return task


def system_instruction(task: str) -> str:
    """The system instruction of a task (``MULTI_TASK_SYSTEM`` for mixed conversations)."""
    if task == "multi":
        return MULTI_TASK_SYSTEM
    return SYSTEM_INSTRUCTIONS[check_task(task)]


def slots_of(task: str) -> tuple[str, ...]:
    """The slot names a task's prompts need, e.g. ("phrase",)."""
    names = {name for text in _templates(check_task(task)) + (EVAL_TEMPLATES[task],)
             for _, name, _, _ in string.Formatter().parse(text) if name}
    return tuple(sorted(names - {"question_lc"}))


def _fill(task: str, template: str, slots: dict[str, str]) -> str:
    missing = [name for name in slots_of(task) if name not in slots]
    if missing:
        raise InputError(f"task {task!r} needs slot(s) {missing}; pass them as keyword arguments")
    # Dataset text is user text: it must never smuggle a TRP tag into the prompt.
    values = {name: trp.neutralize(str(value)) for name, value in slots.items()}
    if "question" in values:
        question = values["question"].strip()
        values["question"] = question
        values["question_lc"] = question[:1].lower() + question[1:]
    return template.format_map(values)


@lru_cache(maxsize=None)
def user_prompt_templates(task: str) -> tuple[str, ...]:
    """Every training phrasing of a task, slots unfilled; never the evaluation prompt."""
    return tuple(t for t in _templates(check_task(task)) if t != EVAL_TEMPLATES[task])


def render_user_prompt(task: str, rng: random.Random | np.random.Generator, **slots: str) -> str:
    """One training phrasing of ``task`` chosen by ``rng``, with its slots filled."""
    templates = user_prompt_templates(task)
    if isinstance(rng, np.random.Generator):
        index = int(rng.integers(len(templates)))
    else:
        index = rng.randrange(len(templates))
    return _fill(task, templates[index], slots)


def all_user_prompts(task: str, **slots: str) -> list[str]:
    """Every training phrasing of ``task`` rendered with the same slots."""
    return [_fill(task, template, slots) for template in user_prompt_templates(task)]


def eval_prompt(task: str, **slots: str) -> str:
    """The fixed evaluation prompt of ``task`` (never used for training)."""
    return _fill(task, EVAL_TEMPLATES[check_task(task)], slots)


# ------------------------------------------------------------------- stage 1 variant

def box_text(box: np.ndarray, height: int, width: int, decimals: int = 2) -> str:
    """[4] xyxy pixels -> "[0.12,0.30,0.55,0.80]" normalised to the image (Shikra style)."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    values = np.clip(np.asarray(box, dtype=np.float64) / scale, 0.0, 1.0)
    return "[" + ",".join(f"{v:.{decimals}f}" for v in values) + "]"


def _target_boxes(target) -> np.ndarray | None:
    if target.boxes is not None:
        return target.boxes
    if target.masks is not None:
        boxes = []
        for mask in target.masks:
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0])
        return np.asarray(boxes, dtype=np.float32)
    return None


def _stage1_text(text: str, targets: list, height: int, width: int, decimals: int) -> str:
    parsed = trp.parse(text, strict=True)
    blocks = parsed.blocks()
    if len(blocks) != len(targets):
        raise InputError(f"answer has {len(blocks)} unit blocks but {len(targets)} targets: {text[:80]!r}")
    coords = {block.span[0]: _target_boxes(target) for (_, block), target in zip(blocks, targets)}
    out, cursor = [], 0
    for group in sorted(parsed.groups, key=lambda g: g.span[0]):
        spans = sorted(start for start in coords if group.span[0] <= start < group.span[1])
        boxes = [coords[start] for start in spans if coords[start] is not None]
        coord_text = ";".join(box_text(b, height, width, decimals) for arr in boxes for b in arr)
        out += [text[cursor:group.span[0]], group.text + (f" {coord_text}" if coord_text else "")]
        cursor = group.span[1]
    out.append(text[cursor:])
    return "".join(out)


def to_stage1(sample, decimals: int = 2):
    """Stage-1 copy of a Sample: every unit block becomes normalised box coordinates in
    the text ("the dog [0.12,0.30,0.55,0.80]"), or just its phrase when the block has no
    box or mask (depth); no RefTargets remain, so no <REF> is trained."""
    from refvlm_core.sample import Sample, Turn  # local: keep this module light
    height, width = sample.image.shape[:2]
    turns = [Turn(t.role, _stage1_text(t.text, t.targets, height, width, decimals) if t.role == "assistant" else t.text)
             for t in sample.turns]
    return Sample(id=sample.id, image=sample.image, turns=turns, task=sample.task,
                  visual_prompts=list(sample.visual_prompts), depth=None, system=sample.system)
