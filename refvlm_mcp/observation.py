"""What the server works with, whichever mode produced it: a camera frame, and an
answer about one (its referred objects in pixels, with 3D positions where depth was
there). Both perception modes fill these; the tools only read them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np


class PerceptionError(Exception):
    """A failure the agent can act on (its message says what to do). ``retry_after_s``
    is set when asking again later is the remedy (a busy node, a frame not there yet)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Frame:
    """One camera image; ``rgb()`` converts it when needed ([H, W, 3] uint8)."""

    rgb: Callable[[], np.ndarray]
    width: int
    height: int
    stamp_s: float
    frame_id: str
    camera: str


@dataclass
class Found:
    """One referred object (one <REF> of the answer), pixels x right, y down."""

    phrase: str
    units: tuple[str, ...]
    score: float | None = None
    box_xyxy: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None                 # [H, W] bool
    keypoints: list[tuple[str, float, float, float]] = field(default_factory=list)  # name, x, y, visibility
    depth_median_m: float | None = None            # the model's own depth unit, over the object
    position: tuple[float, float, float] | None = None  # metres, in position_frame
    position_frame: str = ""
    position_status: str = ""                       # why there is no position
    track_id: str | None = None


@dataclass
class Observation:
    """The answer to one prompt about one frame."""

    prompt: str
    answer: str                  # display text, TRP tags removed
    trp_text: str                # the model's raw answer
    objects: list[Found]
    width: int
    height: int
    stamp_s: float
    frame_id: str
    camera: str
    model_ms: float | None = None        # the node's (or the Predictor's) own time for it
    errors: list[str] = field(default_factory=list)
    frame: Frame | None = None           # the image it is about, when still at hand


class Perception(Protocol):
    """What the server needs from a mode (ROS or library)."""

    mode: str

    def ask(self, prompt: str, camera: str | None) -> Observation: ...

    def latest_frame(self, camera: str | None) -> Frame: ...

    def cameras(self) -> list[dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
