"""Train / val / test splits of SimWorld and the compositional hold-out.

A fixed quarter of the colour x shape pairs (two colours per shape, each colour held
out for exactly one shape) never occurs in train or val scenes: no such object is
placed, so no image, caption or expression of those splits can show or name one
(existence questions pick their colour among the allowed ones too). Every test scene
holds at least one such object and about half its rigid objects are such pairs. Each
colour and each shape still occurs in train, only not in those pairs: test measures
compositional generalisation.
"""
from __future__ import annotations

import numpy as np

from refvlm_core.errors import InputError

SPLITS = ("train", "val", "test")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

COLORS = {  # linear RGB albedo
    "red": (0.80, 0.10, 0.08),
    "green": (0.12, 0.60, 0.16),
    "blue": (0.10, 0.25, 0.85),
    "yellow": (0.92, 0.78, 0.10),
    "purple": (0.45, 0.15, 0.65),
    "cyan": (0.10, 0.72, 0.78),
    "orange": (0.95, 0.42, 0.05),
    "gray": (0.45, 0.45, 0.45),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("cube", "sphere", "cylinder", "cone")


def _held_out_pairs() -> frozenset[tuple[str, str]]:
    pairs = set()
    for s, shape in enumerate(SHAPES):  # colours 2s and 2s+5 (mod 8): a bijection onto colours
        for c in (2 * s, 2 * s + 5):
            pairs.add((COLOR_NAMES[c % len(COLOR_NAMES)], shape))
    return frozenset(pairs)


HELD_OUT_COLOR_SHAPE: frozenset[tuple[str, str]] = _held_out_pairs()
SEEN_COLOR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    (c, s) for c in COLOR_NAMES for s in SHAPES) - HELD_OUT_COLOR_SHAPE


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown SimWorld split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene: a pure function of (seed, split, index)."""
    if index < 0:
        raise InputError(f"scene index must be >= 0, got {index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[check_split(split)], int(index)]))


def allowed_colors(split: str, shape: str) -> list[str]:
    """Colours a new object of ``shape`` may take in ``split`` (people: every colour)."""
    if shape not in SHAPES or split == "test":
        return list(COLOR_NAMES)
    return [c for c in COLOR_NAMES if (c, shape) not in HELD_OUT_COLOR_SHAPE]


def held_out_color(shape: str, rng: np.random.Generator) -> str:
    """A colour that makes ``shape`` one of the held-out pairs."""
    choices = sorted(c for c, s in HELD_OUT_COLOR_SHAPE if s == shape)
    return choices[int(rng.integers(len(choices)))]
