"""SimWorld language and samples: referring expressions checked by an independent
interpreter, compositional splits, captions/QA against the scene, samples of every
task, and shards written by write_split."""
from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from refvlm_core import trp
from refvlm_core.errors import InputError
from refvlm_simworld import HELD_OUT_COLOR_SHAPE, SimWorld, SimWorldConfig, language
from refvlm_simworld.splits import COLOR_NAMES, SHAPES
from refvlm_training.data.shards import read_samples
from refvlm_training.data.simworld import annotations, world_samples, write_split
from refvlm_training.data.templates import TASKS

CONFIG = SimWorldConfig(seed=5, width=96, height=72)
COLOR = "|".join(COLOR_NAMES)
NP = (rf"(?:(?P<size{{i}}>small|large) )?(?:(?P<color{{i}}>{COLOR}) )?(?:(?P<material{{i}}>matte|metal) )?"
      rf"(?P<category{{i}}>cube|sphere|cylinder|cone|person)(?: in a (?P<shirt{{i}}>{COLOR}) shirt)?")
RELATION = r"left of|right of|in front of|behind"
SIMPLE = re.compile(rf"^the {NP.format(i=1)}$")
RELATIONAL = re.compile(rf"^the {NP.format(i=1)} (?P<relation>{RELATION}) the {NP.format(i=2)}$")
SUPERLATIVE = re.compile(r"^the (?:(?P<word>largest|smallest|leftmost|rightmost) (?P<c1>\w+)|"
                         r"(?P<c2>\w+) (?P<camera>nearest to|farthest from) the camera)$")


def _matching(seen, match, i):
    """Seen objects fitting noun phrase i of a regex match."""
    out = []
    for s in seen:
        o = s.obj
        want = {"size": match[f"size{i}"], "color": match[f"color{i}"] or match[f"shirt{i}"],
                "material": match[f"material{i}"]}
        if o.category == match[f"category{i}"] and all(v is None or getattr(o, k) == v for k, v in want.items()):
            out.append(s)
    return out


def _x_and_depth(s, camera):
    x, _, z = camera.to_camera(s.obj.center_world[None])[0]
    return x / z, z


def _holds(a, relation, b, camera):
    (xa, za), (xb, zb) = _x_and_depth(a, camera), _x_and_depth(b, camera)
    return {"left of": xa < xb - 0.06, "right of": xa > xb + 0.06,
            "in front of": za < zb - 0.35, "behind": za > zb + 0.35}[relation]


def interpret(expression, seen, camera):
    """The objects an expression picks out, read without the generator's code."""
    if m := SIMPLE.match(expression):
        return _matching(seen, m, 1)
    if m := RELATIONAL.match(expression):
        anchors = _matching(seen, m, 2)
        assert len(anchors) == 1, f"ambiguous anchor in {expression!r}"
        return [s for s in _matching(seen, m, 1) if _holds(s, m["relation"], anchors[0], camera)]
    if m := SUPERLATIVE.match(expression):
        category = m["c1"] or m["c2"]
        kind = [s for s in seen if s.obj.category == category]
        key = {"largest": lambda s: -s.obj.volume, "smallest": lambda s: s.obj.volume,
               "leftmost": lambda s: _x_and_depth(s, camera)[0], "rightmost": lambda s: -_x_and_depth(s, camera)[0],
               "nearest to": lambda s: _x_and_depth(s, camera)[1],
               "farthest from": lambda s: -_x_and_depth(s, camera)[1]}[m["word"] or m["camera"]]
        return [min(kind, key=key)] if len(kind) >= 2 else kind
    raise AssertionError(f"expression outside the grammar: {expression!r}")


@pytest.fixture(scope="module")
def scenes():
    world = SimWorld(CONFIG, "train")
    return [world.scene(i) for i in range(12)]


def test_referring_expressions_pick_out_exactly_their_object(scenes):
    kinds = Counter()
    for scene in scenes:
        seen = language.seen_objects(scene.objects, scene.camera, scene.pixel_counts())
        for target in seen:
            for expression in language.referring_expressions(target, seen, random.Random(0), limit=10):
                picked = interpret(expression, seen, scene.camera)
                assert [p.obj.instance_id for p in picked] == [target.obj.instance_id], expression
                kinds["relation" if RELATIONAL.match(expression) else
                      "superlative" if SUPERLATIVE.match(expression) else "attributes"] += 1
    assert min(kinds.values()) >= 5 and len(kinds) == 3, kinds


def _color_shape_pairs(text):
    pattern = rf"\b({COLOR})\b(?: (?:small|large|matte|metal))* ({'|'.join(SHAPES)})s?\b"
    return set(re.findall(pattern, text))


