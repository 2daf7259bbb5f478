"""3D localisation from mask + depth + intrinsics, on synthetic scenes whose answer is
known: a fronto-parallel square, a box face in front of a wall with the mask bleeding
onto the wall and flying pixels, a tilted plane, and too few valid pixels."""
from __future__ import annotations

import numpy as np
import pytest

from refvlm_core.errors import InputError

loc = pytest.importorskip("refvlm_ros.localization", reason="refvlm_ros not installed: run 'make setup'")

K = loc.Intrinsics(fx=500.0, fy=500.0, cx=319.5, cy=239.5)
H, W = 480, 640


def square_mask(u0: int, v0: int, size: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[v0:v0 + size, u0:u0 + size] = True
    return mask


def test_fronto_parallel_square_position_and_extent():
    # A 0.4 m square at z = 2 m, centred on the optical axis: 100 px wide at f = 500.
    depth = np.full((H, W), 2.0, np.float32)
    mask = square_mask(270, 190, 100)
    location, reason = loc.localize(mask, depth, K)
    assert reason == "" and location is not None
    np.testing.assert_allclose(location.position, [0.0, 0.0, 2.0], atol=0.005)
    np.testing.assert_allclose(location.extent, [0.4, 0.4, 0.0], atol=0.01)
    assert location.pixels == 100 * 100
    assert (location.depth_median, location.depth_min, location.depth_max) == (2.0, 2.0, 2.0)


def test_box_in_front_of_wall_rejects_bleeding_and_flying_pixels():
    rng = np.random.default_rng(1)
    depth = np.full((H, W), 4.0, np.float32)           # wall
    depth[100:200, 400:500] = 1.5                      # box face, 100x100 px, off-centre
    mask = square_mask(390, 90, 120)                   # mask bleeds 10 px onto the wall
    flying = rng.choice(np.flatnonzero(mask.ravel()), 200, replace=False)
    depth.ravel()[flying] = rng.uniform(0.1, 10.0, 200).astype(np.float32)
    depth[150, 450] = np.nan                           # a hole
    location, _ = loc.localize(mask, depth, K)
    # Box centre pixel (449.5, 149.5) at 1.5 m -> x = 130 * 1.5 / 500, y = -90 * 1.5 / 500.
    np.testing.assert_allclose(location.position, [0.39, -0.27, 1.5], atol=0.01)
    assert location.extent[2] < 0.05                   # the wall did not stretch it in z
    assert 0.27 < location.extent[0] < 0.33            # 100 px at 1.5 m = 0.30 m
    assert location.depth_median == pytest.approx(1.5)


def test_tilted_plane_recovers_the_centre_point():
    # Plane z = 2 + 0.5 * y (floor-like); the mask's centre ray hits it at known depth.
    vs = np.arange(H, dtype=np.float32)[:, None].repeat(W, axis=1)
    depth = 2.0 / (1.0 - 0.5 * (vs - K.cy) / K.fy)     # solve z = 2 + 0.5 * (v - cy) z / fy
    mask = square_mask(270, 190, 100)
    location, _ = loc.localize(mask, depth.astype(np.float32), K)
    z_centre = 2.0 / (1.0 - 0.5 * (239.5 - K.cy) / K.fy)
    np.testing.assert_allclose(location.position, [0.0, 0.0, z_centre], atol=0.01)
    assert location.extent[2] == pytest.approx(0.1 * 2.0 * 2.0 * 0.5, rel=0.25)  # z spread of a tilted patch


def test_too_few_valid_pixels_gives_a_reason():
    depth = np.full((H, W), np.nan, np.float32)
    depth[200, 300:305] = 1.0
    location, reason = loc.localize(square_mask(290, 190, 30), depth, K)
    assert location is None and "only 5 of 900 mask pixels have valid depth" in reason
    location, reason = loc.localize(np.zeros((H, W), bool), depth, K)
    assert location is None and reason == "empty mask"


def test_mask_at_another_resolution_is_resampled():
    depth = np.full((H, W), 2.0, np.float32)
    small = square_mask(270, 190, 100)[::4, ::4]       # a 1/4-resolution model mask
    location, _ = loc.localize(small, depth, K)
    np.testing.assert_allclose(location.position, [0.0, 0.0, 2.0], atol=0.01)


def test_box_region_and_intrinsics_validation():
    region = loc.box_region(np.array([100.0, 50.0, 200.0, 150.0]), (H, W), keep=0.5)
    rows, cols = np.nonzero(region)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (75, 124, 125, 174)
    assert loc.Intrinsics.from_k([500, 0, 320, 0, 400, 240, 0, 0, 1]) == loc.Intrinsics(500, 400, 320, 240)
    with pytest.raises(InputError, match="calibrated CameraInfo"):
        loc.Intrinsics.from_k([0] * 9)
    with pytest.raises(InputError, match="needs 9 values"):
        loc.Intrinsics.from_k([1, 2, 3])
    with pytest.raises(InputError, match="must both be"):
        loc.localize(np.ones((4, 4, 1), bool), np.ones((4, 4), np.float32), K)


def test_keypoint_box_spans_the_seen_joints_only():
    keypoints = np.array([[10.0, 20.0, 0.9], [600.0, 400.0, 0.6], [300.0, 200.0, 0.2], [np.nan, 3.0, 0.9]])
    np.testing.assert_array_equal(loc.keypoint_box(keypoints), [10.0, 20.0, 600.0, 400.0])
    assert loc.keypoint_box(keypoints[1:]) is None  # one seen joint spans nothing
