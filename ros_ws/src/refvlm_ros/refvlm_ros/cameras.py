"""Several cameras on one model: one node (one model in memory) serves every camera of
a robot instead of one node per camera.

The node's ``cameras`` parameter names the cameras by namespace ("front,left,right").
Each camera subscribes to the node's image / depth / camera_info topics under its
namespace (``front/image`` ...; absolute topics stay as they are), publishes its answers
under ``~/<camera>/`` (``~/front/result`` ...) with its own images' headers, keeps its
own latest frame, depth, CameraInfo and track IDs. The standing prompt runs on the
cameras' frames in turn (round robin over the cameras with a new frame), so a fast
camera cannot starve a slow one; ``rate_hz`` bounds the model's total rate. A Query
names its camera (``camera``; empty = the first). Without ``cameras`` there is one
camera on the node's own topics and outputs, as before. No ROS imports.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from refvlm_core.errors import ConfigError, InputError
from refvlm_ros.frames import FrameSlot, StampedBuffer

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")  # a ROS namespace


def parse_camera_names(value: str) -> list[str]:
    """The ``cameras`` parameter ("front, left,/right") -> ["front", "left", "right"];
    [""] (one camera on the node's own topics) when empty. ConfigError when invalid."""
    names = [part.strip().strip("/") for part in value.split(",") if part.strip().strip("/")]
    for name in names:
        if not NAME.match(name):
            raise ConfigError(f"cameras: {name!r} is not a ROS namespace (letters, digits, _ and /, "
                              "not starting with a digit)")
    if len(set(names)) != len(names):
        raise ConfigError(f"cameras={value!r} names a camera twice")
    return names or [""]


@dataclass
class CameraStream:
    """One camera's inputs (latest frame, depth for stamp pairing, CameraInfo), its
    tracker and its output publishers."""

    name: str                                   # "" = the node's own topics
    frames: FrameSlot = field(default_factory=FrameSlot)
    depths: StampedBuffer = field(default_factory=StampedBuffer)
    info: Any = None                            # latest CameraInfo
    tracker: Any = None                         # tracking.Tracker, when tracking is on
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or "default"

    def topic(self, topic: str) -> str:
        """An input topic of this camera (relative topics move under its namespace)."""
        return f"{self.name}/{topic}" if self.name and not topic.startswith("/") else topic

    def output(self, topic: str) -> str:
        """An output topic of this camera, under the node's private namespace."""
        return f"~/{self.name}/{topic}" if self.name else f"~/{topic}"


class Cameras:
    """The node's cameras and the fair hand-over of their frames to the one worker."""

    def __init__(self, names: list[str]) -> None:
        self.streams = [CameraStream(name) for name in names]
        self._arrived = threading.Event()
        self._next = 0  # the camera whose turn is next (only the worker takes frames)

    def get(self, name: str) -> CameraStream:
        """The camera named ``name`` (empty: the first). InputError names the cameras."""
        if not name.strip("/"):
            return self.streams[0]
        for stream in self.streams:
            if stream.name == name.strip("/"):
                return stream
        raise InputError(f"no camera {name!r} on this node; its cameras: "
                         f"{[s.label for s in self.streams]} (empty = {self.streams[0].label})")

    def put(self, stream: CameraStream, frame: Any) -> None:
        stream.frames.put(frame)
        self._arrived.set()

    def take(self, timeout: float) -> tuple[CameraStream, Any] | None:
        """The next pending frame in round-robin order (every camera with a new frame has
        its turn before any has a second), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self._arrived.clear()  # before looking: a frame put after this sets it again
            count = len(self.streams)
            for k in range(count):
                stream = self.streams[(self._next + k) % count]
                frame = stream.frames.take(timeout=0.0)
                if frame is not None:
                    self._next = (self._next + k + 1) % count
                    return stream, frame
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._arrived.wait(remaining):
                return None

    def clear(self) -> None:
        for stream in self.streams:
            stream.frames.clear()
            stream.depths.clear()

    def counts(self) -> dict[str, int]:
        """Frames received and dropped over all cameras (/diagnostics)."""
        return {"received": sum(s.frames.received for s in self.streams),
                "dropped": sum(s.frames.dropped for s in self.streams)}
