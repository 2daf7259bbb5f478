"""Draw a Result on its image: depth colour map, masks, boxes, COCO keypoint skeletons
and phrase labels (numpy + OpenCV; RGB in, RGB out)."""
from __future__ import annotations

import cv2
import numpy as np

from refvlm_core.results import Result

# COCO 17-keypoint skeleton (0-based): limbs as pairs of keypoint indices.
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
                 (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128)], np.uint8)
KEYPOINT_MIN_VISIBILITY = 0.5


def colour(index: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[index % len(PALETTE)])


def depth_colour_map(depth: np.ndarray) -> np.ndarray:
    """[H, W] metres (NaN unknown) -> [H, W, 3] uint8 RGB, near = bright; unknown = black."""
    known = np.isfinite(depth)
    out = np.zeros((*depth.shape, 3), np.uint8)
    if not known.any():
        return out
    low, high = np.percentile(depth[known], (2, 98))
    scaled = np.clip((depth - low) / max(high - low, 1e-6), 0, 1)
    grey = ((1 - np.nan_to_num(scaled)) * 255).astype(np.uint8)
    coloured = cv2.applyColorMap(grey, cv2.COLORMAP_TURBO)[..., ::-1]
    out[known] = coloured[known]
    return out


def draw_result(image: np.ndarray, result: Result, mask_alpha: float = 0.45) -> np.ndarray:
    """[H, W, 3] uint8 RGB + Result -> a new [H, W, 3] uint8 RGB picture."""
    canvas = image.copy()
    for obj in result.objects:                       # depth first: the rest goes on top
        if obj.depth is not None:
            canvas = cv2.addWeighted(canvas, 0.4, depth_colour_map(obj.depth), 0.6, 0)
    for k, obj in enumerate(result.objects):
        if obj.mask is not None and obj.mask.any():
            tint = np.array(colour(k), np.float32)
            canvas[obj.mask] = (canvas[obj.mask] * (1 - mask_alpha) + tint * mask_alpha).astype(np.uint8)
    thickness = max(1, round(max(image.shape[:2]) / 320))
    for k, obj in enumerate(result.objects):
        label_at = None
        if obj.box_xyxy is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in obj.box_xyxy)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), colour(k), thickness)
            label_at = (x0, max(y0 - 3, 10))
        if obj.keypoints is not None:
            _draw_skeleton(canvas, obj.keypoints, colour(k), thickness)
        if label_at is None and obj.mask is not None and obj.mask.any():
            ys, xs = np.nonzero(obj.mask)
            label_at = (int(xs.min()), max(int(ys.min()) - 3, 10))
        if label_at is not None:
            text = obj.phrase if obj.score is None else f"{obj.phrase} {obj.score:.2f}"
            cv2.putText(canvas, text, label_at, cv2.FONT_HERSHEY_SIMPLEX, 0.35 * thickness, colour(k),
                        thickness, cv2.LINE_AA)
    return canvas


def _draw_skeleton(canvas: np.ndarray, keypoints: np.ndarray, rgb: tuple[int, int, int], thickness: int) -> None:
    visible = keypoints[:, 2] >= KEYPOINT_MIN_VISIBILITY
    points = [(int(round(x)), int(round(y))) for x, y in keypoints[:, :2]]
    for a, b in COCO_SKELETON:
        if visible[a] and visible[b]:
            cv2.line(canvas, points[a], points[b], rgb, thickness, cv2.LINE_AA)
    for point, shown in zip(points, visible):
        if shown:
            cv2.circle(canvas, point, thickness + 1, (255, 255, 255), -1, cv2.LINE_AA)
