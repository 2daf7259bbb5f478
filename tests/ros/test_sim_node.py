"""The simulated camera over real DDS: one header per frame, consistent image, depth,
CameraInfo and ground truth; camera motion; parameter validation; bringup of a graph."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from refvlm_core.errors import ConfigError  # noqa: E402

SMALL = [Parameter("width", value=96), Parameter("height", value=72), Parameter("rate_hz", value=20.0)]


@pytest.fixture
def context():
    ctx = Context()
    rclpy.init(context=ctx)
    yield ctx
    ctx.try_shutdown()


def spin_until(executor, done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    assert done(), "timed out waiting for messages"


def collect_frames(context, overrides, frames_wanted: int = 2):
    """Run a SimCameraNode and a listener until `frames_wanted` complete frames arrived;
    returns {stamp: {topic: message}}."""
    from refvlm_ros.sim_node import SimCameraNode

    camera = SimCameraNode(context=context, parameter_overrides=overrides)
    listener = rclpy.create_node("listener", context=context)
    frames: dict[tuple[int, int], dict] = {}

    def keep(topic):
        def callback(msg):
            stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec) if topic != "ground_truth" else \
                tuple(json.loads(msg.data)["stamp"].values())
            frames.setdefault(stamp, {})[topic] = msg
        return callback

    latched = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
    for topic, kind, qos in (("image", Image, qos_profile_sensor_data),
                             ("depth", Image, qos_profile_sensor_data),
                             ("camera_info", CameraInfo, qos_profile_sensor_data),
                             ("ground_truth", String, latched)):
        listener.create_subscription(kind, f"/sim_camera/{topic}", keep(topic), qos)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(camera)
    executor.add_node(listener)
    complete = lambda: [s for s, f in frames.items() if len(f) == 4]  # noqa: E731
    try:
        spin_until(executor, lambda: len(complete()) >= frames_wanted)
    finally:
        executor.shutdown()
        camera.destroy_node()
        listener.destroy_node()
    return {stamp: frames[stamp] for stamp in complete()}


def test_every_message_of_a_frame_shares_one_header_and_agrees(context):
    from refvlm_ros.sim_scenes import SimScenes

    frames = collect_frames(context, SMALL)
    for stamp, frame in frames.items():
        image, depth, info = frame["image"], frame["depth"], frame["camera_info"]
        truth = json.loads(frame["ground_truth"].data)
        assert image.header == depth.header == info.header
        assert image.header.frame_id == truth["frame_id"] == "sim_camera_optical_frame"
        assert (image.encoding, image.height, image.width, image.step) == ("rgb8", 72, 96, 96 * 3)
        assert (depth.encoding, depth.step) == ("32FC1", 96 * 4)
        assert (info.width, info.height, info.distortion_model) == (96, 72, "plumb_bob")
        assert list(info.d) == [0.0] * 5
        k = np.array(info.k).reshape(3, 3)
        np.testing.assert_allclose(k, np.array(truth["K"]).reshape(3, 3))
        metres = np.frombuffer(bytes(depth.data), dtype=np.float32).reshape(72, 96)
        assert np.isfinite(metres).any() and np.nanmin(metres) > 0
        # ROS pixel convention: a pixel's centre is at its integer index, so a depth
        # reading back-projected with K lands on the ray through that pixel's centre.
        rows, cols = np.nonzero(np.isfinite(metres))
        r, c = rows[len(rows) // 2], cols[len(cols) // 2]
        z = float(metres[r, c])
        point = np.array([(c - k[0, 2]) * z / k[0, 0], (r - k[1, 2]) * z / k[1, 1], z])
        sim_camera = SimScenes("val", 0, 96, 72).base_camera  # the node's defaults: val[0], static
        np.testing.assert_allclose(np.array(truth["world_from_camera"]), sim_camera.world_from_camera)
        world = sim_camera.world_from_camera[:3, :3] @ point + sim_camera.world_from_camera[:3, 3]
        pixel, _ = sim_camera.project(world[None])
        np.testing.assert_allclose(pixel[0], [c + 0.5, r + 0.5], atol=1e-6)  # SimWorld: centre at +0.5
        for obj in truth["objects"]:
            x, y, z = obj["center_camera"]
            assert z > 0, obj  # in front of the camera
            if obj["box_xyxy"] and obj["surface_median_camera"]:
                # The visible surface lies in front of the centre, and projects in its box.
                sx, sy, sz = obj["surface_median_camera"]
                u, v = k[0, 0] * sx / sz + k[0, 2], k[1, 1] * sy / sz + k[1, 2]
                x0, y0, x1, y1 = obj["box_xyxy"]
                assert x0 - 1 <= u <= x1 + 1 and y0 - 1 <= v <= y1 + 1
                assert sz < z + 0.05


def test_the_sim_camera_and_demo_do_not_load_the_training_package():
    """The ROS runtime renders SimWorld scenes through refvlm_simworld only."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from refvlm_ros import demo, sim_node\n"
            "from refvlm_ros.sim_scenes import SimScenes\n"
            "scenes = SimScenes('test', 0, 48, 36)\n"
            "rgb, depth, camera, truth = scenes.render(sim_node.moved_camera(scenes.base_camera, scenes.target,"
            " 'orbit', 0.5, 1.0))\n"
            "assert rgb.shape == (36, 48, 3) and truth['objects']\n"
            "print('refvlm_training' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_orbit_moves_the_camera_around_its_target():
    from refvlm_ros.sim_node import moved_camera
    from refvlm_ros.sim_scenes import SimScenes

    scenes = SimScenes("val", 0, 64, 48)
    base, target = scenes.base_camera, scenes.target
    radius = np.linalg.norm((base.position - target)[:2])
    for t in (0.5, 3.0):
        camera = moved_camera(base, target, "orbit", 0.5, t)
        assert np.linalg.norm((camera.position - target)[:2]) == pytest.approx(radius)
        assert camera.position[2] == pytest.approx(base.position[2])
        pixel, _ = camera.project(target[None])
        np.testing.assert_allclose(pixel[0], [camera.cx, camera.cy], atol=1e-6)  # still looks at it
        assert not np.allclose(camera.position, base.position)
    distance = np.linalg.norm(base.position - target)
    dolly = [np.linalg.norm(moved_camera(base, target, "dolly", 0.5, t).position - target)
             for t in np.linspace(0.1, 20.0, 40)]
    assert min(dolly) >= 0.69 * distance and max(dolly) <= 1.31 * distance
    assert max(dolly) - min(dolly) > 0.3 * distance


