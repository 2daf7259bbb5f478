"""Pictures the tools return: camera frames (JPEG, shrunk so a planner's context is not
spent on pixels), masks (PNG, white = object) and answers drawn on their frame."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from refvlm_mcp.observation import Observation


def encode(array: np.ndarray, fmt: str, quality: int = 85) -> bytes:
    """[H, W, 3] uint8 RGB or [H, W] uint8 -> PNG or JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format=fmt.upper(), quality=quality)
    return out.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    return encode(np.where(mask, 255, 0).astype(np.uint8), "png")


def shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image scaled so its longer side is at most ``max_side``, and the scale."""
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale == 1.0:
        return rgb, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)), scale


def draw(rgb: np.ndarray, obs: Observation) -> np.ndarray:
    """The answer drawn as the node's overlay draws it (masks, boxes, keypoints, labels)."""
    from refvlm_core.overlay import draw_result
    from refvlm_core.results import ReferredObject, Result

    objects = [ReferredObject(
        phrase=f.phrase, units=f.units, instance_index=0, ref_ordinal=k, ref_span=(0, 0), score=f.score,
        box_xyxy=None if f.box_xyxy is None else np.asarray(f.box_xyxy, np.float64),
        mask=f.mask if f.mask is not None and f.mask.shape == rgb.shape[:2] else None,
        keypoints=np.array([(x, y, v) for _, x, y, v in f.keypoints]) if f.keypoints else None)
        for k, f in enumerate(obs.objects)]
    return draw_result(rgb, Result(prompt=obs.prompt, answer=obs.answer, trp_text=obs.trp_text,
                                   image_size=rgb.shape[:2], objects=objects))
