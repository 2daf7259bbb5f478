"""3D answers in the robot's frame: objects' camera-frame positions -> ``target_frame``
through tf2, at the stamp of the image they were seen in.

A robot grasps in ``base_link`` or ``map``, not in the camera's optical frame. When the
node's ``target_frame`` parameter is set, every answer's positions are moved there
(``RefResult.position_frame`` names it, ``RefResult.camera_orientation`` is the camera's
rotation in it, which orients the objects' extent). When the transform is missing or
too old (not available within ``transform_timeout_s`` at the image's stamp), the answer
still comes: its objects have ``has_position=false`` and a ``position_status`` that
names both frames and tf2's reason; never a camera-frame value labelled as the target's,
never a hang. /diagnostics counts the failures and carries the last one.

tf2 (``tf2_ros``) is imported only when a target frame is set: a node that answers in
the camera frame runs without it.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
from geometry_msgs.msg import Point, Quaternion


def quaternion_matrix(q: Any) -> np.ndarray:
    """geometry_msgs Quaternion (x, y, z, w) -> rotation matrix [3, 3]."""
    x, y, z, w = q.x, q.y, q.z, q.w
    n = x * x + y * y + z * z + w * w
    s = 2.0 / n if n > 0.0 else 0.0
    return np.array([
        [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
        [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
        [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
    ])


def matrix_quaternion(rotation: np.ndarray) -> tuple[float, float, float, float]:
    """Rotation matrix [3, 3] -> quaternion (x, y, z, w), w >= 0."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0.0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = ((m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s)
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i], q[j], q[k] = 0.25 * s, (m[j, i] + m[i, j]) / s, (m[k, i] + m[i, k]) / s
    x, y, z, w = (float(v) for v in q)
    return (-x, -y, -z, -w) if w < 0 else (x, y, z, w)


def transform_msg(parent: str, child: str, stamp: Any, pose: np.ndarray) -> Any:
    """geometry_msgs/TransformStamped of ``child`` in ``parent`` (pose: parent-from-child [4, 4])."""
    from geometry_msgs.msg import TransformStamped  # noqa: PLC0415

    out = TransformStamped()
    out.header.stamp, out.header.frame_id, out.child_frame_id = stamp, parent, child
    out.transform.translation.x, out.transform.translation.y, out.transform.translation.z = (
        float(v) for v in pose[:3, 3])
    r = out.transform.rotation
    r.x, r.y, r.z, r.w = matrix_quaternion(pose[:3, :3])
    return out


def apply_transform(msg: Any, transform: Any, target_frame: str) -> None:
    """Moves ``msg``'s (RefResult) object positions by ``transform`` (geometry_msgs
    Transform: target-from-camera), in place."""
    rotation = quaternion_matrix(transform.rotation)
    t = transform.translation
    translation = np.array([t.x, t.y, t.z])
    for obj in msg.objects:
        if obj.has_position:
            p = rotation @ np.array([obj.position.x, obj.position.y, obj.position.z]) + translation
            obj.position = Point(x=float(p[0]), y=float(p[1]), z=float(p[2]))
    msg.position_frame = target_frame
    r = transform.rotation
    msg.camera_orientation = Quaternion(x=r.x, y=r.y, z=r.z, w=r.w)


def refuse_positions(msg: Any, target_frame: str, reason: str) -> None:
    """No transform: objects keep their answer but lose their (camera-frame) position."""
    for obj in msg.objects:
        if obj.has_position:
            obj.has_position = False
            obj.position = Point()
            obj.position_status = reason
    msg.position_frame = target_frame


class TargetFrame:
    """tf2 Buffer + TransformListener on the node (its executor delivers /tf and
    /tf_static) and the lookups that move answers into ``target_frame``."""

    def __init__(self, node: Any, target_frame: str, timeout_s: float) -> None:
        import tf2_ros  # noqa: PLC0415 (only nodes with a target frame need tf2)
        from rclpy.duration import Duration  # noqa: PLC0415

        self.target_frame = target_frame
        self._timeout = Duration(seconds=timeout_s)
        self._errors = (tf2_ros.TransformException,)
        self.buffer = tf2_ros.Buffer(node=node)
        self._listener = tf2_ros.TransformListener(self.buffer, node, spin_thread=False)
        self._lock = threading.Lock()
        self.lookups = 0
        self.failures = 0
        self.last_error = ""

    def apply(self, msg: Any) -> None:
        """``msg`` (RefResult, header = its image's) with positions in the target frame,
        or without positions and with the reason when the transform is not there."""
        from rclpy.time import Time  # noqa: PLC0415

        source = msg.header.frame_id
        if not any(obj.has_position for obj in msg.objects):
            msg.position_frame = self.target_frame
            return
        stamp = msg.header.stamp
        when = f"{stamp.sec}.{stamp.nanosec:09d}"
        if not source:
            error = (f"no transform to '{self.target_frame}': the image's header has no frame_id; "
                     "publish images with their camera's frame")
            transform = None
        else:
            try:
                transform = self.buffer.lookup_transform(self.target_frame, source, Time.from_msg(stamp),
                                                         timeout=self._timeout).transform
                error = ""
            except self._errors as failure:
                transform = None
                error = (f"no transform from '{source}' to '{self.target_frame}' at t={when} within "
                         f"{self._timeout.nanoseconds * 1e-9:g} s (transform_timeout_s): "
                         f"{type(failure).__name__}: {failure}")
        with self._lock:
            self.lookups += 1
            if transform is None:
                self.failures += 1
                self.last_error = error
            else:
                self.last_error = ""
        if transform is None:
            refuse_positions(msg, self.target_frame, error)
        else:
            apply_transform(msg, transform, self.target_frame)

    def diagnostics(self) -> dict[str, str]:
        with self._lock:
            return {"target_frame": self.target_frame, "transform_lookups": str(self.lookups),
                    "transform_failures": str(self.failures), "last_transform_error": self.last_error}

    def close(self) -> None:
        self._listener.unregister()
