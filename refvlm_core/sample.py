"""In-memory training/evaluation sample: what the data pipeline yields and what the
model's processor consumes. Serialisation (JSON lines, RLE, shards) lives in
refvlm_training; this module only fixes the shapes and coordinate frames.

All geometry here is in ORIGINAL image pixels; the processor letterboxes it into the
model frame (refvlm_core.geometry).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refvlm_core.visual_prompts import VisualPrompt


@dataclass
class RefTarget:
    """Ground truth for one unit block of an assistant answer.

    ``<Phrase>dogs</Phrase> (<Unit>box</Unit>[0]<REF>[1]<REF>)`` is one RefTarget with
    phrase "dogs", units ("box",) and two instances. Its instances are matched to those
    two <REF>s by grouped Hungarian matching, so their order does not matter.
    """

    phrase: str
    units: tuple[str, ...]               # e.g. ("box",) or ("box", "keypoint")
    boxes: np.ndarray | None = None      # [M, 4] float32 xyxy pixels
    masks: np.ndarray | None = None      # [M, H, W] bool
    keypoints: np.ndarray | None = None  # [M, 17, 3] float32: x, y pixels, v (0 absent, 1 occluded, 2 visible)

    @property
    def count(self) -> int:
        """Number of instances (= number of <REF>s of this block)."""
        for array in (self.boxes, self.masks, self.keypoints):
            if array is not None:
                return int(array.shape[0])
        return 1  # a depth block refers to the whole image once


@dataclass
class Turn:
    role: str                 # "user" or "assistant"
    text: str                 # user: may hold <image>/<region>; assistant: TRP from refvlm_core.trp
    targets: list[RefTarget] = field(default_factory=list)  # assistant: one per unit block, in text order


@dataclass
class Sample:
    id: str
    image: np.ndarray                     # [H, W, 3] uint8 RGB
    turns: list[Turn]
    task: str                             # e.g. "rec", "res", "gcg_box", "depth"
    visual_prompts: list[VisualPrompt] = field(default_factory=list)  # one per <region>, in order
    depth: np.ndarray | None = None       # [H, W] float32 metres along camera Z, NaN unknown (REP-118)
    system: str | None = None             # system instruction of the task
