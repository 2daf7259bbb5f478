"""launch_testing test of sim.launch.py, run by the `launch_test` command (test_launch_test.py
runs it in CI):

    launch_test tests/ros/launch_tests/sim_launch.py

Starts the installed `refvlm_bringup` package's sim.launch.py with the shipped model (models/nano),
`target_frame:=base_link` and the sim camera orbiting (orbit.yaml), waits for the node to
be active, asks ~/query about the sim camera's frame, checks the answer's 3D position in
base_link against tf2 and the simulator's truth, reads /diagnostics, and after shutdown
checks that every process exited cleanly.

The model's accuracy is not what is checked (see its MODEL_CARD): the geometry is. The
node's base_link position must be what this test's own tf2 Buffer gives for the node's
camera-frame estimate (the same robust statistic over the answer's box, on the depth
frame of the answer's stamp), and the simulator's /tf must agree with its truth: an
object's centre in the camera frame, moved to base_link at that stamp, is its world
centre moved to base_link.
"""
import json
import os
import threading
import time
import unittest
from pathlib import Path

import numpy as np

import launch
import launch_testing
import launch_testing.actions
import launch_testing.asserts
from ament_index_python.packages import get_package_share_directory
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource

NODE = "refvlm_node"
TIMEOUT_S = float(os.environ.get("REFVLM_LAUNCH_TEST_TIMEOUT", "180"))
HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[2] / "models" / "nano"
TARGET = "base_link"
PROMPT = "where is the yellow cube?"  # SimWorld val layout 0 (launch/params/sim.yaml) has one
FRAMES_KEPT = 100  # depth frames and truths by stamp: 20 s of the 5 Hz camera


def generate_test_description():
    sim = os.path.join(get_package_share_directory("refvlm_bringup"), "launch", "sim.launch.py")
    arguments = {"model_path": str(MODEL), "target_frame": TARGET, "params_file": str(HERE / "orbit.yaml")}
    return launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(sim), launch_arguments=arguments.items()),
        launch_testing.actions.ReadyToTest(),
    ])


def stamp_key(stamp):
    return (stamp.sec, stamp.nanosec)


class Client:
    """A client node spun in a background thread."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import GetState
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, Image
        from std_msgs.msg import String
        from tf2_ros import Buffer, TransformListener

        from refvlm_interfaces.srv import Query
        from refvlm_ros.client_qos import client_qos

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("sim_launch_test", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.diagnostics = {}
        self.depths, self.truths, self.info = {}, {}, None
        self.lock = threading.Lock()
        self.tf = Buffer(node=self.node)
        self.tf_listener = TransformListener(self.tf, self.node, spin_thread=False)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.node.create_subscription(Image, "/sim_camera/depth", self._on_depth, qos_profile_sensor_data)
        self.node.create_subscription(CameraInfo, "/sim_camera/camera_info", self._on_info, qos_profile_sensor_data)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(String, "/sim_camera/ground_truth", self._on_truth, latched)
        self.get_state = self.node.create_client(GetState, f"/{NODE}/get_state", qos_profile=client_qos())
        self.query = self.node.create_client(Query, f"/{NODE}/query", qos_profile=client_qos())
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_diagnostics(self, msg):
        for status in msg.status:
            if status.hardware_id == NODE:
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def _keep(self, store, key, value):
        with self.lock:
            store[key] = value
            while len(store) > FRAMES_KEPT:
                store.pop(min(store))

    def _on_depth(self, msg):
        self._keep(self.depths, stamp_key(msg.header.stamp), msg)

    def _on_info(self, msg):
        self.info = msg

    def _on_truth(self, msg):
        truth = json.loads(msg.data)
        self._keep(self.truths, (truth["stamp"]["sec"], truth["stamp"]["nanosec"]), truth)

    def to_target(self, point, frame, stamp):
        """A point [3] in `frame` -> base_link at `stamp`, by this test's own tf2 Buffer."""
        from geometry_msgs.msg import PointStamped
        from rclpy.duration import Duration
        import tf2_geometry_msgs  # noqa: F401 (registers PointStamped with the Buffer)

        stamped = PointStamped()
        stamped.header.frame_id, stamped.header.stamp = frame, stamp
        stamped.point.x, stamped.point.y, stamped.point.z = (float(v) for v in point)
        out = self.tf.transform(stamped, TARGET, timeout=Duration(seconds=5.0))
        return np.array([out.point.x, out.point.y, out.point.z])

    def call(self, client, request):
        assert client.wait_for_service(timeout_sec=TIMEOUT_S), f"{client.srv_name} not available"
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        assert done.wait(TIMEOUT_S), f"{client.srv_name} did not answer"
        return future.result()

    def wait_for(self, condition, what):
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def close(self):
        self.tf_listener.unregister()
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


