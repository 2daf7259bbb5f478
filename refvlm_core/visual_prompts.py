"""Visual prompts a user gives with a question: point, box, scribble or mask.

Coordinates are in original image pixels (x right, y down; continuous, so an image of
width W spans ``x in [0, W]``). ``rasterize`` turns a prompt into a mask at any
resolution; the model pools image features under it (``rasterize_in_model_frame``).

Rasterisation marks the output cells whose centres fall under the prompt: a disc around
a point, a filled box, a thick polyline, or the resampled mask. Point radius and
scribble width are in OUTPUT cells, so a point covers the same number of feature cells
whatever the image size. A valid prompt never gives an empty mask: when the shape is
smaller than a cell, the cell under its centre is marked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refvlm_core import rle
from refvlm_core.errors import InputError
from refvlm_core.geometry import Letterbox, resize_image

PROMPT_KINDS = ("point", "box", "scribble", "mask")

# Prompts may stray this far outside the image (clicks on the border, rounding).
OUTSIDE_TOLERANCE_PX = 1.0
DEFAULT_POINT_RADIUS = 2.0    # output cells (about 12 cells)
DEFAULT_SCRIBBLE_WIDTH = 2.0  # output cells; widths below 1 are raised to 1 to stay connected


@dataclass
class VisualPrompt:
    kind: str                    # one of PROMPT_KINDS
    points: np.ndarray | None = None  # point: [1, 2]; box: [2, 2] (x0,y0),(x1,y1); scribble: [N, 2]
    mask: np.ndarray | None = None    # mask: [H, W] bool at image resolution

    @classmethod
    def point(cls, x: float, y: float) -> "VisualPrompt":
        return cls("point", points=np.array([[x, y]], dtype=np.float32))

    @classmethod
    def box(cls, x0: float, y0: float, x1: float, y1: float) -> "VisualPrompt":
        """Corners in any order (a box dragged up-left is fine): stored as min, max."""
        xs, ys = sorted((x0, x1)), sorted((y0, y1))
        return cls("box", points=np.array([[xs[0], ys[0]], [xs[1], ys[1]]], dtype=np.float32))

    @classmethod
    def scribble(cls, points: Any) -> "VisualPrompt":
        """``points``: [N, 2] x, y along the stroke."""
        return cls("scribble", points=np.asarray(points, dtype=np.float32).reshape(-1, 2))

    @classmethod
    def from_mask(cls, mask: Any) -> "VisualPrompt":
        """``mask``: [H, W], bool or numbers (non-zero = inside, e.g. 0/1 or 0/255)."""
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise InputError(f"a mask prompt must be a 2-D [H, W] array, got shape {mask.shape}")
        if mask.dtype.kind == "f" and np.isnan(mask).any():
            raise InputError("mask prompt contains NaN; give a bool mask or 0/1 values")
        return cls("mask", mask=mask != 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: points as lists, a mask as compressed COCO RLE."""
        if self.kind == "mask":
            return {"kind": "mask", "mask": rle.encode(np.asarray(self.mask, dtype=bool))}
        return {"kind": self.kind, "points": np.asarray(self.points, dtype=np.float64).tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisualPrompt":
        """Inverse of ``to_dict``; a mask may also be uncompressed RLE."""
        if not isinstance(data, dict) or "kind" not in data:
            raise InputError(f'a visual prompt dict needs a "kind" key, got {str(data)[:80]}')
        kind = data["kind"]
        _check_kind(kind)
        if kind == "mask":
            if "mask" not in data:
                raise InputError('a mask prompt dict needs "mask": {"size": [H, W], "counts": ...}')
            return cls("mask", mask=rle.decode(data["mask"]))
        if "points" not in data:
            raise InputError(f'a {kind} prompt dict needs "points": [[x, y], ...]')
        try:
            points = np.asarray(data["points"], dtype=np.float32).reshape(-1, 2)
        except (TypeError, ValueError) as error:
            raise InputError(f'"points" of a {kind} prompt must be [[x, y], ...]: {error}') from error
        return cls(kind, points=points)


def _check_kind(kind: Any) -> None:
    if kind not in PROMPT_KINDS:
        raise InputError(f"unknown visual prompt kind {kind!r}; use one of {', '.join(PROMPT_KINDS)}")


# ---- validation -------------------------------------------------------------------

_POINT_COUNTS = {"point": "exactly 1", "box": "exactly 2", "scribble": "at least 2"}


def validate(prompt: VisualPrompt, height: int, width: int) -> None:
    """Raise InputError unless ``prompt`` is usable on an ``height x width`` image."""
    _check_kind(prompt.kind)
    if prompt.kind == "mask":
        _validate_mask(prompt.mask, height, width)
    else:
        _validate_points(prompt.kind, prompt.points, height, width)


def _validate_mask(mask: Any, height: int, width: int) -> None:
    if mask is None:
        raise InputError("a mask prompt has no mask; build it with VisualPrompt.from_mask(mask)")
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise InputError(f"a mask prompt must be bool, got {mask.dtype}; build it with VisualPrompt.from_mask(mask)")
    if mask.shape != (height, width):
        raise InputError(f"mask prompt is {mask.shape} but the image is {height}x{width}: "
                         "give the mask at the image's resolution")
    if not mask.any():
        raise InputError("mask prompt is empty (no pixel set); mark the region you mean")


def _validate_points(kind: str, points: Any, height: int, width: int) -> None:
    if points is None:
        raise InputError(f"a {kind} prompt has no points; build it with VisualPrompt.{kind}(...)")
    points = np.asarray(points, dtype=np.float64)
    count = points.shape[0] if points.ndim == 2 else -1
    wanted_ok = {"point": count == 1, "box": count == 2, "scribble": count >= 2}[kind]
    if points.ndim != 2 or points.shape[1] != 2 or not wanted_ok:
        raise InputError(f"a {kind} prompt needs {_POINT_COUNTS[kind]} (x, y) points, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise InputError(f"{kind} prompt has NaN or infinite coordinates: {points.tolist()}")
    tol = OUTSIDE_TOLERANCE_PX
    outside = ((points[:, 0] < -tol) | (points[:, 0] > width + tol)
               | (points[:, 1] < -tol) | (points[:, 1] > height + tol))
    if outside.any():
        raise InputError(f"{kind} prompt point {points[outside][0].tolist()} is outside the "
                         f"{height}x{width} image (x in [0, {width}], y in [0, {height}])")
    if kind == "box" and not (points[0, 0] < points[1, 0] and points[0, 1] < points[1, 1]):
        raise InputError(f"box prompt {points.ravel().tolist()} has zero area; give x0 < x1 and y0 < y1")


# ---- rasterisation ----------------------------------------------------------------

def rasterize(prompt: VisualPrompt, image_hw: tuple[int, int], out_hw: tuple[int, int],
              point_radius: float = DEFAULT_POINT_RADIUS,
              scribble_width: float = DEFAULT_SCRIBBLE_WIDTH) -> np.ndarray:
    """Prompt in pixels of an ``image_hw`` image -> [h, w] bool over the whole image."""
    _check_grid(out_hw)
    validate(prompt, *image_hw)
    out_h, out_w = out_hw
    if prompt.kind == "mask":
        coverage = resize_image(prompt.mask.astype(np.float32), out_h, out_w)  # [h, w]
        return _threshold_never_empty(coverage)
    scale = np.array([out_w / image_hw[1], out_h / image_hw[0]])
    return _rasterize_points(prompt.kind, np.asarray(prompt.points, np.float64) * scale,
                             out_hw, point_radius, scribble_width)


def rasterize_in_model_frame(prompt: VisualPrompt, letterbox: Letterbox, out_size: int,
                             point_radius: float = DEFAULT_POINT_RADIUS,
                             scribble_width: float = DEFAULT_SCRIBBLE_WIDTH) -> np.ndarray:
    """Prompt in original pixels -> [out, out] bool over the letterboxed model frame."""
    _check_grid((out_size, out_size))
    validate(prompt, letterbox.height, letterbox.width)
    if prompt.kind == "mask":
        return _threshold_never_empty(letterbox.mask_coverage_to_model(prompt.mask, out_size))
    cells = letterbox.points_to_model(prompt.points) * (out_size / letterbox.size)  # [N, 2] out cells
    return _rasterize_points(prompt.kind, cells, (out_size, out_size), point_radius, scribble_width)


def _check_grid(out_hw: tuple[int, int]) -> None:
    if len(out_hw) != 2 or any(int(n) != n or n < 1 for n in out_hw):
        raise InputError(f"rasterisation grid must be two positive integers (h, w), got {out_hw!r}")


def _rasterize_points(kind: str, points: np.ndarray, out_hw: tuple[int, int],
                      point_radius: float, scribble_width: float) -> np.ndarray:
    """``points`` [N, 2] already in output cell units -> [h, w] bool."""
    if kind == "point":
        out = _capsules(points, out_hw, point_radius)
        anchor = points[0]
    elif kind == "box":
        out = _filled_box(points, out_hw)
        anchor = points.mean(axis=0)
    else:
        out = _capsules(points, out_hw, max(scribble_width, 1.0) / 2)
        anchor = points[0]
    if not out.any():  # smaller than a cell: keep the cell under it
        out[_cell_index(anchor[1], out_hw[0]), _cell_index(anchor[0], out_hw[1])] = True
    return out


def _cell_index(coord: float, cells: int) -> int:
    return int(np.clip(np.floor(coord), 0, cells - 1))


def _filled_box(corners: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Cells whose centre c satisfies x0 <= c < x1 (same in y): exact for aligned boxes."""
    out = np.zeros(out_hw, dtype=bool)
    (x0, y0), (x1, y1) = corners
    cols = slice(*np.clip(np.ceil([x0 - 0.5, x1 - 0.5]).astype(int), 0, out_hw[1]))
    rows = slice(*np.clip(np.ceil([y0 - 0.5, y1 - 0.5]).astype(int), 0, out_hw[0]))
    out[rows, cols] = True
    return out


def _capsules(points: np.ndarray, out_hw: tuple[int, int], radius: float) -> np.ndarray:
    """Cells whose centre lies within ``radius`` of the polyline through ``points``
    (a disc for one point). Each segment only touches the cells of its bounding box."""
    out = np.zeros(out_hw, dtype=bool)
    segments = zip(points, points[1:]) if len(points) > 1 else [(points[0], points[0])]
    for start, end in segments:
        low = np.floor(np.minimum(start, end) - radius).astype(int)
        high = np.ceil(np.maximum(start, end) + radius).astype(int) + 1
        x_lo, y_lo = np.maximum(low, 0)
        x_hi, y_hi = min(high[0], out_hw[1]), min(high[1], out_hw[0])
        if x_lo >= x_hi or y_lo >= y_hi:
            continue
        ys, xs = np.mgrid[y_lo:y_hi, x_lo:x_hi] + 0.5  # cell centres, [hb, wb] each
        out[y_lo:y_hi, x_lo:x_hi] |= _distance_to_segment(xs, ys, start, end) <= radius
    return out


def _distance_to_segment(xs: np.ndarray, ys: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    direction = end - start
    length_sq = float(direction @ direction)
    t = 0.0 if length_sq == 0 else np.clip(((xs - start[0]) * direction[0] + (ys - start[1]) * direction[1])
                                           / length_sq, 0.0, 1.0)
    return np.hypot(xs - (start[0] + t * direction[0]), ys - (start[1] + t * direction[1]))


def _threshold_never_empty(coverage: np.ndarray) -> np.ndarray:
    """[h, w] coverage in [0, 1] -> bool (>= 0.5), or the best-covered cell if none reaches it."""
    out = coverage >= 0.5
    if not out.any():
        out[np.unravel_index(int(np.argmax(coverage)), coverage.shape)] = True
    return out
