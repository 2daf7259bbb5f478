"""Image and box geometry shared by the model, the data pipeline and the ROS node.

Coordinates are continuous pixels: pixel (i, j) covers ``[j, j+1) x [i, i+1)``, so an
image of width W spans ``x in [0, W]``. Boxes are ``x0, y0, x1, y1`` (xyxy) unless a
name says ``cxcywh``.

The model frame is the image letterboxed to ``S x S``: padded to a centered square of
side ``max(H, W)`` (equal padding on both sides, the odd pixel going right/bottom), then
resized. Centering keeps the object layout symmetric, which the cosine positional
encoding of the visual prompts sees. Pads are whole original pixels, so the forward and
inverse transforms are exact affine maps: ``model = (image + pad) * scale``.

Box helpers work on numpy arrays and torch tensors alike (same function, same type out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from refvlm_core.errors import InputError

# CLIP's normalisation mean as uint8 RGB: padding with it makes the pad zero after
# normalisation, so the encoders see "nothing" there.
CLIP_MEAN_RGB = (122, 116, 104)


# Longer images are shrunk before padding: the padded square grows with the long side
# squared (a 1x100000 image would pad to 30 GB), the model input does not.
MAX_PAD_SIDE = 2048


@dataclass(frozen=True)
class Letterbox:
    """Centered pad-to-square then resize of an ``height x width`` image to ``size x size``."""

    height: int  # original image
    width: int
    size: int    # model input side

    def __post_init__(self) -> None:
        for name in ("height", "width", "size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise InputError(f"Letterbox {name} must be a positive integer, got {value!r}")

    @classmethod
    def fit(cls, height: int, width: int, size: int) -> "Letterbox":
        return cls(int(height), int(width), int(size))

    @property
    def side(self) -> int:
        """Side of the padded square, in original pixels."""
        return max(self.height, self.width)

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.size / self.side

    @property
    def left(self) -> int:
        """Original pixels of padding on the left."""
        return (self.side - self.width) // 2

    @property
    def top(self) -> int:
        """Original pixels of padding on top."""
        return (self.side - self.height) // 2

    @property
    def pad_x(self) -> float:
        """Left padding in model pixels."""
        return self.left * self.scale

    @property
    def pad_y(self) -> float:
        """Top padding in model pixels."""
        return self.top * self.scale

    # ---- images -------------------------------------------------------------------

    def _pad_to_square(self, image: np.ndarray, value: Any) -> np.ndarray:
        side = self.side
        return cv2.copyMakeBorder(
            image, self.top, side - self.height - self.top, self.left, side - self.width - self.left,
            cv2.BORDER_CONSTANT, value=value)

    def image_to_model(self, image: np.ndarray, pad_value: float | Sequence[float] = 0) -> np.ndarray:
        """[H, W, C] or [H, W] -> [size, size, C] or [size, size], same dtype.

        ``pad_value``: a number or one value per channel (e.g. ``CLIP_MEAN_RGB``).
        """
        self._check_hw(image, "image")
        if self.side > MAX_PAD_SIDE:
            return self._shrunk().image_to_model(self._shrink(image), pad_value)
        if image.ndim == 3 and not np.isscalar(pad_value):
            pad_value = tuple(float(v) for v in pad_value)
        elif np.isscalar(pad_value):
            pad_value = (float(pad_value),) * 4
        square = self._pad_to_square(np.ascontiguousarray(image), pad_value)
        out = resize_image(square, self.size, self.size)
        if image.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel
            out = out[:, :, None]
        return out

    def _shrunk(self) -> "Letterbox":
        """The Letterbox of ``image`` shrunk so its long side is MAX_PAD_SIDE."""
        factor = MAX_PAD_SIDE / self.side
        return Letterbox(max(1, round(self.height * factor)), max(1, round(self.width * factor)), self.size)

    def _shrink(self, image: np.ndarray) -> np.ndarray:
        small = self._shrunk()
        out = resize_image(np.ascontiguousarray(image), small.height, small.width)
        return out[:, :, None] if image.ndim == 3 and out.ndim == 2 else out

    def _check_hw(self, array: np.ndarray, what: str) -> None:
        if array.shape[:2] != (self.height, self.width):
            raise InputError(
                f"{what} is {array.shape[0]}x{array.shape[1]} but this Letterbox was made for "
                f"{self.height}x{self.width}: build it with Letterbox.fit(*{what}.shape[:2], size)")

    # ---- points and boxes ---------------------------------------------------------

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """[..., 2] x, y original pixels -> model pixels."""
        points = np.asarray(points, dtype=np.float64)
        return (points + (self.left, self.top)) * self.scale

    def points_to_image(self, points: np.ndarray) -> np.ndarray:
        """[..., 2] x, y model pixels -> original pixels."""
        points = np.asarray(points, dtype=np.float64)
        return points / self.scale - (self.left, self.top)

    def boxes_to_model(self, xyxy: np.ndarray) -> np.ndarray:
        """[N, 4] xyxy original pixels -> model pixels."""
        xyxy = np.asarray(xyxy, dtype=np.float64)
        return self.points_to_model(xyxy.reshape(*xyxy.shape[:-1], 2, 2)).reshape(xyxy.shape)

    def boxes_to_image(self, xyxy: np.ndarray) -> np.ndarray:
        """[N, 4] xyxy model pixels -> original pixels."""
        xyxy = np.asarray(xyxy, dtype=np.float64)
        return self.points_to_image(xyxy.reshape(*xyxy.shape[:-1], 2, 2)).reshape(xyxy.shape)

    # ---- dense maps ---------------------------------------------------------------

    def _model_to_image_matrix(self, map_h: int, map_w: int) -> np.ndarray:
        """2x3 affine from an image pixel centre to the matching position in a map that
        covers the whole model frame at ``map_h x map_w`` (cv2 centre convention)."""
        kx, ky = map_w / self.side, map_h / self.side
        return np.array([[kx, 0.0, (self.left + 0.5) * kx - 0.5],
                         [0.0, ky, (self.top + 0.5) * ky - 0.5]])

    def _warp_to_image(self, values: np.ndarray, interpolation: int) -> np.ndarray:
        matrix = self._model_to_image_matrix(*values.shape[:2])
        return cv2.warpAffine(values, matrix, (self.width, self.height),
                              flags=interpolation | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)

    def mask_to_image(self, mask: np.ndarray) -> np.ndarray:
        """[h, w] mask over the whole model frame (any resolution) -> [H, W].

        bool in -> bool out (bilinear coverage >= 0.5); float in (logits or
        probabilities) -> float32 out, bilinearly resampled: threshold it yourself.
        """
        mask = _check_2d(mask, "mask")
        if mask.dtype == bool:
            return self._warp_to_image(mask.astype(np.float32), cv2.INTER_LINEAR) >= 0.5
        return self._warp_to_image(mask.astype(np.float32), cv2.INTER_LINEAR)

    def dense_to_image(self, values: np.ndarray) -> np.ndarray:
        """[h, w] float map over the model frame (e.g. depth) -> [H, W] float32.

        NaN marks unknown: an output pixel is NaN where its nearest source cell is NaN;
        elsewhere it is the bilinear mean of the known neighbours.
        """
        values = _check_2d(values, "dense map").astype(np.float32)
        unknown = np.isnan(values)
        if not unknown.any():
            return self._warp_to_image(values, cv2.INTER_LINEAR)
        known = (~unknown).astype(np.float32)
        weight = self._warp_to_image(known, cv2.INTER_LINEAR)
        total = self._warp_to_image(np.where(unknown, 0.0, values).astype(np.float32), cv2.INTER_LINEAR)
        nearest_unknown = self._warp_to_image(unknown.astype(np.uint8), cv2.INTER_NEAREST).astype(bool)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = total / weight
        out[nearest_unknown | (weight <= 0)] = np.nan
        return out

    def mask_coverage_to_model(self, mask: np.ndarray, out_size: int) -> np.ndarray:
        """[H, W] bool -> [out, out] float32: fraction of each model cell the mask covers."""
        self._check_hw(mask, "mask")
        square = self._pad_to_square(np.ascontiguousarray(mask, dtype=np.float32), 0.0)
        return resize_image(square, out_size, out_size)

    def mask_to_model(self, mask: np.ndarray, out_size: int) -> np.ndarray:
        """[H, W] bool -> [out, out] bool in the letterboxed frame (coverage >= 0.5)."""
        return self.mask_coverage_to_model(mask, out_size) >= 0.5


def resize_image(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[H, W(, C)] -> [out_h, out_w(, C)]: area averaging when shrinking (no aliasing),
    bilinear when growing. A bool mask should be given as float32 (the result is its coverage)."""
    shrinking = out_h < image.shape[0] or out_w < image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (out_w, out_h), interpolation=interpolation)