class TestSimGraph(unittest.TestCase):
    def test_active_answers_and_reports(self, proc_output):
        from lifecycle_msgs.srv import GetState
        from refvlm_interfaces.srv import Query

        client = Client()
        try:
            client.wait_for(lambda: client.call(client.get_state, GetState.Request())
                            .current_state.label == "active", "the node to be active")
            client.wait_for(lambda: client.diagnostics.get("frames_received", "0") != "0", "frames")
            for _ in range(3):  # best-effort depth: this test may have missed the answer's frame
                reply = client.call(client.query, Query.Request(prompt=PROMPT))
                self.assertTrue(reply.success, reply.error)
                key = stamp_key(reply.result.header.stamp)
                if key in client.depths and key in client.truths:
                    break
            self.assertIn(key, client.depths, "no depth frame of the answer's stamp arrived here")
            result = reply.result
            self.assertEqual(result.header.frame_id, "sim_camera_optical_frame")
            self.assertEqual(result.position_frame, TARGET)
            self.check_position_in_base_link(client, result)
            self.check_sim_tf_against_truth(client, client.truths[key], result.header)
            client.wait_for(lambda: int(client.diagnostics.get("queries", "0")) >= 1, "query count")
            self.assertEqual(client.diagnostics["state"], "active")
            self.assertEqual(client.diagnostics["target_frame"], TARGET)
            self.assertEqual(client.diagnostics["transform_failures"], "0")
        finally:
            client.close()

    def check_position_in_base_link(self, client, result):
        """The node's base_link position = tf2 of the camera-frame estimate at the stamp."""
        from refvlm_ros.image_conversions import depth_to_metres
        from refvlm_ros.localization import Intrinsics, box_region, localize

        boxed = [o for o in result.objects if o.has_box]
        self.assertTrue(boxed, f"the answer has no box: {result.trp_text!r}")
        obj = boxed[0]
        self.assertTrue(obj.has_position, obj.position_status)
        self.assertGreaterEqual(obj.track_id, 1)  # answers on camera frames are tracked
        depth = depth_to_metres(client.depths[stamp_key(result.header.stamp)], 0.001)
        region = box_region(np.asarray(obj.box_xyxy), depth.shape)
        location, reason = localize(region, depth, Intrinsics.from_k(client.info.k))
        self.assertIsNotNone(location, reason)
        expected = client.to_target(location.position, result.header.frame_id, result.header.stamp)
        got = np.array([obj.position.x, obj.position.y, obj.position.z])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        print(f"node: {obj.phrase!r} at {np.round(got, 3).tolist()} m in {TARGET} "
              f"(camera frame {np.round(location.position, 3).tolist()})")

    def check_sim_tf_against_truth(self, client, truth, header):
        """The sim's /tf at this stamp agrees with its own truth (world and camera centres)."""
        from builtin_interfaces.msg import Time as TimeMsg

        self.assertEqual(truth["world_frame"], "world")
        for obj in truth["objects"]:
            via_camera = client.to_target(obj["center_camera"], header.frame_id, header.stamp)
            via_world = client.to_target(obj["center_world"], "world", TimeMsg())  # static
            np.testing.assert_allclose(via_camera, via_world, atol=1e-5)
            print(f"truth: {obj['name']!r} at {np.round(via_world, 3).tolist()} m in {TARGET}")


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_every_process_exited_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
