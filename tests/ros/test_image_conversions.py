"""sensor_msgs/Image <-> numpy: every encoding, row padding, byte order, depth units,
and a clear InputError for each malformed message. Runs on every available backend."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from refvlm_core.errors import InputError

pytestmark = pytest.mark.ros

BACKENDS = [
    "numpy",
    pytest.param("cv_bridge", marks=pytest.mark.skipif(
        "not __import__('refvlm_ros.image_conversions').image_conversions.cv_bridge_instance()",
        reason="no working cv_bridge installed (the PyPI one is a ROS 1 build)")),
]


def make_msg(array: np.ndarray, encoding: str, pad: int = 0, big_endian: bool = False):
    """A message built by hand (not by the code under test): rows padded by `pad` bytes."""
    from sensor_msgs.msg import Image
    order = ">" if big_endian else "<"
    raw = np.ascontiguousarray(array.astype(array.dtype.newbyteorder(order)))
    rows = raw.reshape(array.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 0xAB, np.uint8)], axis=1)
    msg = Image(height=array.shape[0], width=array.shape[1], encoding=encoding,
                is_bigendian=big_endian, step=padded.shape[1])
    msg.data = padded.tobytes()
    return msg


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_give_rgb(backend, rgb, pad):
    from refvlm_ros.image_conversions import image_to_rgb
    alpha = np.full(rgb.shape[:2] + (1,), 9, np.uint8)
    cases = {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
    }
    for encoding, array in cases.items():
        out = image_to_rgb(make_msg(array, encoding, pad=pad), backend=backend)
        assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, rgb, err_msg=encoding)
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(image_to_rgb(make_msg(gray, "mono8", pad=pad), backend=backend),
                                  np.repeat(gray[:, :, None], 3, axis=2))


def test_rgb8_read_is_zero_copy(rgb):
    from refvlm_ros.image_conversions import image_to_array
    msg = make_msg(rgb, "rgb8", pad=5)
    view = image_to_array(msg, backend="numpy")
    np.testing.assert_array_equal(view, rgb)
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("pad", [0, 2])
def test_depth_16uc1_millimetres_to_metres(backend, big_endian, pad):
    from refvlm_ros.image_conversions import depth_to_metres
    mm = np.array([[0, 1000, 1500], [65535, 250, 0]], dtype=np.uint16)
    out = depth_to_metres(make_msg(mm, "16UC1", pad=pad, big_endian=big_endian), backend=backend)
    assert out.dtype == np.float32
    expected = np.array([[np.nan, 1.0, 1.5], [65.535, 0.25, np.nan]], np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    scaled = depth_to_metres(make_msg(mm, "16UC1"), depth_scale=0.0001, backend=backend)
    assert scaled[0, 1] == pytest.approx(0.1)


@pytest.mark.parametrize("big_endian", [False, True])
def test_depth_32fc1_metres_invalid_to_nan(backend, big_endian):
    from refvlm_ros.image_conversions import depth_to_metres
    metres = np.array([[1.25, 0.0, np.inf], [-1.0, np.nan, 3.5]], dtype=np.float32)
    out = depth_to_metres(make_msg(metres, "32FC1", pad=4, big_endian=big_endian), backend=backend)
    expected = np.array([[1.25, np.nan, np.nan], [np.nan, np.nan, 3.5]], np.float32)
    np.testing.assert_array_equal(out, expected)
    assert out.flags.writeable


@pytest.mark.parametrize("encoding,array", [
    ("rgb8", np.arange(24, dtype=np.uint8).reshape(2, 4, 3)),
    ("bgr8", np.arange(24, dtype=np.uint8).reshape(2, 4, 3)),
    ("mono8", np.arange(8, dtype=np.uint8).reshape(2, 4)),
    ("16UC1", np.array([[1, 2, 65535]], dtype=np.uint16)),
    ("32FC1", np.array([[1.5, np.nan], [0.25, -2.0]], dtype=np.float32)),
])
def test_array_to_image_round_trip(backend, encoding, array):
    from std_msgs.msg import Header
    from refvlm_ros.image_conversions import array_to_image, image_to_array
    header = Header(frame_id="cam")
    header.stamp.sec = 42
    msg = array_to_image(array, encoding, header)
    assert (msg.height, msg.width, msg.encoding) == (array.shape[0], array.shape[1], encoding)
    assert msg.step * msg.height == len(msg.data)
    assert msg.header.frame_id == "cam" and msg.header.stamp.sec == 42
    assert msg.is_bigendian == (sys.byteorder == "big")
    np.testing.assert_array_equal(image_to_array(msg, backend=backend), array)


def test_array_to_image_rejects_mismatched_arrays():
    from refvlm_ros.image_conversions import array_to_image
    with pytest.raises(InputError, match="does not fit 'rgb8'"):
        array_to_image(np.zeros((2, 2), np.uint8), "rgb8")
    with pytest.raises(InputError, match="dtype float64"):
        array_to_image(np.zeros((2, 2)), "32FC1")
    with pytest.raises(InputError, match="cannot encode 'yuv422'"):
        array_to_image(np.zeros((2, 2), np.uint8), "yuv422")


def test_malformed_messages_raise_input_errors(backend, rgb):
    from refvlm_ros.image_conversions import depth_to_metres, image_to_rgb
    wrong_encoding = make_msg(rgb, "rgb8")
    wrong_encoding.encoding = "yuv422"
    with pytest.raises(InputError, match="encoding 'yuv422' is not supported.*rgb8"):
        image_to_rgb(wrong_encoding, backend=backend)
    with pytest.raises(InputError, match="encoding 'rgb8' is not supported.*32FC1"):
        depth_to_metres(make_msg(rgb, "rgb8"), backend=backend)

    short_step = make_msg(rgb, "rgb8")
    short_step.step = rgb.shape[1] * 3 - 1
    with pytest.raises(InputError, match="step 20 is smaller than width"):
        image_to_rgb(short_step, backend=backend)

    truncated = make_msg(rgb, "rgb8")
    truncated.data = bytes(truncated.data)[:-1]
    with pytest.raises(InputError, match="data has 104 bytes but step\\*height"):
        image_to_rgb(truncated, backend=backend)

    from sensor_msgs.msg import Image
    with pytest.raises(InputError, match="empty image"):
        image_to_rgb(Image(encoding="rgb8"), backend=backend)


def test_unknown_backend_is_an_input_error(rgb):
    from refvlm_ros.image_conversions import image_to_rgb
    with pytest.raises(InputError, match="unknown image backend 'opencv'"):
        image_to_rgb(make_msg(rgb, "rgb8"), backend="opencv")
