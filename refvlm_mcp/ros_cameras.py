"""ROS mode's view of the node's cameras: the topics each camera's images, depth and
CameraInfo arrive on, read from the node's own subscriptions (so remappings and
namespaces are already applied), and each camera's recent frames for look. Plain Python
but for the messages it is handed."""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

DEFAULT_CAMERA = "default"  # the name of a node's only (or first) camera, as the node labels it
KEEP_FRAMES = 8             # recent frames kept so look can draw an answer on its own frame


def stamp_s(header: Any) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def camera_topics(subscriptions: list[tuple[str, list[str]]], camera: str = "") -> dict[str, str | None]:
    """The node's subscriptions [(topic, [types])] -> the image, depth and CameraInfo topics of
    ``camera`` (a camera namespace of a node with several, under which its topics are; "" for
    a node's only camera). The image is an Image topic without 'depth' in its name, or a
    CompressedImage; None where there is none."""
    found: dict[str, str | None] = {"image": None, "depth": None, "camera_info": None}
    for topic, types in subscriptions:
        if camera and f"/{camera.strip('/')}/" not in topic:
            continue
        if "sensor_msgs/msg/CameraInfo" in types:
            found["camera_info"] = topic
        elif "sensor_msgs/msg/Image" in types:
            found["depth" if "depth" in topic.lower() else "image"] = topic
        elif "sensor_msgs/msg/CompressedImage" in types and found["image"] is None:
            found["image"] = topic
    return found


class CameraFeed:
    """The last KEEP_FRAMES images of one camera (its subscription's callback is ``put``)."""

    def __init__(self, name: str, topic: str) -> None:
        self.name, self.topic = name, topic
        self._frames: deque = deque(maxlen=KEEP_FRAMES)
        self._lock = threading.Lock()

    def put(self, msg: Any) -> None:
        with self._lock:
            self._frames.append(msg)

    def latest(self) -> Any | None:
        with self._lock:
            return self._frames[-1] if self._frames else None

    def at(self, stamp: float) -> Any | None:
        """The frame with this stamp, if still kept."""
        with self._lock:
            return next((m for m in reversed(self._frames) if abs(stamp_s(m.header) - stamp) < 1e-6), None)
