"""A rendered scene -> generic image annotations -> VT-Instruct Samples of every task.

SimWorld supplies what is scene-specific (names, referring expressions, region
descriptions, captions, grounded captions, QA, exact masks, keypoints, depth); the
data pipeline's task builders turn that into prompts and TRP answers.
"""
from __future__ import annotations

import random

import numpy as np

from refvlm_core.sample import Sample
from refvlm_training.data.tasks import GroundedCaption, ImageAnnotations, ObjectAnnotation, build_samples
from refvlm_training.data.templates import TASKS

from . import language
from .render import Scene


def scene_id(split: str, seed: int, index: int) -> str:
    """Image id of a SimWorld scene; sample ids extend it."""
    return f"simworld_{split}_s{seed}_{index:07d}"


def annotations(scene: Scene, rng: random.Random, min_pixels: int = 25) -> ImageAnnotations:
    """Everything the task builders need about one scene. Objects with at least one
    visible pixel are listed (so detection answers are complete); only those with
    ``min_pixels`` get referring expressions and descriptions."""
    seen = language.seen_objects(scene.objects, scene.camera, scene.pixel_counts())
    boxes = scene.boxes
    objects = []
    for s in seen:
        obj = s.obj
        big_enough = s.pixels >= min_pixels
        objects.append(ObjectAnnotation(
            name=language.short_name(obj),
            box=boxes[obj.instance_id],
            mask=scene.masks(obj.instance_id),
            keypoints=scene.keypoints(obj.instance_id) if obj.category == "person" else None,
            expressions=language.referring_expressions(s, seen, rng) if big_enough else [],
            description=language.description(s) if big_enough else None,
        ))
    grounded = []
    if seen:
        text, spans = language.grounded_caption(seen, rng)
        grounded.append(GroundedCaption(text, spans))
    depth = np.where(np.isfinite(scene.depth), scene.depth, np.nan).astype(np.float32)  # sky: no metric target
    absent = [] if scene.layout.split == "test" else absent_expressions(scene, rng)
    return ImageAnnotations(
        image_id=scene_id(scene.layout.split, scene.layout.seed, scene.layout.index), image=scene.rgb, objects=objects,
        captions=language.captions(seen, rng), grounded_captions=grounded,
        qa=language.questions(seen, scene.layout.split, rng), depth=depth, absent=absent,
    )


def absent_expressions(scene: Scene, rng: random.Random, probability: float = 0.5) -> list[str]:
    """With ``probability``, one "the <colour> <shape>" that no object of the scene is, with a
    colour the split allows for that shape (so no held-out pair is ever named in training)."""
    from .splits import SHAPES, allowed_colors

    if rng.random() >= probability:
        return []
    present = {(obj.color, obj.category) for obj in scene.objects}
    options = [(c, s) for s in SHAPES for c in allowed_colors(scene.layout.split, s) if (c, s) not in present]
    if not options:
        return []
    color, shape = rng.choice(sorted(options))
    return [f"the {color} {shape}"]


def scene_samples(scene: Scene, rng: random.Random, tasks: tuple[str, ...] = TASKS, max_per_task: int = 2,
                  conversations: int = 1, min_pixels: int = 25, system: str = "task") -> list[Sample]:
    """Single-task samples for every task the scene supports plus mixed conversations."""
    ann = annotations(scene, rng, min_pixels)
    return build_samples(ann, rng, tasks=tasks, max_per_task=max_per_task, conversations=conversations,
                         system=system)
