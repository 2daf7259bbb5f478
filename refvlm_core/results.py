"""What the Predictor returns: the answer and everything it referred to, in ORIGINAL
image pixels. JSON-serialisable (masks and depth as RLE/summary in JSON)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReferredObject:
    """One <REF> of the answer, decoded by every unit of its <Unit> block."""

    phrase: str
    units: tuple[str, ...]
    instance_index: int                 # the [i] before its <REF>
    ref_ordinal: int                    # position among all <REF>s of the answer
    ref_span: tuple[int, int]           # character span of the <REF> in Result.trp_text
    score: float | None = None
    box_xyxy: np.ndarray | None = None  # [4] float pixels
    mask: np.ndarray | None = None      # [H, W] bool
    keypoints: np.ndarray | None = None # [17, 3]: x, y pixels, visibility probability
    depth: np.ndarray | None = None     # [H, W] float32 metres, NaN unknown


@dataclass
class Result:
    prompt: str
    answer: str                         # display text, tags removed
    trp_text: str                       # raw model output
    image_size: tuple[int, int]         # (height, width)
    objects: list[ReferredObject] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    errors: list[str] = field(default_factory=list)          # TRP parse or decoding problems
