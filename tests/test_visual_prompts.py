"""Visual prompts: constructors, validation, rasterisation, JSON, and COCO RLE."""
from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as coco_mask  # the reference RLE implementation (train extra)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from refvlm_core import rle
from refvlm_core.errors import InputError
from refvlm_core.geometry import Letterbox
from refvlm_core.visual_prompts import (
    PROMPT_KINDS, VisualPrompt, rasterize, rasterize_in_model_frame, validate)

EIGHT_CONNECTED = np.ones((3, 3), bool)


def _ellipse(height: int, width: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    ys, xs = np.mgrid[:height, :width] + 0.5
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


# ---- constructors -----------------------------------------------------------------------

def test_constructors_give_the_documented_shapes():
    assert VisualPrompt.point(3, 4).points.tolist() == [[3.0, 4.0]]
    box = VisualPrompt.box(10, 8, 2, 1)  # dragged up-left
    assert box.kind == "box" and box.points.tolist() == [[2.0, 1.0], [10.0, 8.0]]
    scribble = VisualPrompt.scribble([(0, 0), (5, 5), (9, 2)])
    assert scribble.points.shape == (3, 2)
    mask = VisualPrompt.from_mask(np.array([[0, 255], [0, 0]], np.uint8))
    assert mask.mask.dtype == bool and mask.mask.tolist() == [[False, True], [False, False]]
    assert set(PROMPT_KINDS) == {"point", "box", "scribble", "mask"}


def test_from_mask_rejects_bad_arrays():
    with pytest.raises(InputError, match="2-D"):
        VisualPrompt.from_mask(np.ones((2, 2, 3)))
    with pytest.raises(InputError, match="NaN"):
        VisualPrompt.from_mask(np.array([[np.nan, 1.0]]))


# ---- validation -------------------------------------------------------------------------

def test_valid_prompts_pass():
    for prompt in (VisualPrompt.point(0, 0), VisualPrompt.point(100.9, -0.9),  # within a pixel of the edge
                   VisualPrompt.box(0, 0, 100, 50), VisualPrompt.scribble([(1, 1), (1, 1)]),
                   VisualPrompt.from_mask(np.eye(50, 100))):
        validate(prompt, 50, 100)


@pytest.mark.parametrize("prompt,message", [
    (VisualPrompt.point(101.5, 10), "outside"),
    (VisualPrompt.point(10, -1.5), "outside"),
    (VisualPrompt.box(-3, 0, 10, 10), "outside"),
    (VisualPrompt.box(5, 5, 5, 20), "zero area"),
    (VisualPrompt.box(5, 5, 20, 5), "zero area"),
    (VisualPrompt("box", points=np.array([[20.0, 5.0], [5.0, 20.0]])), "zero area"),
    (VisualPrompt.scribble([(3, 3)]), "at least 2"),
    (VisualPrompt("point", points=np.zeros((2, 2))), "exactly 1"),
    (VisualPrompt("point"), "no points"),
    (VisualPrompt.point(np.nan, 3), "NaN"),
    (VisualPrompt.scribble([(3, 3), (np.inf, 4)]), "NaN or infinite"),
    (VisualPrompt.from_mask(np.zeros((50, 100))), "empty"),
    (VisualPrompt.from_mask(np.ones((100, 50))), "image is 50x100"),
    (VisualPrompt("mask", mask=np.ones((50, 100), np.float32)), "must be bool"),
    (VisualPrompt("mask"), "no mask"),
    (VisualPrompt("polygon", points=np.zeros((3, 2))), "unknown visual prompt kind 'polygon'"),
])
def test_invalid_prompts_raise_input_error(prompt, message):
    with pytest.raises(InputError, match=message):
        validate(prompt, 50, 100)
    with pytest.raises(InputError):
        rasterize(prompt, (50, 100), (16, 16))


# ---- rasterisation ----------------------------------------------------------------------

@pytest.mark.parametrize("out_hw", [(64, 64), (128, 96), (256, 256)])
@pytest.mark.parametrize("radius", [3.0, 5.0, 10.0])
def test_point_is_a_disc_of_the_given_radius_in_output_cells(out_hw, radius):
    out = rasterize(VisualPrompt.point(137.3, 71.9), (200, 300), out_hw, point_radius=radius)
    assert abs(out.sum() - np.pi * radius ** 2) <= 2 * radius  # lattice error grows like the perimeter
    ys, xs = np.nonzero(out)
    centre = np.array([137.3 * out_hw[1] / 300, 71.9 * out_hw[0] / 200])
    np.testing.assert_allclose([xs.mean() + 0.5, ys.mean() + 0.5], centre, atol=0.35)
    assert ndimage.label(out, EIGHT_CONNECTED)[1] == 1


def test_box_fill_is_exact_for_aligned_boxes():
    out = rasterize(VisualPrompt.box(20, 40, 100, 60), (100, 200), (50, 100))  # half resolution
    expected = np.zeros((50, 100), bool)
    expected[20:30, 10:50] = True
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_box_fill_at_image_resolution_is_the_box(height, width, data):
    x0 = data.draw(st.integers(0, width - 1))
    y0 = data.draw(st.integers(0, height - 1))
    x1 = data.draw(st.integers(x0 + 1, width))
    y1 = data.draw(st.integers(y0 + 1, height))
    out = rasterize(VisualPrompt.box(x0, y0, x1, y1), (height, width), (height, width))
    assert out.sum() == (x1 - x0) * (y1 - y0)
    assert out[y0:y1, x0:x1].all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 400), st.floats(0, 300)), min_size=2, max_size=12),
       st.sampled_from([(24, 24), (37, 53), (128, 128)]), st.floats(0.5, 4.0))
