"""sensor_msgs/Image <-> numpy, without cv_bridge.

cv_bridge is used when a working one is installed (the PyPI copy is a ROS 1 build
that breaks on numpy 2 and OpenCV 5, so usually it is not). Both paths share the
same validation, so a malformed message gets the same ``InputError`` either way.

Reading is zero-copy where the layout allows it (``np.frombuffer`` over the message
buffer, row padding skipped with a strided view); byte swapping, channel reordering
and dropping alpha copy. Messages are duck-typed (``height``, ``width``, ``encoding``,
``step``, ``is_bigendian``, ``data``), so this module imports rclpy only to build one.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from refvlm_core.errors import InputError


@dataclass(frozen=True)
class Encoding:
    dtype: np.dtype
    channels: int


ENCODINGS: dict[str, Encoding] = {
    "rgb8": Encoding(np.dtype(np.uint8), 3),
    "bgr8": Encoding(np.dtype(np.uint8), 3),
    "rgba8": Encoding(np.dtype(np.uint8), 4),
    "bgra8": Encoding(np.dtype(np.uint8), 4),
    "mono8": Encoding(np.dtype(np.uint8), 1),
    "16UC1": Encoding(np.dtype(np.uint16), 1),
    "32FC1": Encoding(np.dtype(np.float32), 1),
}
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = ("32FC1", "16UC1")
# Aliases some drivers publish for the same layouts.
_ALIASES = {"mono16": "16UC1", "8UC1": "mono8", "8UC3": "bgr8", "8UC4": "bgra8"}


def _encoding_of(msg: Any, allowed: tuple[str, ...]) -> tuple[str, Encoding]:
    name = _ALIASES.get(msg.encoding, msg.encoding)
    if name not in allowed:
        raise InputError(
            f"image encoding '{msg.encoding}' is not supported here; publish one of "
            f"{', '.join(allowed)}")
    return name, ENCODINGS[name]


def _validate(msg: Any, enc: Encoding) -> int:
    """Checks the size fields against the buffer; returns the packed row size in bytes."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise InputError(f"empty image ({width}x{height}); send an image with pixels")
    row_bytes = width * enc.channels * enc.dtype.itemsize
    if step < row_bytes:
        raise InputError(
            f"image step {step} is smaller than width*channels*bytes = {row_bytes} "
            f"({width}x{enc.channels}x{enc.dtype.itemsize}); set step to the row size in bytes")
    size = len(msg.data)
    if size != step * height:
        raise InputError(
            f"image data has {size} bytes but step*height = {step}*{height} = {step * height}; "
            "the data does not match the header")
    return row_bytes


def _raw_view(msg: Any, enc: Encoding) -> np.ndarray:
    """[H, W, C] (or [H, W]) array over msg.data, byte order fixed; zero-copy when native."""
    row_bytes = _validate(msg, enc)
    height, width = int(msg.height), int(msg.width)
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, int(msg.step))
    pixels = rows[:, :row_bytes]  # skip row padding: still a view
    big = bool(msg.is_bigendian)
    dtype = enc.dtype.newbyteorder(">" if big else "<")
    array = pixels.view(dtype)
    if enc.dtype.itemsize > 1 and big != (sys.byteorder == "big"):
        array = array.astype(enc.dtype)  # swap to native order (copies)
    shape = (height, width) if enc.channels == 1 else (height, width, enc.channels)
    return array.reshape(shape)


@lru_cache(maxsize=1)
def cv_bridge_instance() -> Any | None:
    """A CvBridge when one imports AND round-trips an image correctly, else None."""
    try:
        from cv_bridge import CvBridge  # noqa: PLC0415 (optional dependency)
        bridge = CvBridge()
        probe = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
        back = bridge.imgmsg_to_cv2(bridge.cv2_to_imgmsg(probe, encoding="rgb8"), "passthrough")
        return bridge if np.array_equal(np.asarray(back), probe) else None
    except Exception:  # noqa: BLE001 (a broken install is the common case: fall back)
        return None


def _read(msg: Any, enc: Encoding, backend: str) -> np.ndarray:
    if backend == "cv_bridge":
        bridge = cv_bridge_instance()
        if bridge is None:
            raise InputError("cv_bridge backend requested but no working cv_bridge is installed")
        _validate(msg, enc)
        return np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="passthrough"))
    if backend != "numpy":
        raise InputError(f"unknown image backend '{backend}'; use 'numpy' or 'cv_bridge'")
    return _raw_view(msg, enc)


def default_backend() -> str:
    return "cv_bridge" if cv_bridge_instance() is not None else "numpy"


def image_to_array(msg: Any, backend: str | None = None) -> np.ndarray:
    """Any supported encoding -> [H, W, C] or [H, W] array in the message's own layout."""
    _, enc = _encoding_of(msg, tuple(ENCODINGS))
    return _read(msg, enc, backend or default_backend())


def image_to_rgb(msg: Any, backend: str | None = None) -> np.ndarray:
    """Colour or mono image -> [H, W, 3] uint8 RGB, C-contiguous (what the Predictor takes)."""
    name, enc = _encoding_of(msg, COLOR_ENCODINGS)
    array = _read(msg, enc, backend or default_backend())
    if name == "mono8":
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif name.startswith("bgr"):
        array = array[:, :, 2::-1]   # BGR(A) -> RGB, alpha dropped
    elif name == "rgba8":
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG, PNG: what image_transport's compressed plugin
    sends) -> [H, W, 3] uint8 RGB."""
    import cv2  # noqa: PLC0415 (only compressed inputs need it)
    data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise InputError(f"the compressed image (format {msg.format!r}, {data.size} bytes) does not "
                         "decode; publish JPEG or PNG (image_transport 'compressed')")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def depth_to_metres(msg: Any, depth_scale: float = 0.001, backend: str | None = None) -> np.ndarray:
    """Depth image -> [H, W] float32 metres along camera Z, NaN unknown (REP-118).

    16UC1 is scaled by ``depth_scale`` (millimetres by default) with 0 -> NaN;
    32FC1 is taken as metres, with 0, negatives and infinities -> NaN.
    """
    name, enc = _encoding_of(msg, DEPTH_ENCODINGS)
    raw = _read(msg, enc, backend or default_backend())
    if name == "16UC1":
        metres = raw.astype(np.float32) * np.float32(depth_scale)
        metres[raw == 0] = np.nan
        return metres
    metres = np.array(raw, dtype=np.float32)  # copy: the caller may keep it past the message
    metres[~np.isfinite(metres) | (metres <= 0)] = np.nan
    return metres


def array_to_image(array: np.ndarray, encoding: str, header: Any = None) -> Any:
    """[H, W, C] or [H, W] array -> sensor_msgs/Image (packed rows, native byte order)."""
    from sensor_msgs.msg import Image  # noqa: PLC0415 (keep this module importable without ROS)

    if encoding not in ENCODINGS:
        raise InputError(f"cannot encode '{encoding}'; use one of {', '.join(ENCODINGS)}")
    enc = ENCODINGS[encoding]
    array = np.asarray(array)
    expected_ndim = 2 if enc.channels == 1 else 3
    if array.ndim != expected_ndim or (enc.channels > 1 and array.shape[2] != enc.channels):
        raise InputError(
            f"array of shape {array.shape} does not fit '{encoding}' ({enc.channels} channel(s))")
    if array.dtype != enc.dtype:
        raise InputError(f"array dtype {array.dtype} does not fit '{encoding}' ({enc.dtype})")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = sys.byteorder == "big"
    msg.step = msg.width * enc.channels * enc.dtype.itemsize
    msg.data = np.ascontiguousarray(array).tobytes()
    return msg