def _check_2d(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.size == 0:
        raise InputError(f"expected a non-empty 2-D {what} [h, w], got shape {array.shape}")
    return array


# ---- boxes (numpy or torch) -------------------------------------------------------

def _stack(like: Any, parts: Sequence[Any]) -> Any:
    if isinstance(like, np.ndarray):
        return np.stack(parts, axis=-1)
    import torch
    return torch.stack(list(parts), dim=-1)


def xyxy_to_cxcywh(boxes: Any) -> Any:
    """[..., 4] x0, y0, x1, y1 -> cx, cy, w, h (numpy or torch)."""
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    return _stack(boxes, [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])


def cxcywh_to_xyxy(boxes: Any) -> Any:
    """[..., 4] cx, cy, w, h -> x0, y0, x1, y1 (numpy or torch)."""
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return _stack(boxes, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def normalize_boxes(boxes: Any, size: float) -> Any:
    """Pixels of an S x S model frame -> [0, 1]. Any box format (xyxy or cxcywh)."""
    return boxes / size


def denormalize_boxes(boxes: Any, size: float) -> Any:
    """[0, 1] of an S x S model frame -> pixels. Any box format."""
    return boxes * size


def clip_boxes(boxes: Any, height: float, width: float) -> Any:
    """[..., 4] xyxy clipped to the image ``[0, W] x [0, H]`` (numpy or torch)."""
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    return _stack(boxes, [x0.clip(0, width), y0.clip(0, height), x1.clip(0, width), y1.clip(0, height)])


def box_area(boxes: Any) -> Any:
    """[..., 4] xyxy -> [...] area; inverted boxes count as 0."""
    return (boxes[..., 2] - boxes[..., 0]).clip(min=0) * (boxes[..., 3] - boxes[..., 1]).clip(min=0)


def _pairwise_inter_union(a: Any, b: Any) -> tuple[Any, Any]:
    lt_x = _maximum(a[:, None, 0], b[None, :, 0])
    lt_y = _maximum(a[:, None, 1], b[None, :, 1])
    rb_x = _minimum(a[:, None, 2], b[None, :, 2])
    rb_y = _minimum(a[:, None, 3], b[None, :, 3])
    inter = (rb_x - lt_x).clip(min=0) * (rb_y - lt_y).clip(min=0)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def _maximum(a: Any, b: Any) -> Any:
    return np.maximum(a, b) if isinstance(a, np.ndarray) else a.maximum(b)


def _minimum(a: Any, b: Any) -> Any:
    return np.minimum(a, b) if isinstance(a, np.ndarray) else a.minimum(b)


_EPS = 1e-9  # only guards 0/0 for degenerate boxes


def box_iou(a: Any, b: Any) -> Any:
    """Pairwise IoU: [N, 4] xyxy, [M, 4] xyxy -> [N, M] (numpy or torch)."""
    inter, union = _pairwise_inter_union(a, b)
    return inter / union.clip(min=_EPS)


def generalized_box_iou(a: Any, b: Any) -> Any:
    """Pairwise generalised IoU in [-1, 1]: [N, 4], [M, 4] xyxy -> [N, M].

    Differentiable in torch (used by matching costs and box losses); also takes numpy.
    """
    inter, union = _pairwise_inter_union(a, b)
    iou = inter / union.clip(min=_EPS)
    hull_w = _maximum(a[:, None, 2], b[None, :, 2]) - _minimum(a[:, None, 0], b[None, :, 0])
    hull_h = _maximum(a[:, None, 3], b[None, :, 3]) - _minimum(a[:, None, 1], b[None, :, 1])
    hull = hull_w.clip(min=0) * hull_h.clip(min=0)
    return iou - (hull - union) / hull.clip(min=_EPS)


# ---- images -----------------------------------------------------------------------

def validate_image(image: Any) -> np.ndarray:
    """Check a user image and return it as a C-contiguous ``[H, W, 3] uint8`` RGB array.

    Grey images (``[H, W]`` or ``[H, W, 1]`` uint8, e.g. mono8 cameras) are repeated to
    3 channels. Everything else raises InputError saying what was expected.
    """
    if not isinstance(image, np.ndarray):
        raise InputError(f"expected an RGB image as a numpy HxWx3 uint8 array, got {type(image).__name__}")
    described = f"{image.dtype} with shape {image.shape}"
    if image.dtype != np.uint8:
        raise InputError(f"expected an RGB image as HxWx3 uint8, got {described}; "
                         "convert it with (image * 255).clip(0, 255).astype(np.uint8) if it is in [0, 1]")
    if image.ndim == 3 and image.shape[2] == 4:
        raise InputError(f"expected an RGB image as HxWx3 uint8, got {described}: drop the alpha channel "
                         "with image[..., :3]")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an RGB image as HxWx3 uint8, got {described}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"expected a non-empty RGB image, got {described}")
    return np.ascontiguousarray(image)


def parse_size(text: str) -> tuple[int, int]:
    """A command line's image size: "320x240" -> (width, height) = (320, 240)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size must be WIDTHxHEIGHT such as 320x240, got {text!r}") from None
    return width, height