def test_scribble_is_one_connected_stroke(points, out_hw, width):
    out = rasterize(VisualPrompt.scribble(points), (300, 400), out_hw, scribble_width=width)
    assert ndimage.label(out, EIGHT_CONNECTED)[1] == 1
    for x, y in points:  # every vertex is on the stroke
        row = min(int(y * out_hw[0] / 300), out_hw[0] - 1)
        col = min(int(x * out_hw[1] / 400), out_hw[1] - 1)
        assert out[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2].any()


def test_scribble_width_is_in_output_cells():
    out = rasterize(VisualPrompt.scribble([(10, 50.5), (190, 50.5)]), (100, 200), (100, 200), scribble_width=5)
    assert out[:, 100].sum() == 5  # cell centres within 2.5 of y = 50.5
    assert out[48:53, 10:190].all() and not out[:48].any() and not out[53:].any()


def test_mask_resizes_to_the_output_grid():
    mask = _ellipse(240, 320, 150, 100, 80, 50)
    out = rasterize(VisualPrompt.from_mask(mask), (240, 320), (60, 80))
    expected = _ellipse(60, 80, 150 / 4, 100 / 4, 80 / 4, 50 / 4)
    assert (out & expected).sum() / (out | expected).sum() > 0.95


@pytest.mark.parametrize("prompt", [
    VisualPrompt.point(500.2, 500.7),
    VisualPrompt.box(500.0, 500.0, 500.2, 500.3),
    VisualPrompt.scribble([(500.2, 500.2), (500.4, 500.6)]),
    VisualPrompt.from_mask(np.pad(np.ones((1, 1), bool), ((500, 499), (500, 499)))),
])
def test_tiny_prompts_mark_the_cell_under_them(prompt):
    out = rasterize(prompt, (1000, 1000), (8, 8), point_radius=0.1, scribble_width=0.1)
    assert out.sum() == 1 and out[4, 4]


def test_bad_grids_are_refused():
    with pytest.raises(InputError, match="positive integers"):
        rasterize(VisualPrompt.point(1, 1), (10, 10), (0, 4))
    with pytest.raises(InputError, match="positive integers"):
        rasterize_in_model_frame(VisualPrompt.point(1, 1), Letterbox.fit(10, 10, 32), 2.5)


def test_prompts_on_the_border_stay_on_the_grid():
    out = rasterize(VisualPrompt.point(-0.5, 100.8), (100, 100), (10, 10), point_radius=0.2)
    assert out.sum() == 1 and out[9, 0]


# ---- model frame ------------------------------------------------------------------------

def test_model_frame_rasterisation_lands_inside_the_letterboxed_image():
    lb = Letterbox.fit(100, 300, 336)  # pad 100 image rows top and bottom
    out_size = 24  # 12.5 image pixels per cell; the image spans cells 8..16
    corner = rasterize_in_model_frame(VisualPrompt.point(0.5, 0.5), lb, out_size, point_radius=0.3)
    assert corner.sum() == 1 and corner[8, 0]
    box = rasterize_in_model_frame(VisualPrompt.box(0, 0, 300, 100), lb, out_size)
    expected = np.zeros((24, 24), bool)
    expected[8:16] = True
    np.testing.assert_array_equal(box, expected)


