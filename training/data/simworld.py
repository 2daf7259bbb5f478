"""SimWorld scenes as VT-Instruct data: a rendered scene -> generic image annotations ->
Samples of every task, and whole splits written as shards.

SimWorld (``refvlm_simworld``) supplies what is scene-specific (names, referring
expressions, region descriptions, captions, grounded captions, QA, exact masks,
keypoints, depth); the data pipeline's task builders turn that into prompts and TRP
answers.
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter

import numpy as np

from refvlm_core.errors import InputError
from refvlm_core.sample import Sample
from refvlm_simworld import SimWorld, SimWorldConfig, language
from refvlm_simworld.render import Scene
from refvlm_simworld.splits import SHAPES, SPLIT_CODES, allowed_colors

from .tasks import GroundedCaption, ImageAnnotations, ObjectAnnotation, build_samples
from .templates import TASKS


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


def world_samples(world: SimWorld, index: int, max_per_task: int = 2, conversations: int = 1,
                  tasks: tuple[str, ...] = TASKS, system: str = "task") -> list[Sample]:
    """Samples of each of ``tasks`` scene ``index`` of ``world`` supports (language from the
    scene's own seed); ``system``: "task" (each task's instruction) or "default" (the model's
    own prompt)."""
    rng = random.Random(f"{world.config.seed}-{SPLIT_CODES[world.split]}-{index}")
    return scene_samples(world.scene(index), rng, tasks=tasks, max_per_task=max_per_task,
                         conversations=conversations, min_pixels=world.config.min_visible_pixels, system=system)


def write_split(split: str, n: int, out_dir: str | os.PathLike, config: SimWorldConfig | None = None,
                progress: bool = True, max_per_task: int = 2, conversations: int = 1,
                samples_per_shard: int = 1000, tasks: tuple[str, ...] = TASKS, system: str = "task") -> dict:
    """Render scenes 0..n-1 of ``split``, make their samples (of ``tasks`` only) and write tar
    shards to ``out_dir``. Returns a summary: scenes, samples, samples per task, shards, seconds."""
    from .shards import ShardWriter  # the tar writer pulls in OpenCV

    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise InputError(f"unknown task(s) {unknown or tasks}: choose among {', '.join(TASKS)}")
    world = SimWorld(config, split)
    per_task: Counter[str] = Counter()
    start = time.perf_counter()
    indices = range(n)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f"simworld {split}", unit="scene")
    with ShardWriter(out_dir, prefix=f"simworld-{split}", max_samples_per_shard=samples_per_shard) as writer:
        for index in indices:
            for sample in world_samples(world, index, max_per_task, conversations, tuple(tasks), system):
                writer.write(sample, source={"dataset": "simworld", "split": split, "seed": world.config.seed,
                                             "scene": index, "scene_id": scene_id(split, world.config.seed, index)})
                per_task[sample.task] += 1
        shards = writer.close()
    return {"split": split, "scenes": n, "samples": sum(per_task.values()), "per_task": dict(sorted(per_task.items())),
            "shards": [str(p) for p in shards], "seconds": round(time.perf_counter() - start, 2)}
