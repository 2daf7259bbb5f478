"""Image message conversion throughput (MB/s of pixel data), to and from
sensor_msgs/Image, at 640x480 and 1920x1080 (refvlm_ros.image_conversions).

    python bench/bench_image_conversion.py [--seconds 1.0]

Rows: rgb8 array -> message, message -> RGB array, 32FC1 depth both ways, and for
scale the rclpy serialise + deserialise of the same message (what DDS transport adds).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

SIZES = {"640x480": (480, 640), "1920x1080": (1080, 1920)}


def throughput(run: Callable[[], object], megabytes: float, seconds: float) -> float:
    """MB/s of `run` over about `seconds` (at least 3 calls, after one warm-up)."""
    run()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run()
        calls += 1
    return megabytes * calls / (time.perf_counter() - start)


def bench_size(height: int, width: int, seconds: float) -> dict[str, float]:
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from refvlm_ros.image_conversions import array_to_image, depth_to_metres, image_to_rgb

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    depth = rng.uniform(0.3, 5.0, (height, width)).astype(np.float32)
    rgb_msg, depth_msg = array_to_image(rgb, "rgb8"), array_to_image(depth, "32FC1")
    assert np.array_equal(image_to_rgb(rgb_msg), rgb)  # the numbers are for correct code
    rgb_mb, depth_mb = rgb.nbytes / 1e6, depth.nbytes / 1e6
    return {
        "rgb8 to message": throughput(lambda: array_to_image(rgb, "rgb8"), rgb_mb, seconds),
        "rgb8 from message (zero-copy view)": throughput(lambda: image_to_rgb(rgb_msg), rgb_mb, seconds),
        "32FC1 to message": throughput(lambda: array_to_image(depth, "32FC1"), depth_mb, seconds),
        "32FC1 from message (metres)": throughput(lambda: depth_to_metres(depth_msg), depth_mb,
                                                  seconds),
        "rgb8 serialise+deserialise (rclpy)": throughput(
            lambda: deserialize_message(serialize_message(rgb_msg), Image), rgb_mb, seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args(argv)
    rows = {name: bench_size(*shape, args.seconds) for name, shape in SIZES.items()}
    operations = list(next(iter(rows.values())))
    print(f"{'operation':38s}" + "".join(f"{name:>14s}" for name in rows) + "   (MB/s)")
    for operation in operations:
        print(f"{operation:38s}" + "".join(f"{rows[n][operation]:14.0f}" for n in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
