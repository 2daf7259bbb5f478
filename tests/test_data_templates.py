"""Task templates: >= 100 distinct phrasings per task, eval prompts apart, stage 1."""
from __future__ import annotations

import random

import numpy as np
import pytest

from data_helpers import toy_samples
from refvlm_core.errors import InputError
from refvlm_training.data import templates

SLOTS = {"phrase": "the red cube", "question": "What colour is the cube?", "categories": "cubes and balls"}


@pytest.mark.parametrize("task", templates.TASKS)
def test_at_least_100_distinct_prompts(task):
    slots = {name: SLOTS[name] for name in templates.slots_of(task)}
    rng = random.Random(1)
    rendered = {templates.render_user_prompt(task, rng, **slots) for _ in range(3000)}
    assert len(rendered) >= 100
    for text in rendered:
        assert "{" not in text and text[0].isupper()
        assert text.count("<region>") == (1 if task.startswith(("reg_", "ig_")) else 0)
        for value in slots.values():
            if task != "vqa":
                assert value in text
    assert templates.eval_prompt(task, **slots) not in set(templates.all_user_prompts(task, **slots))
    assert templates.system_instruction(task)


def test_missing_slot_and_unknown_task_are_clear():
    with pytest.raises(InputError, match="phrase"):
        templates.render_user_prompt("rec", random.Random(0))
    with pytest.raises(InputError, match="known tasks"):
        templates.eval_prompt("detect_everything")


def test_numpy_and_stdlib_rngs_are_deterministic():
    a = [templates.render_user_prompt("depth", np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    b = [templates.render_user_prompt("caption", random.Random(5)) for _ in range(2)]
    assert b[0] == b[1]


def test_stage1_replaces_ref_blocks_by_normalised_boxes():
    samples = toy_samples(n_images=1)
    ovd = next(s for s in samples if s.task == "ovd")
    stage1 = templates.to_stage1(ovd)
    answer = stage1.turns[1].text
    assert "<REF>" not in answer and "<Phrase>" not in answer and "<Unit>" not in answer
    assert not stage1.turns[1].targets
    height, width = ovd.image.shape[:2]
    target = ovd.turns[1].targets[0]
    x0, y0, x1, y1 = target.boxes[0] if target.boxes is not None else (0, 0, 0, 0)
    assert f"[{x0 / width:.2f},{y0 / height:.2f},{x1 / width:.2f},{y1 / height:.2f}]" in answer
    depth = templates.to_stage1(next(s for s in samples if s.task == "depth"))
    assert depth.turns[1].text == "depth map" and depth.depth is None
    res = templates.to_stage1(next(s for s in samples if s.task == "res"))
    assert res.turns[1].text.startswith("the red cube [0.09,0.08,0.38,0.42]")
