"""The tools' typed outputs: pydantic models, so every tool publishes a JSON output
schema and its structured content is validated against it. Field descriptions are
written for the planner that reads them."""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, Field

from refvlm_mcp.observation import Found, Observation


class Box(BaseModel):
    """Axis-aligned box in image pixels (x right, y down)."""

    x0: float
    y0: float
    x1: float
    y1: float


class Position(BaseModel):
    """3D point in metres, in ``frame`` (the camera's optical frame unless the node
    transforms to another: x right, y down, z forward)."""

    x: float
    y: float
    z: float
    frame: str = Field(description="TF frame the point is expressed in")
    distance_m: float = Field(description="straight-line distance from the frame's origin")


class FrameInfo(BaseModel):
    camera: str = Field(description="camera the image came from")
    frame_id: str = Field(description="TF frame of the image")
    stamp_s: float = Field(description="capture time of the image, seconds")
    width: int
    height: int


class LocatedObject(BaseModel):
    phrase: str = Field(description="what the model called the object")
    box: Box | None = Field(description="where it is in the image, pixels")
    score: float | None = Field(description="decoder confidence in [0, 1]")
    position: Position | None = Field(description="3D position, when the camera has depth")
    position_status: str | None = Field(description="why there is no 3D position")
    track_id: str | None = Field(description="the same id for the same object across calls, when the node tracks")


class LocateResult(BaseModel):
    objects: list[LocatedObject] = Field(description="every object the answer referred to")
    answer: str = Field(description="the model's answer in words")
    image: FrameInfo
    model_ms: float | None = Field(description="time the model took for this answer")


class SegmentedObject(BaseModel):
    phrase: str
    area_px: int = Field(description="pixels inside the mask")
    box: Box | None = Field(description="bounding box of the mask, pixels")
    score: float | None
    position: Position | None
    mask_image: int = Field(description="index of this object's mask among the returned PNG images (white = object)")
    track_id: str | None


class SegmentResult(BaseModel):
    objects: list[SegmentedObject]
    answer: str
    image: FrameInfo
    model_ms: float | None


class Keypoint(BaseModel):
    name: str = Field(description="COCO keypoint name, e.g. left_wrist")
    x: float
    y: float
    visibility: float = Field(description="probability in [0, 1] that the point is visible")


class PosedObject(BaseModel):
    phrase: str
    keypoints: list[Keypoint]
    box: Box | None
    track_id: str | None


class PoseResult(BaseModel):
    objects: list[PosedObject]
    answer: str
    image: FrameInfo
    model_ms: float | None


class DepthObject(BaseModel):
    phrase: str
    distance_m: float = Field(description="distance from the camera to the object, metres")
    source: str = Field(description="'sensor' (the camera's depth image) or 'model' (the model's depth estimate)")
    position: Position | None
    box: Box | None
    track_id: str | None


class DepthResult(BaseModel):
    objects: list[DepthObject]
    answer: str
    image: FrameInfo
    model_ms: float | None


class AskObject(BaseModel):
    phrase: str
    units: list[str] = Field(description="what the model decoded for it: box, mask, keypoint, depth ...")
    box: Box | None
    score: float | None
    mask_area_px: int | None
    keypoints: list[Keypoint]
    position: Position | None
    track_id: str | None


class AskResult(BaseModel):
    answer: str = Field(description="the model's answer in words")
    trp_text: str = Field(description="the raw answer in the Triplet-Based Referring Paradigm "
                                      "(<Phrase>...</Phrase> (<Unit>...</Unit>[i]<REF>))")
    objects: list[AskObject]
    errors: list[str] = Field(description="problems reading the answer (it is still usable)")
    image: FrameInfo
    model_ms: float | None


class LookResult(BaseModel):
    image: FrameInfo
    drawn_answer: str | None = Field(description="prompt of the answer drawn on the image, if any")
    scale: float = Field(description="returned image size / camera image size (pixel coordinates "
                                     "from the other tools are in camera pixels)")


# ---- conversions --------------------------------------------------------------------
def number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def box_of(found: Found) -> Box | None:
    return None if found.box_xyxy is None else Box(**dict(zip(("x0", "y0", "x1", "y1"),
                                                              (round(float(v), 1) for v in found.box_xyxy))))


def mask_box(mask: np.ndarray) -> Box | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return Box(x0=float(xs.min()), y0=float(ys.min()), x1=float(xs.max() + 1), y1=float(ys.max() + 1))


def position_of(found: Found) -> Position | None:
    if found.position is None:
        return None
    x, y, z = (round(float(v), 4) for v in found.position)
    return Position(x=x, y=y, z=z, frame=found.position_frame,
                    distance_m=round(math.sqrt(x * x + y * y + z * z), 4))


def keypoints_of(found: Found) -> list[Keypoint]:
    return [Keypoint(name=n, x=round(x, 1), y=round(y, 1), visibility=round(v, 3))
            for n, x, y, v in found.keypoints]


def frame_info(obs: Observation) -> FrameInfo:
    return FrameInfo(camera=obs.camera, frame_id=obs.frame_id, stamp_s=obs.stamp_s,
                     width=obs.width, height=obs.height)


def located(found: Found) -> LocatedObject:
    return LocatedObject(phrase=found.phrase, box=box_of(found), score=number(found.score),
                         position=position_of(found),
                         position_status=None if found.position is not None else (found.position_status or None),
                         track_id=found.track_id)


def asked(found: Found) -> AskObject:
    return AskObject(phrase=found.phrase, units=list(found.units), box=box_of(found),
                     score=number(found.score),
                     mask_area_px=None if found.mask is None else int(np.count_nonzero(found.mask)),
                     keypoints=keypoints_of(found), position=position_of(found), track_id=found.track_id)
