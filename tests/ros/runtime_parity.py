"""What "the same answer" means between two refvlm_node runtimes, on RefResult messages:
the same TRP text and referred objects, boxes within 1 px, masks IoU >= 0.99, depth
statistics within 1e-3 relative."""
from __future__ import annotations

import numpy as np

BOX_PX = 1.0
MASK_IOU = 0.99
DEPTH_RTOL = 1e-3


def mask_array(image) -> np.ndarray:
    from refvlm_ros.image_conversions import image_to_array
    return image_to_array(image, backend="numpy") > 0


def assert_same_result(reference, candidate) -> None:
    """Two RefResult messages give the same answer (TRP, objects, boxes, masks, depth)."""
    assert candidate.trp_text == reference.trp_text, (reference.trp_text, candidate.trp_text)
    assert list(candidate.errors) == list(reference.errors)
    assert len(reference.objects) == len(candidate.objects)
    for ref, got in zip(reference.objects, candidate.objects):
        assert_same_object(ref, got)


def assert_same_object(ref, got) -> None:
    from refvlm_export.parity import mask_iou

    assert (ref.phrase, list(ref.units), ref.has_box) == (got.phrase, list(got.units), got.has_box)
    if ref.has_box:
        assert np.abs(np.array(ref.box_xyxy) - np.array(got.box_xyxy)).max() <= BOX_PX
    assert (ref.mask.width, ref.mask.height) == (got.mask.width, got.mask.height)
    if ref.mask.width:
        assert mask_iou(mask_array(ref.mask), mask_array(got.mask)) >= MASK_IOU
    assert ref.has_depth == got.has_depth
    for field in ("depth_median", "depth_min", "depth_max"):
        a, b = getattr(ref, field), getattr(got, field)
        assert abs(a - b) <= DEPTH_RTOL * max(abs(a), 1e-6), (field, a, b)
