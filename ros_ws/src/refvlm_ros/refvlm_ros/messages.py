"""refvlm_core results <-> ROS messages (refvlm_interfaces, vision_msgs, sensor_msgs).

Every output message takes the source image's header. 3D fields come from
``localization`` when aligned depth and CameraInfo are at hand; vision_msgs is
optional at run time (``vision_msgs_available``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from geometry_msgs.msg import Point, Vector3

from refvlm_core.errors import InputError
from refvlm_core.results import ReferredObject, Result
from refvlm_core.visual_prompts import VisualPrompt
from refvlm_interfaces.msg import ReferredObject as ReferredObjectMsg
from refvlm_interfaces.msg import RefResult, UnitOutput
from refvlm_interfaces.msg import VisualPrompt as VisualPromptMsg
from refvlm_ros.image_conversions import array_to_image, image_to_array
from refvlm_ros.localization import Intrinsics, LocalizationConfig, box_region, keypoint_box, localize

# COCO-17 order, the keypoint decoder's output order.
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)


@dataclass
class DepthContext:
    """Aligned depth [H, W] float32 metres (NaN unknown) + intrinsics of that image, or
    why there are none (``unavailable``): then objects get no 3D, the answer still stands."""

    depth: np.ndarray | None
    intrinsics: Intrinsics | None
    unavailable: str = ""

    @classmethod
    def missing(cls, reason: str) -> "DepthContext":
        return cls(None, None, reason)


# ---- visual prompts in --------------------------------------------------------------

def visual_prompt_from_msg(msg: Any, backend: str | None = None) -> VisualPrompt:
    """refvlm_interfaces/VisualPrompt -> refvlm_core VisualPrompt (validated later, per image)."""
    kind = msg.kind
    if kind == VisualPromptMsg.KIND_MASK:
        return VisualPrompt.from_mask(image_to_array(msg.mask, backend=backend))
    if kind not in (VisualPromptMsg.KIND_POINT, VisualPromptMsg.KIND_BOX, VisualPromptMsg.KIND_SCRIBBLE):
        raise InputError(f"unknown visual prompt kind {kind!r}; use point, box, scribble or mask")
    points = np.array([[p.x, p.y] for p in msg.points], dtype=np.float32).reshape(-1, 2)  # [N, 2]
    if kind == VisualPromptMsg.KIND_BOX:
        if len(points) != 2:
            raise InputError(f"a box prompt needs 2 corner points, got {len(points)}")
        return VisualPrompt.box(*points[0], *points[1])
    return VisualPrompt(kind, points=points)


# ---- results out --------------------------------------------------------------------

def _object_region(obj: ReferredObject, shape: tuple[int, int]) -> np.ndarray | None:
    """[H, W] bool: where the object is (its mask unless empty, else the centre of its box,
    else the centre of its seen keypoints' box)."""
    if obj.mask is not None and np.any(obj.mask):
        return np.asarray(obj.mask, dtype=bool)
    if obj.box_xyxy is not None:
        return box_region(obj.box_xyxy, shape)
    skeleton = keypoint_box(np.asarray(obj.keypoints, dtype=np.float64)) if obj.keypoints is not None else None
    return box_region(skeleton, shape) if skeleton is not None else None


def _set_depth_stats(out: ReferredObjectMsg, values: np.ndarray) -> None:
    values = values[np.isfinite(values)]
    if values.size:
        out.has_depth = True
        out.depth_median, out.depth_min, out.depth_max = (
            float(np.median(values)), float(values.min()), float(values.max()))


def _set_location(out: ReferredObjectMsg, region: np.ndarray | None, context: DepthContext | None,
                  config: LocalizationConfig) -> None:
    if context is None:
        out.position_status = "no aligned depth and CameraInfo for this image"
        return
    if context.unavailable:
        out.position_status = context.unavailable
        return
    if region is None:
        out.position_status = "the object has no mask, no box and fewer than 2 keypoints seen"
        return
    location, reason = localize(region, context.depth, context.intrinsics, config)
    if location is None:
        out.position_status = reason
        return
    out.has_position = True
    out.position = Point(x=float(location.position[0]), y=float(location.position[1]),
                         z=float(location.position[2]))
    out.extent = Vector3(x=float(location.extent[0]), y=float(location.extent[1]),
                         z=float(location.extent[2]))
    out.position_pixels = location.pixels
    if not out.has_depth:  # sensor depth statistics when the model predicted none
        out.has_depth = True
        out.depth_median, out.depth_min, out.depth_max = (
            location.depth_median, location.depth_min, location.depth_max)


def object_to_msg(obj: ReferredObject, image_hw: tuple[int, int], context: DepthContext | None,
                  config: LocalizationConfig, header: Any) -> ReferredObjectMsg:
    out = ReferredObjectMsg()
    out.phrase = obj.phrase
    out.units = list(obj.units)
    out.instance_index, out.ref_ordinal = int(obj.instance_index), int(obj.ref_ordinal)
    out.ref_span_start, out.ref_span_end = int(obj.ref_span[0]), int(obj.ref_span[1])
    out.score = float("nan") if obj.score is None else float(obj.score)
    if obj.box_xyxy is not None:
        out.has_box = True
        out.box_xyxy = np.asarray(obj.box_xyxy, dtype=np.float64).reshape(4)
    if obj.mask is not None:
        out.mask = array_to_image(np.asarray(obj.mask, bool).astype(np.uint8) * 255, "mono8", header)
    if obj.keypoints is not None:
        kp = np.asarray(obj.keypoints, dtype=np.float32)  # [K, 3]: x, y, visibility
        out.keypoint_names = list(KEYPOINT_NAMES) if len(kp) == len(KEYPOINT_NAMES) \
            else [str(i) for i in range(len(kp))]
        out.keypoint_x, out.keypoint_y, out.keypoint_visibility = (
            kp[:, 0].tolist(), kp[:, 1].tolist(), kp[:, 2].tolist())
    out.outputs = [unit_output(name, value) for name, value in obj.outputs.items()]
    region = _object_region(obj, image_hw)
    if obj.depth is not None:  # the model's own depth unit
        depth = np.asarray(obj.depth, np.float32)
        _set_depth_stats(out, depth[region] if region is not None and region.shape == depth.shape
                         else depth.ravel())
    _set_location(out, region, context, config)
    return out


def unit_output(name: str, value: np.ndarray) -> UnitOutput:
    """A plug-in unit's output array -> UnitOutput (name, shape, row-major values)."""
    value = np.asarray(value, dtype=np.float64)
    return UnitOutput(name=name, shape=[int(d) for d in value.shape], values=value.ravel().tolist())


def result_to_msg(result: Result, header: Any, context: DepthContext | None = None,
                  config: LocalizationConfig = LocalizationConfig()) -> RefResult:
    out = RefResult(header=header, prompt=result.prompt, answer=result.answer,
                    trp_text=result.trp_text)
    out.image_height, out.image_width = (int(v) for v in result.image_size)
    out.objects = [object_to_msg(obj, result.image_size, context, config, header)
                   for obj in result.objects]
    out.position_frame = header.frame_id  # the camera's; transforms.TargetFrame moves them
    out.camera_orientation.w = 1.0
    out.stage_names = list(result.timings)
    out.stage_seconds = [float(v) for v in result.timings.values()]
    out.errors = list(result.errors)
    return out


def error_result(header: Any, prompt: str, error: str) -> RefResult:
    """An empty result carrying one error (replies must still name the frame)."""
    return RefResult(header=header, prompt=prompt, errors=[error])


# ---- images out ---------------------------------------------------------------------

def instance_mask(result: Result) -> np.ndarray | None:
    """[H, W] uint8: 0 background, k = object with ref_ordinal k-1 (later ones on top)."""
    masks = [(obj.ref_ordinal, obj.mask) for obj in result.objects if obj.mask is not None]
    if not masks:
        return None
    ids = np.zeros(result.image_size, dtype=np.uint8)
    for ordinal, mask in masks:
        ids[np.asarray(mask, bool)] = min(ordinal + 1, 255)
    return ids


def predicted_depth(result: Result) -> np.ndarray | None:
    """[H, W] float32 metres from the first object decoded with the depth unit."""
    for obj in result.objects:
        if obj.depth is not None:
            return np.asarray(obj.depth, dtype=np.float32)
    return None


# ---- vision_msgs (optional) ----------------------------------------------------------

@lru_cache(maxsize=1)
def vision_msgs_available() -> bool:
    try:
        import vision_msgs.msg  # noqa: F401, PLC0415
        return True
    except ImportError:
        return False


def _hypothesis(obj: ReferredObjectMsg) -> Any:
    from vision_msgs.msg import ObjectHypothesisWithPose  # noqa: PLC0415
    hyp = ObjectHypothesisWithPose()
    hyp.hypothesis.class_id = obj.phrase
    hyp.hypothesis.score = 0.0 if math.isnan(obj.score) else float(obj.score)
    return hyp


def detection_id(obj: ReferredObjectMsg) -> str:
    """Detection2D/3D.id, "the same id for the same object across messages" (vision_msgs):
    the object's track ID; empty when it is not tracked."""
    return f"{obj.track_id}" if obj.track_id else ""


def detections_2d(result: RefResult) -> Any:
    """RefResult -> vision_msgs/Detection2DArray (objects with a box; class_id = phrase,
    id = track ID)."""
    from vision_msgs.msg import Detection2D, Detection2DArray  # noqa: PLC0415
    out = Detection2DArray(header=result.header)
    for obj in result.objects:
        if not obj.has_box:
            continue
        x0, y0, x1, y1 = (float(v) for v in obj.box_xyxy)
        det = Detection2D(header=result.header, id=detection_id(obj))
        det.bbox.center.position.x, det.bbox.center.position.y = (x0 + x1) / 2, (y0 + y1) / 2
        det.bbox.size_x, det.bbox.size_y = x1 - x0, y1 - y0
        det.results = [_hypothesis(obj)]
        out.detections.append(det)
    return out


def detections_3d(result: RefResult) -> Any:
    """RefResult -> vision_msgs/Detection3DArray (objects with a 3D position), in the
    result's position_frame at its image's stamp; each box is oriented as the camera
    (its size is the extent along the camera's axes)."""
    from std_msgs.msg import Header  # noqa: PLC0415
    from vision_msgs.msg import Detection3D, Detection3DArray  # noqa: PLC0415
    header = Header(stamp=result.header.stamp, frame_id=result.position_frame or result.header.frame_id)
    orientation = result.camera_orientation
    out = Detection3DArray(header=header)
    for obj in result.objects:
        if not obj.has_position:
            continue
        det = Detection3D(header=header, id=detection_id(obj))
        det.bbox.center.position = obj.position
        det.bbox.center.orientation = orientation
        det.bbox.size = obj.extent
        hyp = _hypothesis(obj)
        hyp.pose.pose.position = obj.position
        hyp.pose.pose.orientation = orientation
        det.results = [hyp]
        out.detections.append(det)
    return out

