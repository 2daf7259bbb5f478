"""The middleware settings the project's camera graph needs, applied by its executables.

Fast DDS (the default RMW of the ROS wheels and of most installs) shares a 512 KB
shared-memory segment per participant. A SimWorld frame is an rgb8 image and a 32FC1
depth image of ~540 KB together, so best-effort readers in another process lost depth
(26 of 101 frames) and CameraInfo. ``use_camera_profile`` points Fast DDS at the
profile shipped beside this module (an 8 MB segment) before rclpy starts, unless the
user chose a profile or another RMW: then theirs stands.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import MutableMapping

PROFILE = Path(__file__).with_name("fastdds_camera_profile.xml")
# Fast DDS 2.x (Jazzy) reads the first, 3.x the second.
PROFILE_VARIABLES = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")


def use_camera_profile(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Before rclpy.init: the shipped Fast DDS profile for this process (the path set), or
    None where the RMW is not Fast DDS or a profile is already chosen."""
    rmw = environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not rmw.startswith("rmw_fastrtps") or any(environ.get(name) for name in PROFILE_VARIABLES):
        return None
    for name in PROFILE_VARIABLES:
        environ[name] = str(PROFILE)
    return str(PROFILE)
