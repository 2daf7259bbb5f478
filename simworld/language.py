"""Language about a rendered SimWorld scene: object names with attributes, spatial
relations seen from the camera, referring expressions that pick out exactly one
object, captions, grounded captions and question-answer pairs.

Relations are judged in the camera frame with margins, so an expression is only made
when it is clearly true; uniqueness is checked against every visible object.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import combinations


from .camera import Camera
from .splits import SHAPES, allowed_colors
from .world import SceneObject

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
PLURALS = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders", "cone": "cones", "person": "people"}
ATTRIBUTE_ORDER = ("size", "color", "material")
LEFT_RIGHT_MARGIN = 0.06   # normalised image x (x / z) between centres
FRONT_BACK_MARGIN = 0.35   # metres of camera depth between centres
SUPERLATIVE_RATIO = 1.25   # "largest" only when 25 % larger than the runner-up


@dataclass
class Seen:
    """An object as the camera sees it."""

    obj: SceneObject
    image_x: float   # x / z of its centre in the camera frame (left < right)
    depth: float     # camera Z of its centre (metres)
    pixels: int


def seen_objects(objects: list[SceneObject], camera: Camera, pixel_counts: dict[int, int]) -> list[Seen]:
    """Objects with at least one visible pixel, in instance-id order."""
    out = []
    for obj in objects:
        if pixel_counts.get(obj.instance_id, 0) > 0:
            x, _, z = camera.to_camera(obj.center_world[None])[0]
            out.append(Seen(obj, float(x / z), float(z), pixel_counts[obj.instance_id]))
    return out


# ------------------------------------------------------------------ names

def attribute_value(obj: SceneObject, attribute: str) -> str:
    return {"size": obj.size, "color": obj.color, "material": obj.material}[attribute]


def noun_phrase(obj: SceneObject, attributes: tuple[str, ...] = ATTRIBUTE_ORDER, plural: bool = False) -> str:
    """"small red metal cube"; people: "small person in a red shirt"."""
    noun = PLURALS[obj.category] if plural else obj.category
    if obj.category == "person":
        words = [obj.size] if "size" in attributes else []
        tail = f" in {'' if plural else 'a '}{obj.color} shirt{'s' if plural else ''}" if "color" in attributes else ""
        return " ".join(words + [noun]) + tail
    words = [attribute_value(obj, a) for a in ATTRIBUTE_ORDER if a in attributes]
    return " ".join(words + [noun])


def short_name(obj: SceneObject) -> str:
    """The name used for detection and grounding: "red cube", "person"."""
    return "person" if obj.category == "person" else f"{obj.color} {obj.category}"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def count_phrase(n: int, singular: str, plural: str) -> str:
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {singular if n == 1 else plural}"


def _matches(obj: SceneObject, target: SceneObject, attributes: tuple[str, ...]) -> bool:
    return obj.category == target.category and all(
        attribute_value(obj, a) == attribute_value(target, a) for a in attributes)


def minimal_attributes(target: Seen, seen: list[Seen]) -> tuple[str, ...] | None:
    """The fewest attributes that single the target out among the seen objects."""
    for k in range(len(ATTRIBUTE_ORDER) + 1):
        for attributes in combinations(ATTRIBUTE_ORDER, k):
            if sum(_matches(s.obj, target.obj, attributes) for s in seen) == 1:
                return attributes
    return None


# ------------------------------------------------------------------ relations

RELATIONS = ("left of", "right of", "in front of", "behind")
OPPOSITE = {"left of": "right of", "right of": "left of", "in front of": "behind", "behind": "in front of"}


def relation_holds(a: Seen, relation: str, b: Seen) -> bool:
    if relation == "left of":
        return a.image_x < b.image_x - LEFT_RIGHT_MARGIN
    if relation == "right of":
        return a.image_x > b.image_x + LEFT_RIGHT_MARGIN
    if relation == "in front of":
        return a.depth < b.depth - FRONT_BACK_MARGIN
    return a.depth > b.depth + FRONT_BACK_MARGIN


def relational_expressions(target: Seen, seen: list[Seen]) -> list[str]:
    """"the red cube left of the blue cylinder": unique only with the relation."""
    out = []
    for anchor in seen:
        anchor_attributes = minimal_attributes(anchor, seen)
        if anchor is target or anchor_attributes is None:
            continue
        for relation in RELATIONS:
            if not relation_holds(target, relation, anchor):
                continue
            for k in range(len(ATTRIBUTE_ORDER)):
                attributes = next((a for a in combinations(ATTRIBUTE_ORDER, k)
                                   if sum(_matches(s.obj, target.obj, a) and relation_holds(s, relation, anchor)
                                          for s in seen) == 1), None)
                if attributes is not None:
                    out.append(f"the {noun_phrase(target.obj, attributes)} {relation} "
                               f"the {noun_phrase(anchor.obj, anchor_attributes)}")
                    break
    return out


SUPERLATIVES = {  # word -> (key, largest-wins)
    "largest": (lambda s: s.obj.volume, True),
    "smallest": (lambda s: s.obj.volume, False),
    "nearest to the camera": (lambda s: s.depth, False),
    "farthest from the camera": (lambda s: s.depth, True),
    "leftmost": (lambda s: s.image_x, False),
    "rightmost": (lambda s: s.image_x, True),
}


def expression_kind(phrase: str) -> str:
    """Which kind of referring expression ``phrase`` is: "relation" ("the cube left of the
    sphere"), "superlative" ("the largest cone") or "attribute" ("the red metal cube")."""
    padded = f" {phrase.lower()} "
    if any(f" {relation} " in padded for relation in RELATIONS):
        return "relation"
    if any(f" {word} " in padded for word in SUPERLATIVES):
        return "superlative"
    return "attribute"


def superlative_expressions(target: Seen, seen: list[Seen]) -> list[str]:
    """"the largest sphere", "the cube nearest to the camera" among >= 2 of its kind."""
    kind = [s for s in seen if s.obj.category == target.obj.category]
    if len(kind) < 2:
        return []
    out = []
    noun = target.obj.category
    for word, (key, high) in SUPERLATIVES.items():
        values = sorted((key(s) for s in kind), reverse=high)
        if key(target) != values[0] or not _clear_winner(word, values[0], values[1]):
            continue
        out.append(f"the {noun} {word}" if word.endswith("camera") else f"the {word} {noun}")
    return out


def _clear_winner(word: str, best: float, runner_up: float) -> bool:
    if word in ("largest", "smallest"):
        low, high = sorted((best, runner_up))
        return high > SUPERLATIVE_RATIO * low
    margin = FRONT_BACK_MARGIN if "camera" in word else LEFT_RIGHT_MARGIN
    return abs(best - runner_up) > margin


def referring_expressions(target: Seen, seen: list[Seen], rng: random.Random, limit: int = 3) -> list[str]:
    """Up to ``limit`` distinct expressions that each pick out exactly the target."""
    out = []
    attributes = minimal_attributes(target, seen)
    if attributes is not None:
        out.append(f"the {noun_phrase(target.obj, attributes)}")
        full = f"the {noun_phrase(target.obj)}"
        if full not in out:
            out.append(full)
    extra = superlative_expressions(target, seen) + relational_expressions(target, seen)
    rng.shuffle(extra)
    out += extra
    chosen = out[:1] + rng.sample(out[1:], min(limit - 1, len(out) - 1)) if out else []
    return chosen


# ------------------------------------------------------------------ pose words

def pose_words(obj: SceneObject) -> str:
    """"raising both arms" etc. from the keypoints of a person; "" when unremarkable."""
    k = obj.keypoints_world
    raised = [k[9 + i, 2] > k[5 + i, 2] + 0.05 for i in range(2)]
    if all(raised):
        return "raising both arms"
    if any(raised):
        return f"raising the {'left' if raised[0] else 'right'} arm"
    return ""


def description(target: Seen) -> str:
    """Region description (REG answer)."""
    phrase = with_article(noun_phrase(target.obj))
    if target.obj.category == "person":
        pose = pose_words(target.obj)
        return f"{phrase} {pose}".strip() if pose else phrase
    return phrase


# ------------------------------------------------------------------ captions

def grouped(seen: list[Seen]) -> list[tuple[str, list[int]]]:
    """Seen objects grouped by short name: [(name, indices into seen)], first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(seen):
        groups.setdefault(short_name(s.obj), []).append(i)
    return list(groups.items())


def _plural_name(name: str) -> str:
    head, _, last = name.rpartition(" ")
    return f"{head} {PLURALS[last]}".strip()


def grounded_caption(seen: list[Seen], rng: random.Random) -> tuple[str, list[tuple[int, int, list[int]]]]:
    """A caption naming every group of objects, with spans (start, end, indices into seen)."""
    groups = grouped(seen)
    rng.shuffle(groups)
    text = rng.choice(("The scene shows ", "In this room there are ", "On the checkered floor stand ",
                       "The picture contains "))
    spans = []
    for g, (name, indices) in enumerate(groups):
        if g:
            text += " and " if g == len(groups) - 1 else ", "
        n = len(indices)
        phrase = name if n == 1 else _plural_name(name)
        text += with_article(phrase)[:-len(phrase)] if n == 1 else f"{NUMBER_WORDS[min(n, 12)]} "
        spans.append((len(text), len(text) + len(phrase), list(indices)))
        text += phrase
    return text + rng.choice((".", " in front of a wall.", ", lit from one side.")), spans


def captions(seen: list[Seen], rng: random.Random) -> list[str]:
    """Two captions: one listing the objects with attributes, one with a relation."""
    if not seen:
        return ["An empty room with a checkered floor and a plain wall."]
    names = [with_article(noun_phrase(s.obj)) for s in seen]
    rng.shuffle(names)
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    out = [f"{count_phrase(len(seen), 'object', 'objects').capitalize()} on a checkered floor: {listing}."]
    pairs = [(a, r, b) for a in seen for b in seen if a is not b for r in RELATIONS[:3] if relation_holds(a, r, b)]
    if pairs:
        a, relation, b = rng.choice(pairs)
        verb = "stands" if a.obj.category != "person" else "is standing"
        out.append(f"{with_article(noun_phrase(a.obj)).capitalize()} {verb} {relation} "
                   f"{with_article(noun_phrase(b.obj))}.")
    return out


# ------------------------------------------------------------------ questions

def questions(seen: list[Seen], split: str, rng: random.Random) -> list[tuple[str, str]]:
    """Counting, attribute, existence and relation questions with short answers."""
    qa = []
    category = rng.choice(SHAPES + ("person",))
    n = sum(s.obj.category == category for s in seen)
    qa.append((f"How many {PLURALS[category]} are there?", f"{NUMBER_WORDS[n].capitalize()}."))
    targets = [(s, minimal_attributes(s, seen)) for s in seen]
    targets = [(s, a) for s, a in targets if a is not None]
    if targets:
        s, attributes = rng.choice(targets)
        ref = noun_phrase(s.obj, attributes)
        if "color" not in attributes:
            qa.append((f"What colour is the {ref}?", f"{s.obj.color.capitalize()}."))
        if s.obj.category != "person" and "material" not in attributes:
            qa.append((f"What is the {ref} made of?", "Metal." if s.obj.material == "metal" else "Matte rubber."))
        if s.obj.category != "person" and "size" not in attributes:
            qa.append((f"Is the {ref} small or large?", f"{s.obj.size.capitalize()}."))
    shape = rng.choice(SHAPES)
    color = rng.choice(allowed_colors(split, shape))  # never names a held-out pair outside test
    present = any(s.obj.category == shape and s.obj.color == color for s in seen)
    qa.append((f"Is there a {color} {shape}?", "Yes." if present else "No."))
    if len(targets) >= 2:
        (a, attr_a), (b, attr_b) = rng.sample(targets, 2)
        relation = rng.choice(RELATIONS)
        # Ask only when the relation or its opposite clearly holds, so "No." is never a guess.
        if relation_holds(a, relation, b) or relation_holds(a, OPPOSITE[relation], b):
            answer = "Yes." if relation_holds(a, relation, b) else "No."
            qa.append((f"Is the {noun_phrase(a.obj, attr_a)} {relation} the {noun_phrase(b.obj, attr_b)}?", answer))
    return qa
