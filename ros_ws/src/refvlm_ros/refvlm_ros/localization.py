"""Camera-frame 3D position and extent of a referred object, from its mask, an
aligned depth image and the camera intrinsics. Pure numpy (no ROS).

Frames: pixels (u right, v down, pixel centres at integers, as in CameraInfo.K);
camera optical frame (REP-103: x right, y down, z forward), metres. Depth is REP-118:
metres along z, NaN unknown.

Robustness: a mask predicted at low resolution bleeds onto the background and depth
sensors give "flying pixels" at edges, so the points are filtered to a depth band
around the object's own (median) depth, median +- max(k * robust sigma, margin) with
sigma from the median absolute deviation, before the median position and the
percentile extent. This holds while the object covers most of its mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refvlm_core.errors import InputError

# A focal length under one pixel is no real camera: it turns pixel offsets into metres
# times the inverse (fx=1e-300 put objects 1e300 m to the side).
MIN_FOCAL_PX = 1.0
# Nor is one of more than this many image sizes (a long telephoto lens is ~50): fx=1e308
# puts every object on the optical axis.
MAX_FOCAL_IMAGE_SIZES = 100.0
# A principal point farther than this many image sizes from the image's centre is a
# broken calibration (cx=1e12 put an object 1.4e10 m to the side).
MAX_CENTRE_OFFSET_IMAGE_SIZES = 1.0


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels (CameraInfo.k = [fx 0 cx; 0 fy cy; 0 0 1])."""

    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_k(cls, k: "np.ndarray | list[float]") -> "Intrinsics":
        k = np.asarray(k, dtype=np.float64).reshape(-1)
        if k.size != 9:
            raise InputError(f"camera matrix K needs 9 values, got {k.size}")
        fx, fy, cx, cy = float(k[0]), float(k[4]), float(k[2]), float(k[5])
        if not np.all(np.isfinite([fx, fy, cx, cy])):
            raise InputError(f"camera matrix K has non-finite values (fx={fx}, fy={fy}, cx={cx}, "
                             f"cy={cy}); publish a calibrated CameraInfo")
        if not (fx >= MIN_FOCAL_PX and fy >= MIN_FOCAL_PX):
            raise InputError(f"camera matrix K has fx={fx}, fy={fy} (need >= {MIN_FOCAL_PX} pixel); "
                             "publish a calibrated CameraInfo")
        return cls(fx, fy, cx, cy)

    def check_plausible(self, width: int, height: int) -> "Intrinsics":
        """Raises InputError unless a real camera of this image size could have these
        intrinsics: focal length at most MAX_FOCAL_IMAGE_SIZES image sizes, principal point
        near the image."""
        size = max(width, height)
        if max(self.fx, self.fy) > MAX_FOCAL_IMAGE_SIZES * size:
            raise InputError(f"camera matrix K has fx={self.fx:g}, fy={self.fy:g} for a {width}x{height} "
                             f"image (more than {MAX_FOCAL_IMAGE_SIZES:g} image sizes); publish a "
                             "calibrated CameraInfo")
        reach = MAX_CENTRE_OFFSET_IMAGE_SIZES
        if abs(self.cx - (width - 1) / 2) > reach * width or abs(self.cy - (height - 1) / 2) > reach * height:
            raise InputError(f"camera matrix K has its principal point at cx={self.cx:g}, cy={self.cy:g}, "
                             f"far outside the {width}x{height} image; publish a calibrated CameraInfo")
        return self

    def scaled(self, sx: float, sy: float) -> "Intrinsics":
        """Intrinsics of the same camera resampled by (sx, sy) (pixel centres kept)."""
        return Intrinsics(self.fx * sx, self.fy * sy,
                          (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5)


def check_alignment(image_hw: tuple[int, int], depth_hw: tuple[int, int], info_hw: tuple[int, int],
                    sent: bool = False) -> None:
    """Depth and CameraInfo must describe the image's pixels; raises InputError saying what to
    fix. A size of (0, 0) is not known (a compressed image before decoding, a CameraInfo
    without size) and matches any. ``sent``: the three came with one request (the fix is to
    send them aligned), else from the camera's topics (to publish them aligned)."""
    act, depth_name, info_name = ("send", "the request depth", "the request camera_info") if sent else \
        ("publish", "the depth image", "the CameraInfo")

    def size(hw: tuple[int, int]) -> str:
        return f"{hw[1]}x{hw[0]}"

    if image_hw[0] and depth_hw != image_hw:
        raise InputError(f"{depth_name} is {size(depth_hw)} but the image is {size(image_hw)}: "
                         f"{act} depth aligned to the image")
    if image_hw[0] and info_hw[0] and info_hw != image_hw:
        raise InputError(f"{info_name} is for {size(info_hw)} but the image is {size(image_hw)}: "
                         f"{act} the image's own CameraInfo")
    if info_hw[0] and info_hw != depth_hw:
        raise InputError(f"{info_name} is for {size(info_hw)} but the depth image is {size(depth_hw)}: "
                         f"{act} depth aligned to the camera")


@dataclass(frozen=True)
class LocalizationConfig:
    min_pixels: int = 20                          # fewer valid depth pixels -> no position
    band_sigmas: float = 3.0                      # depth band kept: median +- this many robust sigmas
    band_margin_m: float = 0.05                   # band half-width at least this: flat faces keep their pixels
    extent_percentiles: tuple[float, float] = (5.0, 95.0)
    min_depth_m: float = 0.05                     # closer / farther readings are sensor noise
    max_depth_m: float = 100.0


@dataclass(frozen=True)
class Location:
    position: np.ndarray  # [3] metres, camera frame: median of the kept points
    extent: np.ndarray    # [3] metres: size along x, y, z (percentile range, rescaled)
    pixels: int           # points the estimate used
    depth_median: float   # metres, over the kept points
    depth_min: float
    depth_max: float


def back_project(us: np.ndarray, vs: np.ndarray, z: np.ndarray, k: Intrinsics) -> np.ndarray:
    """Pixels [N] + depth [N] -> camera-frame points [N, 3]."""
    return np.stack([(us - k.cx) * z / k.fx, (vs - k.cy) * z / k.fy, z], axis=1)


def _resample_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[h, w] -> [H, W] by nearest neighbour at pixel centres."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
    return mask[rows][:, cols]


def box_region(box_xyxy: np.ndarray, shape: tuple[int, int], keep: float = 0.5) -> np.ndarray:
    """[H, W] bool: the central `keep` fraction (per side) of a box; less background than the box."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * keep / 2, (y1 - y0) * keep / 2
    region = np.zeros(shape, dtype=bool)
    r0, r1 = max(int(np.floor(cy - hh)), 0), min(int(np.ceil(cy + hh)), shape[0])
    c0, c1 = max(int(np.floor(cx - hw)), 0), min(int(np.ceil(cx + hw)), shape[1])
    region[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True  # a zero-size box inside still has its pixel
    return region


def keypoint_box(keypoints: np.ndarray, min_visibility: float = 0.5) -> np.ndarray | None:
    """[K, 3] keypoints (x, y pixels, visibility probability) -> [4] xyxy around those seen
    with probability >= ``min_visibility``, None when fewer than two are. A skeleton is thin:
    the centre of its box is the torso, where the median of the joints' own pixels leans to
    the head and arms (17 COCO joints, 11 above the hips)."""
    seen = keypoints[(keypoints[:, 2] >= min_visibility) & np.isfinite(keypoints[:, :2]).all(axis=1)]
    if len(seen) < 2:
        return None
    return np.concatenate([seen[:, :2].min(axis=0), seen[:, :2].max(axis=0)])


def depth_band(z: np.ndarray, config: LocalizationConfig) -> np.ndarray:
    """[N] bool: depths within the robust band around the median depth."""
    median = np.median(z)
    sigma = 1.4826 * np.median(np.abs(z - median))  # MAD -> sigma for a normal distribution
    return np.abs(z - median) <= max(config.band_sigmas * sigma, config.band_margin_m)


def localize(mask: np.ndarray, depth: np.ndarray, intrinsics: Intrinsics,
             config: LocalizationConfig = LocalizationConfig()) -> tuple[Location | None, str]:
    """Mask [h, w] bool + depth [H, W] float32 metres (NaN unknown) -> (Location, "") or
    (None, reason). A mask of another resolution is resampled to the depth's."""
    if depth.ndim != 2 or mask.ndim != 2:
        raise InputError(f"mask {mask.shape} and depth {depth.shape} must both be [H, W]")
    if mask.shape != depth.shape:
        mask = _resample_nearest(mask, depth.shape)
    vs, us = np.nonzero(mask)
    if vs.size == 0:
        return None, "empty mask"
    z = depth[vs, us].astype(np.float64)
    valid = np.isfinite(z) & (z >= config.min_depth_m) & (z <= config.max_depth_m)
    if int(valid.sum()) < config.min_pixels:
        too_far = int(np.sum(z > config.max_depth_m))  # NaN compares False
        beyond = f", {too_far} beyond max_depth_m={config.max_depth_m:g} m" if too_far else ""
        return None, (f"only {int(valid.sum())} of {vs.size} mask pixels have valid depth "
                      f"(need {config.min_pixels}{beyond})")
    us, vs, z = us[valid], vs[valid], z[valid]
    kept = depth_band(z, config)
    points = back_project(us[kept].astype(np.float64), vs[kept].astype(np.float64), z[kept], intrinsics)
    if points.shape[0] < config.min_pixels:
        return None, f"only {points.shape[0]} pixels left after rejecting depth outliers"
    p_lo, p_hi = config.extent_percentiles
    lo, hi = np.percentile(points, (p_lo, p_hi), axis=0)
    return Location(
        position=np.median(points, axis=0),
        extent=(hi - lo) * 100.0 / (p_hi - p_lo),  # full size if points spread evenly
        pixels=int(points.shape[0]),
        depth_median=float(np.median(points[:, 2])),
        depth_min=float(points[:, 2].min()),
        depth_max=float(points[:, 2].max()),
    ), ""