def test_moving_camera_publishes_different_views(context):
    frames = collect_frames(context, SMALL + [Parameter("motion", value="orbit"),
                                              Parameter("motion_speed", value=3.0)], frames_wanted=3)
    poses = {json.dumps(json.loads(f["ground_truth"].data)["world_from_camera"]) for f in frames.values()}
    assert len(poses) >= 2


@pytest.mark.parametrize("name, value, message", [
    ("motion", "spin", "motion must be one of"),
    ("rate_hz", 0.0, "rate_hz"),
    ("width", 4, "width and height"),
])
def test_bad_parameters_are_refused_with_the_reason(context, name, value, message):
    from refvlm_ros.sim_node import SimCameraNode

    with pytest.raises(ConfigError, match=message):
        SimCameraNode(context=context, parameter_overrides=[Parameter(name, value=value)])


def test_parameters_are_declared_with_descriptions(context):
    from refvlm_ros.sim_node import SimCameraNode, SimCameraConfig

    node = SimCameraNode(context=context, parameter_overrides=SMALL)
    try:
        names = list(SimCameraConfig.__dataclass_fields__)
        for descriptor in node.describe_parameters(names):
            assert descriptor.description, descriptor.name
    finally:
        node.destroy_node()


def test_bringup_runs_a_graph_as_the_graph_file_says(tmp_path):
    from refvlm_ros.bringup import Bringup
    from refvlm_ros.graph import file_parameters, load_graph

    params = tmp_path / "params.yaml"
    params.write_text("sim_camera:\n  ros__parameters:\n    width: 80\n    height: 60\n"
                      "    rate_hz: 10.0\n    motion: dolly\n")
    graph_file = tmp_path / "graph.yaml"
    graph_file.write_text(
        "graphs:\n  one:\n    nodes:\n"
        "      - {name: cam, namespace: /robot, package: refvlm_ros, executable: refvlm_sim,\n"
        "         node_class: 'refvlm_ros.sim_node:SimCameraNode', params_files: [params.yaml],\n"
        "         parameters: {layout_index: 2}, remappings: {'~/image': /robot/rgb}}\n")
    # Sections are keyed by fully qualified name: the renamed node takes its own only.
    params.write_text(params.read_text().replace("sim_camera:", "/robot/cam:")
                      + "sim_camera:\n  ros__parameters:\n    width: 33\n")
    graph = load_graph("one", graph_file)
    with Bringup(graph, num_threads=2) as bringup:
        node = bringup.node("cam")
        spec = graph.node("cam")
        assert (node.get_name(), node.get_namespace()) == ("cam", "/robot")
        for name, value in file_parameters(spec).items():
            assert node.get_parameter(name).value == value
        assert node.config.width == 80 and node.config.layout_index == 2
        assert node.resolve_topic_name("~/image") == "/robot/rgb"
        deadline = time.monotonic() + 10.0
        while node.frames_published < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.frames_published >= 2  # the executor spins it
    assert not bringup.context.ok()
    assert not any(t.name == "bringup-executor" for t in threading.enumerate())


SIM_ONLY_GRAPH = """graphs:
  sim:
    nodes:
      - {name: sim_camera, package: refvlm_ros, executable: refvlm_sim,
         node_class: 'refvlm_ros.sim_node:SimCameraNode', parameters: {width: 64, height: 48}}
"""


def test_refvlm_bringup_command_stops_on_signals_and_after_duration(tmp_path):
    import signal
    import subprocess
    import sys

    graph_file = tmp_path / "graph.yaml"
    graph_file.write_text(SIM_ONLY_GRAPH)
    command = [sys.executable, "-m", "refvlm_cli.main", "bringup", "sim", "--graph-file", str(graph_file)]
    timed = subprocess.run(command + ["--duration", "0.5"], capture_output=True, text=True, timeout=60)
    assert timed.returncode == 0, timed.stderr
    assert "running sim_camera" in timed.stdout and "shut down" in timed.stdout

    for signum in (signal.SIGTERM, signal.SIGINT):  # kill, Ctrl-C
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "running sim_camera" in process.stdout.readline()
            process.send_signal(signum)
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0 and "shut down" in out, (signum, err)
        assert "Traceback" not in err


def test_refvlm_bringup_refuses_a_bad_params_file(tmp_path):
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "refvlm_cli.main", "bringup", "sim", "--params",
                          str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