def test_train_and_val_never_show_or_name_held_out_pairs_but_test_always_shows_one():
    assert len(HELD_OUT_COLOR_SHAPE) == 8
    assert {c for c, _ in HELD_OUT_COLOR_SHAPE} == set(COLOR_NAMES)  # every colour still seen with other shapes
    for split in ("train", "val"):
        world = SimWorld(CONFIG, split)
        for index in range(60):
            pairs = {(o.color, o.category) for o in world.layout(index).objects}
            assert not pairs & HELD_OUT_COLOR_SHAPE, (split, index)
        texts = [t.text for i in range(6) for s in world_samples(world, i) for t in s.turns]
        named = set().union(*map(_color_shape_pairs, texts))
        assert named and not named & HELD_OUT_COLOR_SHAPE
    test = SimWorld(CONFIG, "test")
    for index in range(60):
        assert {(o.color, o.category) for o in test.layout(index).objects} & HELD_OUT_COLOR_SHAPE, index
    test_texts = [t.text for i in range(4) for s in world_samples(test, i) for t in s.turns]
    assert set().union(*map(_color_shape_pairs, test_texts)) & HELD_OUT_COLOR_SHAPE


def test_grounded_captions_counts_and_questions_agree_with_the_scene(scenes):
    for k, scene in enumerate(scenes):
        ann = annotations(scene, random.Random(k))
        visible = [o for o in scene.objects if scene.pixel_counts()[o.instance_id] > 0]
        assert len(ann.objects) == len(visible)
        for caption in ann.grounded_captions:
            covered = sorted(i for _, _, indices in caption.spans for i in indices)
            assert covered == list(range(len(ann.objects)))
            for start, end, indices in caption.spans:
                names = {ann.objects[i].name for i in indices}
                assert len(names) == 1
                phrase = caption.text[start:end]
                assert phrase.split()[-1].startswith(next(iter(names)).split()[-1][:4]) or phrase.endswith("people")
        for question, answer in ann.qa:
            if m := re.match(r"How many (\w+) are there\?", question):
                category = {v: k for k, v in language.PLURALS.items()}[m[1]]
                n = sum(o.category == category for o in visible)
                assert answer == f"{language.NUMBER_WORDS[n].capitalize()}."
            if m := re.match(r"Is there a (\w+) (\w+)\?", question):
                present = any((o.color, o.category) == (m[1], m[2]) for o in visible)
                assert answer == ("Yes." if present else "No.")
        assert np.isnan(ann.depth).sum() == np.isinf(scene.depth).sum()


def test_samples_cover_every_task_with_consistent_targets():
    world = SimWorld(SimWorldConfig(seed=2, width=96, height=72, person_probability=0.5), "train")
    tasks = Counter()
    for index in range(3):
        scene = world.scene(index)
        for sample in world_samples(world, index):
            tasks[sample.task] += 1
            assert sample.image.tobytes() == scene.rgb.tobytes()
            for turn in sample.turns[1::2]:
                parsed_blocks = [len(block.refs) for _, block in trp.parse(turn.text).blocks()]
                assert parsed_blocks == [t.count for t in turn.targets]
                for target in turn.targets:
                    if target.masks is not None:
                        for mask in target.masks:
                            ids = np.unique(scene.instance_ids[mask])
                            assert len(ids) == 1 and ids[0] > 0 and np.array_equal(mask, scene.masks(ids[0]))
                    if target.boxes is not None and target.masks is None:
                        assert any(np.array_equal(b, box) for b in target.boxes for box in scene.boxes.values())
    assert set(TASKS) <= set(tasks), set(TASKS) - set(tasks)
    # deterministic language
    assert world_samples(world, 1)[0].turns[1].text == world_samples(world, 1)[0].turns[1].text


def test_write_split_writes_readable_shards(tmp_path):
    summary = write_split("val", 2, tmp_path, CONFIG, progress=False)
    samples = list(read_samples(tmp_path))
    assert summary["scenes"] == 2 and summary["samples"] == len(samples) > 20
    assert sum(summary["per_task"].values()) == len(samples)
    depth_samples = [s for s in samples if s.task == "depth"]
    assert len(depth_samples) == 2 and depth_samples[0].depth.shape == (72, 96)
    scene = SimWorld(CONFIG, "val").scene(0)
    first = next(s for s in samples if s.id.startswith("simworld_val_s5_0000000"))
    assert first.image.tobytes() == scene.rgb.tobytes()


def test_write_split_keeps_only_the_requested_tasks(tmp_path):
    summary = write_split("val", 2, tmp_path, CONFIG, progress=False, tasks=("rec", "depth"), conversations=0)
    assert set(summary["per_task"]) == {"rec", "depth"}
    assert {s.task for s in read_samples(tmp_path)} == {"rec", "depth"}
    with pytest.raises(InputError, match="unknown task.*rec"):
        write_split("val", 1, tmp_path / "bad", CONFIG, progress=False, tasks=("recc",))
