"""SimWorld: layouts, renders and samples by index, and whole splits written as shards."""
from __future__ import annotations

import os
import random
import time
from collections import Counter

from refvlm_core.errors import InputError
from refvlm_core.sample import Sample
from refvlm_training.data.templates import TASKS

from .camera import Camera
from .render import Scene, render_layout
from .samples import scene_id, scene_samples
from .splits import SPLIT_CODES, check_split
from .world import Layout, SimWorldConfig, make_layout


class SimWorld:
    """Deterministic scenes: everything about scene ``index`` of ``split`` follows from
    (config.seed, split, index), whatever was generated before."""

    def __init__(self, config: SimWorldConfig | None = None, split: str = "train") -> None:
        self.config = (config or SimWorldConfig()).validate()
        self.split = check_split(split)

    def layout(self, index: int) -> Layout:
        return make_layout(self.config, self.split, index)

    def render(self, layout: Layout, camera: Camera | None = None) -> Scene:
        """camera None -> the layout's default camera at the configured resolution."""
        camera = camera or layout.default_camera(self.config.width, self.config.height)
        return render_layout(layout, camera)

    def scene(self, index: int) -> Scene:
        return self.render(self.layout(index))

    def samples(self, index: int, max_per_task: int = 2, conversations: int = 1,
                tasks: tuple[str, ...] = TASKS, system: str = "task") -> list[Sample]:
        """Samples of each of ``tasks`` the scene supports (language from its own seed);
        ``system``: "task" (each task's instruction) or "default" (the model's own prompt)."""
        rng = random.Random(f"{self.config.seed}-{SPLIT_CODES[self.split]}-{index}")
        return scene_samples(self.scene(index), rng, tasks=tasks, max_per_task=max_per_task,
                             conversations=conversations, min_pixels=self.config.min_visible_pixels,
                             system=system)


def write_split(split: str, n: int, out_dir: str | os.PathLike, config: SimWorldConfig | None = None,
                progress: bool = True, max_per_task: int = 2, conversations: int = 1,
                samples_per_shard: int = 1000, tasks: tuple[str, ...] = TASKS, system: str = "task") -> dict:
    """Render scenes 0..n-1 of ``split``, make their samples (of ``tasks`` only) and write tar
    shards to ``out_dir``. Returns a summary: scenes, samples, samples per task, shards, seconds."""
    from refvlm_training.data.shards import ShardWriter  # the tar writer pulls in OpenCV

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
            for sample in world.samples(index, max_per_task, conversations, tuple(tasks), system):
                writer.write(sample, source={"dataset": "simworld", "split": split, "seed": world.config.seed,
                                             "scene": index, "scene_id": scene_id(split, world.config.seed, index)})
                per_task[sample.task] += 1
        shards = writer.close()
    return {"split": split, "scenes": n, "samples": sum(per_task.values()), "per_task": dict(sorted(per_task.items())),
            "shards": [str(p) for p in shards], "seconds": round(time.perf_counter() - start, 2)}

