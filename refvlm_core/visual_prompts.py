"""Visual prompts a user gives with a question: point, box, scribble or mask.

Coordinates are in original image pixels (x right, y down). ``rasterize`` turns a
prompt into a mask at any resolution; the model pools image features under it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPT_KINDS = ("point", "box", "scribble", "mask")


@dataclass
class VisualPrompt:
    kind: str                    # one of PROMPT_KINDS
    points: np.ndarray | None = None  # point: [1, 2]; box: [2, 2] (x0,y0),(x1,y1); scribble: [N, 2]
    mask: np.ndarray | None = None    # mask: [H, W] bool at image resolution
