"""Letterbox transforms, box helpers and image validation (refvlm_core.geometry)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refvlm_core.errors import InputError
from refvlm_core.geometry import (
    CLIP_MEAN_RGB, Letterbox, box_area, box_iou, clip_boxes, cxcywh_to_xyxy, denormalize_boxes,
    generalized_box_iou, normalize_boxes, validate_image, xyxy_to_cxcywh)

torch.set_num_threads(1)

image_sides = st.integers(1, 2000)
model_sizes = st.integers(32, 1024)


# ---- letterbox: frame ---------------------------------------------------------------

def test_letterbox_is_centered():
    lb = Letterbox.fit(100, 300, 150)
    assert lb.scale == 0.5
    assert (lb.left, lb.top) == (0, 100)
    assert (lb.pad_x, lb.pad_y) == (0.0, 50.0)
    odd = Letterbox.fit(10, 7, 10)  # 3 pad columns: 1 left, 2 right
    assert odd.left == 1 and odd.pad_x == 1.0


def test_letterbox_rejects_bad_sizes():
    with pytest.raises(InputError, match="positive integer"):
        Letterbox.fit(0, 10, 32)
    with pytest.raises(InputError, match="positive integer"):
        Letterbox(10, 10.5, 32)


def test_image_to_model_at_scale_one_is_the_padded_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (5, 9, 3), dtype=np.uint8)
    lb = Letterbox.fit(5, 9, 9)
    out = lb.image_to_model(image, pad_value=CLIP_MEAN_RGB)
    assert out.shape == (9, 9, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[lb.top:lb.top + 5], image)
    assert (out[:lb.top] == CLIP_MEAN_RGB).all() and (out[lb.top + 5:] == CLIP_MEAN_RGB).all()


def test_image_to_model_grey_and_single_channel_keep_their_layout():
    grey = np.full((4, 8), 200, np.uint8)
    lb = Letterbox.fit(4, 8, 32)
    assert lb.image_to_model(grey).shape == (32, 32)
    assert lb.image_to_model(grey[:, :, None]).shape == (32, 32, 1)
    with pytest.raises(InputError, match="Letterbox.fit"):
        lb.image_to_model(np.zeros((8, 4, 3), np.uint8))


# ---- letterbox: points and boxes -------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(image_sides, image_sides, model_sizes, st.data())
def test_points_and_boxes_round_trip(height, width, size, data):
    lb = Letterbox.fit(height, width, size)
    unit = data.draw(st.lists(st.floats(0, 1), min_size=4, max_size=4))
    x0, x1 = sorted((unit[0] * width, unit[1] * width))
    y0, y1 = sorted((unit[2] * height, unit[3] * height))
    boxes = np.array([[x0, y0, x1, y1]])
    model = lb.boxes_to_model(boxes)
    assert (model >= -1e-9).all() and (model <= size + 1e-9).all()  # inside the model frame
    # one model pixel of rounding comes back as at most half a pixel of the original
    tolerance = 0.5 / lb.scale + 1e-6
    np.testing.assert_allclose(lb.boxes_to_image(np.round(model)), boxes, atol=tolerance)
    np.testing.assert_allclose(lb.boxes_to_image(model), boxes, atol=1e-6 * max(height, width))
    points = boxes.reshape(2, 2)
    np.testing.assert_allclose(lb.points_to_image(lb.points_to_model(points)), points,
                               atol=1e-6 * max(height, width))


@settings(max_examples=25, deadline=None)
@given(image_sides, image_sides, model_sizes, st.data())
def test_point_transform_matches_the_resized_image(height, width, size, data):
    """A bright rectangle's centroid in the letterboxed image maps back to its centre,
    within half a pixel of the coarser frame (a model pixel may span many image pixels)."""
    lb = Letterbox.fit(height, width, size)
    cell = 1 / lb.scale  # original pixels per model pixel
    rect_w = data.draw(st.integers(min(width, max(1, int(np.ceil(2 * cell)))), width))
    rect_h = data.draw(st.integers(min(height, max(1, int(np.ceil(2 * cell)))), height))
    x0 = data.draw(st.integers(0, width - rect_w))
    y0 = data.draw(st.integers(0, height - rect_h))
    image = np.zeros((height, width), np.float32)
    image[y0:y0 + rect_h, x0:x0 + rect_w] = 1.0
    model = lb.image_to_model(image)
    ys, xs = np.mgrid[:size, :size] + 0.5
    centroid = np.array([(xs * model).sum(), (ys * model).sum()]) / model.sum()
    expected = np.array([x0 + rect_w / 2, y0 + rect_h / 2])
    np.testing.assert_allclose(lb.points_to_image(centroid), expected, atol=0.5 * max(1.0, cell) + 1e-6)


# ---- letterbox: masks and dense maps ----------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(16, 2000), st.floats(0.25, 1.0), st.booleans(), st.integers(64, 512), st.data())
def test_mask_round_trip_keeps_reasonable_shapes(side, ratio, tall, out_size, data):
    short = max(16, int(side * ratio))
    height, width = (side, short) if tall else (short, side)
    lb = Letterbox.fit(height, width, 1024)
    cell = side / out_size  # original pixels per mask cell
    # an ellipse at least 16 cells across each way: the round trip loses up to about
    # half a cell along the outline, which smaller shapes cannot keep under 10% of IoU
    semi_x = data.draw(st.floats(min(8 * cell, width / 2), width / 2))
    semi_y = data.draw(st.floats(min(8 * cell, height / 2), height / 2))
    cx = data.draw(st.floats(semi_x, width - semi_x))
    cy = data.draw(st.floats(semi_y, height - semi_y))
    ys, xs = np.mgrid[:height, :width] + 0.5
    mask = ((xs - cx) / semi_x) ** 2 + ((ys - cy) / semi_y) ** 2 <= 1
    if not mask.any():
        return
    model_mask = lb.mask_to_model(mask, out_size)
    assert model_mask.shape == (out_size, out_size) and model_mask.dtype == bool
    back = lb.mask_to_image(model_mask)
    assert back.shape == (height, width) and back.dtype == bool
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.9, iou


def test_mask_to_model_leaves_padding_empty():
    lb = Letterbox.fit(50, 100, 64)
    full = lb.mask_to_model(np.ones((50, 100), bool), 32)
    assert full[8:24].all() and not full[:8].any() and not full[24:].any()


@pytest.mark.parametrize("height,width,map_hw", [(30, 50, (16, 16)), (50, 30, (40, 40)), (7, 7, (8, 12))])
def test_dense_to_image_samples_at_the_right_place(height, width, map_hw):
    """Bilinear sampling reproduces a linear ramp exactly, which pins the affine map."""
    lb = Letterbox.fit(height, width, 224)
    h, w = map_hw
    ramp = np.tile(np.arange(w, dtype=np.float32), (h, 1))  # value = cell column index
    out = lb.dense_to_image(ramp)
    assert out.shape == (height, width) and out.dtype == np.float32
    # pixel centre x + 0.5 sits at model-frame fraction (x + 0.5 + left) / side
    expected = (np.arange(width) + 0.5 + lb.left) * w / lb.side - 0.5
    np.testing.assert_allclose(out[0], np.clip(expected, 0, w - 1), atol=1e-4)
    logits = lb.mask_to_image(ramp - w / 2)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits[0], np.clip(expected, 0, w - 1) - w / 2, atol=1e-4)


def test_dense_to_image_keeps_nan_unknown():
    lb = Letterbox.fit(40, 40, 64)
    depth = np.full((20, 20), 2.5, np.float32)
    depth[5:10, 5:10] = np.nan
    out = lb.dense_to_image(depth)
    assert np.isnan(out[10:20, 10:20]).all()  # the unknown block, 2 pixels per cell
    known = ~np.isnan(out)
    assert known.sum() == 40 * 40 - 100
    np.testing.assert_allclose(out[known], 2.5, rtol=1e-6)  # no NaN bleeding, no dimming


def test_dense_maps_must_be_2d():
    lb = Letterbox.fit(10, 10, 32)
    with pytest.raises(InputError, match="2-D"):
        lb.dense_to_image(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(InputError, match="2-D"):
        lb.mask_to_image(np.zeros((0, 4), bool))


# ---- boxes ------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4))
def test_box_format_round_trip_numpy_and_torch(values):
    boxes = np.array([values])
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes, atol=1e-7 * 1e4)
    tensor = torch.tensor([values], dtype=torch.float64)
    back = cxcywh_to_xyxy(xyxy_to_cxcywh(tensor))
    assert isinstance(back, torch.Tensor)
    torch.testing.assert_close(back, tensor, atol=1e-7 * 1e4, rtol=0)


def test_box_formats_by_hand():
    xyxy = np.array([[[10.0, 20.0, 30.0, 60.0]]])  # [..., 4] with extra leading dims
    np.testing.assert_array_equal(xyxy_to_cxcywh(xyxy), [[[20.0, 40.0, 20.0, 40.0]]])
    assert xyxy_to_cxcywh(torch.zeros(2, 3, 4)).shape == (2, 3, 4)
    np.testing.assert_array_equal(normalize_boxes(xyxy, 80), xyxy / 80)
    np.testing.assert_array_equal(denormalize_boxes(normalize_boxes(xyxy, 80), 80), xyxy)
    clipped = clip_boxes(np.array([[-5.0, 3.0, 120.0, 90.0]]), height=50, width=100)
    np.testing.assert_array_equal(clipped, [[0.0, 3.0, 100.0, 50.0]])
    np.testing.assert_array_equal(box_area(np.array([[0, 0, 2, 3], [2, 2, 1, 5]], float)), [6.0, 0.0])


A = [[0.0, 0.0, 2.0, 2.0]]


@pytest.mark.parametrize("box,iou,giou", [
    ([0.0, 0.0, 2.0, 2.0], 1.0, 1.0),                   # identical
    ([1.0, 1.0, 3.0, 3.0], 1 / 7, 1 / 7 - 2 / 9),       # overlap 1, union 7, hull 9
    ([0.0, 0.0, 1.0, 1.0], 1 / 4, 1 / 4),               # inside: hull = union
    ([2.0, 0.0, 4.0, 2.0], 0.0, 0.0),                   # touching: hull = union = 8
    ([3.0, 0.0, 5.0, 2.0], 0.0, -2 / 10),               # apart: hull 10, union 8
    ([4.0, 4.0, 6.0, 6.0], 0.0, -28 / 36),              # far: hull 36, union 8
])
def test_iou_and_giou_by_hand(box, iou, giou):
    a = np.array(A)
    b = np.array([box])
    np.testing.assert_allclose(box_iou(a, b), [[iou]], atol=1e-12)
    np.testing.assert_allclose(generalized_box_iou(a, b), [[giou]], atol=1e-12)
    t = generalized_box_iou(torch.tensor(A, dtype=torch.float64), torch.tensor([box], dtype=torch.float64))
    torch.testing.assert_close(t, torch.tensor([[giou]], dtype=torch.float64))


def test_pairwise_shapes_degenerate_boxes_and_gradients():
    rng = np.random.default_rng(1)
    a = torch.tensor(cxcywh_to_xyxy(rng.random((3, 4)) + [0, 0, 0.1, 0.1]), requires_grad=True)
    b = torch.tensor(cxcywh_to_xyxy(rng.random((5, 4)) + [0, 0, 0.1, 0.1]))
    giou = generalized_box_iou(a, b)
    assert giou.shape == (3, 5) and (giou <= 1).all() and (giou >= -1).all()
    (1 - giou).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    np.testing.assert_allclose(box_iou(a.detach().numpy(), b.numpy()), box_iou(a.detach(), b).numpy())
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # zero area: finite, not NaN
    assert torch.isfinite(generalized_box_iou(point, point)).all()
    assert torch.isfinite(box_iou(point, point)).all()


# ---- image validation -------------------------------------------------------------------

def test_validate_image_accepts_rgb_and_grey():
    rgb = np.zeros((4, 6, 3), np.uint8)
    assert validate_image(rgb) is rgb  # no copy when already fine
    strided = np.zeros((4, 12, 3), np.uint8)[:, ::2]
    out = validate_image(strided)
    assert out.flags.c_contiguous and out.shape == (4, 6, 3)
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6)
    for g in (grey, grey[:, :, None]):
        out = validate_image(g)
        assert out.shape == (4, 6, 3)
        np.testing.assert_array_equal(out[..., 1], grey)


@pytest.mark.parametrize("image,message", [
    (np.zeros((4, 6, 3), np.float64), r"HxWx3 uint8, got float64 with shape \(4, 6, 3\)"),
    (np.zeros((4, 6, 4), np.uint8), "alpha"),
    (np.zeros((4, 6, 2), np.uint8), "got uint8 with shape"),
    (np.zeros((0, 6, 3), np.uint8), "non-empty"),
    (np.zeros((2, 4, 6, 3), np.uint8), "HxWx3"),
    ([[1, 2], [3, 4]], "numpy"),
])
def test_validate_image_errors_say_what_was_expected(image, message):
    with pytest.raises(InputError, match=message):
        validate_image(image)