@pytest.mark.parametrize("height,width", [(120, 200), (200, 120), (64, 64)])
def test_mask_and_box_prompts_agree_in_the_model_frame(height, width):
    lb = Letterbox.fit(height, width, 224)
    mask = np.zeros((height, width), bool)
    mask[20:60, 30:50] = True
    as_mask = rasterize_in_model_frame(VisualPrompt.from_mask(mask), lb, 32)
    as_box = rasterize_in_model_frame(VisualPrompt.box(30, 20, 50, 60), lb, 32)
    assert as_mask.shape == (32, 32)
    assert (as_mask & as_box).sum() / (as_mask | as_box).sum() > 0.7
    tiny = np.zeros((height, width), bool)
    tiny[10, 10] = True
    assert rasterize_in_model_frame(VisualPrompt.from_mask(tiny), lb, 32).sum() == 1


def test_model_frame_validates_against_the_original_image():
    lb = Letterbox.fit(100, 300, 336)
    with pytest.raises(InputError, match="outside"):
        rasterize_in_model_frame(VisualPrompt.point(10, 150), lb, 24)  # inside the square, not the image


# ---- JSON -------------------------------------------------------------------------------

def test_dict_round_trip_through_json():
    mask = _ellipse(30, 40, 20, 15, 8, 5)
    for prompt in (VisualPrompt.point(1.5, 2.25), VisualPrompt.box(1, 2, 3, 4),
                   VisualPrompt.scribble([(0, 0), (1, 2), (3, 5)]), VisualPrompt.from_mask(mask)):
        data = json.loads(json.dumps(prompt.to_dict()))
        back = VisualPrompt.from_dict(data)
        assert back.kind == prompt.kind
        if prompt.kind == "mask":
            assert isinstance(data["mask"]["counts"], str)
            np.testing.assert_array_equal(back.mask, mask)
        else:
            np.testing.assert_array_equal(back.points, prompt.points)
    uncompressed = {"kind": "mask", "mask": rle.encode(mask, compressed=False)}
    np.testing.assert_array_equal(VisualPrompt.from_dict(uncompressed).mask, mask)


@pytest.mark.parametrize("data,message", [
    ({"points": [[1, 2]]}, '"kind"'),
    ({"kind": "lasso", "points": [[1, 2]]}, "unknown visual prompt kind"),
    ({"kind": "point"}, '"points"'),
    ({"kind": "box", "points": [[1, 2], [3]]}, r"\[\[x, y\]"),
    ({"kind": "mask"}, '"mask"'),
    ({"kind": "mask", "mask": {"size": [2, 2], "counts": [1, 2]}}, "add up to 3"),
    ({"kind": "mask", "mask": {"size": [2, 2], "counts": "~~"}}, "invalid character"),
])
def test_from_dict_errors(data, message):
    with pytest.raises(InputError, match=message):
        VisualPrompt.from_dict(data)


# ---- RLE against pycocotools ------------------------------------------------------------

# pycocotools' decode passes copy=False to numpy 2's __array__: harmless, and not ours
pycocotools_numpy2 = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@st.composite
def masks(draw):
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    style = draw(st.sampled_from(["random", "empty", "full", "ellipse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if style == "random":
        return rng.random((height, width)) < rng.random()
    if style == "ellipse":
        return _ellipse(height, width, width / 2, height / 2, width / 3 + 0.5, height / 3 + 0.5)
    return np.full((height, width), style == "full")


@pycocotools_numpy2
@settings(max_examples=150, deadline=None)
@given(masks())
def test_rle_matches_pycocotools(mask):
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    ours = rle.encode(mask)
    assert ours["size"] == list(theirs["size"])
    assert ours["counts"] == theirs["counts"].decode("ascii")
    np.testing.assert_array_equal(rle.decode(theirs), mask)  # bytes counts accepted
    np.testing.assert_array_equal(coco_mask.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
    uncompressed = rle.encode(mask, compressed=False)
    assert all(isinstance(c, int) for c in uncompressed["counts"])
    from_list = coco_mask.frPyObjects(dict(uncompressed), *mask.shape)
    assert from_list["counts"] == theirs["counts"]
    np.testing.assert_array_equal(rle.decode(uncompressed), mask)
    assert rle.area(ours) == int(coco_mask.area(theirs)) == int(mask.sum())


@pycocotools_numpy2
def test_rle_large_counts_and_errors():
    mask = np.zeros((1000, 1000), bool)
    mask[999, 999] = True  # long runs need many 5-bit groups
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle.encode(mask)["counts"] == theirs["counts"].decode()
    np.testing.assert_array_equal(rle.decode(theirs), mask)
    with pytest.raises(InputError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), bool))
    with pytest.raises(InputError, match="RLE dict"):
        rle.decode([1, 2, 3])
    with pytest.raises(InputError, match="ends in the middle"):
        rle.decode({"size": [2, 2], "counts": "o"})  # 'o' = 48 + 0x3f: a continuation with nothing after
