"""Whole camera frames cross processes: refvlm_sim in its own process with the stock
middleware settings of this machine (nothing set but what the executable sets itself),
a best-effort subscriber here counts depth images and CameraInfo per image while a
thread of this process computes in Python, as the node's model does. Fast DDS's default
512 KB shared-memory segment is smaller than one frame (image + 32FC1 depth, ~540 KB):
so measured, 48 depth images and 61 CameraInfo for 75 images; with the shipped profile
75 of each."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from ros_client import spawn_node, stop_nodes

from refvlm_ros.transport import PROFILE, PROFILE_VARIABLES, use_camera_profile

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

SECONDS = 15.0


def test_the_profile_is_used_unless_the_user_chose_one_or_another_rmw():
    environ: dict[str, str] = {}
    assert use_camera_profile(environ) == str(PROFILE) and PROFILE.is_file()
    assert all(environ[name] == str(PROFILE) for name in PROFILE_VARIABLES)
    mine = {"FASTRTPS_DEFAULT_PROFILES_FILE": "mine.xml"}
    assert use_camera_profile(mine) is None and mine == {"FASTRTPS_DEFAULT_PROFILES_FILE": "mine.xml"}
    cyclone = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert use_camera_profile(cyclone) is None and set(cyclone) == {"RMW_IMPLEMENTATION"}


def _hold_the_gil(running: threading.Event) -> None:
    """Pure-Python work in ~20 ms slices while ``running``: a receiver as busy as the node."""
    while running.is_set():
        sum(i * i for i in range(200_000))


def test_the_sim_camera_delivers_depth_and_camera_info_with_every_image(tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    assert not any(os.environ.get(name) for name in PROFILE_VARIABLES), "run with the stock settings"
    sim = spawn_node([sys.executable, "-c", "from refvlm_ros.sim_node import main; main()",
                      "--ros-args", "-p", "rate_hz:=5.0", "-p", "width:=320", "-p", "height:=240"],
                     tmp_path / "sim.log")
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("frame_counter", context=context)
    counts = {"image": 0, "depth": 0, "info": 0}
    counting = threading.Event()

    def count(kind):
        def on_message(_msg):
            if counting.is_set():
                counts[kind] += 1
        return on_message

    for kind, msg_type, topic in (("image", Image, "image"), ("depth", Image, "depth"),
                                  ("info", CameraInfo, "camera_info")):
        node.create_subscription(msg_type, f"/sim_camera/{topic}", count(kind), qos_profile_sensor_data)
    seen = []
    node.create_subscription(Image, "/sim_camera/image", seen.append, qos_profile_sensor_data)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        deadline = time.monotonic() + 90
        while not seen:
            assert time.monotonic() < deadline and sim.poll() is None, sim.log.read_text()[-3000:]
            time.sleep(0.1)
        busy = threading.Thread(target=_hold_the_gil, args=(counting,), daemon=True)
        counting.set()
        busy.start()
        time.sleep(SECONDS)   # counting a stream for a fixed time
        counting.clear()
        busy.join()
    finally:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()
        stop_nodes([sim])
    print(f"in {SECONDS:.0f} s: {counts}")
    assert counts["image"] >= SECONDS * 5 * 0.5, counts   # the camera ran (5 Hz, loaded machine)
    assert counts["depth"] >= 0.95 * counts["image"] and counts["info"] >= 0.95 * counts["image"], counts
