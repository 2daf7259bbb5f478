"""launch_testing test of sim_cameras.launch.py, run by the `launch_test` command
(test_launch_test.py runs it in CI):

    launch_test tests/ros/launch_tests/sim_cameras_launch.py

Starts the installed `refvlm_bringup` package's sim_cameras.launch.py (three SimWorld
cameras, one perception node with cameras:=front,left,right, tiny model), waits for the
node to be active, asks ~/query once per camera and checks each answer is about that
camera's frame, reads /diagnostics, and after shutdown checks that every process exited
cleanly.
"""
import os
import threading
import time
import unittest

import launch
import launch_testing
import launch_testing.actions
import launch_testing.asserts
from ament_index_python.packages import get_package_share_directory
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource

NODE = "refvlm_node"
CAMERAS = ("front", "left", "right")
TIMEOUT_S = float(os.environ.get("REFVLM_LAUNCH_TEST_TIMEOUT", "120"))


def generate_test_description():
    launch_file = os.path.join(get_package_share_directory("refvlm_bringup"), "launch", "sim_cameras.launch.py")
    return launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file),
                                 launch_arguments={"model_preset": "tiny"}.items()),
        launch_testing.actions.ReadyToTest(),
    ])


class Client:
    """A client node spun in a background thread."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import GetState
        from rclpy.executors import SingleThreadedExecutor

        from refvlm_interfaces.srv import Query

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("sim_cameras_launch_test", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.diagnostics = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.get_state = self.node.create_client(GetState, f"/{NODE}/get_state")
        self.query = self.node.create_client(Query, f"/{NODE}/query")
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_diagnostics(self, msg):
        for status in msg.status:
            if status.hardware_id == NODE:
                self.diagnostics = {kv.key: kv.value for kv in status.values}

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
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


class TestThreeCameras(unittest.TestCase):
    def test_one_node_answers_each_camera(self, proc_output):
        from lifecycle_msgs.srv import GetState

        from refvlm_interfaces.srv import Query

        client = Client()
        try:
            client.wait_for(lambda: client.call(client.get_state, GetState.Request())
                            .current_state.label == "active", "the node to be active")
            # three cameras at 5 Hz each: at least a few frames of every one
            client.wait_for(lambda: int(client.diagnostics.get("frames_received", "0")) >= 9, "frames")
            self.assertEqual(client.diagnostics["cameras"], ",".join(CAMERAS))
            for camera in CAMERAS:
                reply = None
                for _ in range(int(TIMEOUT_S)):  # until this camera's first frame is there
                    reply = client.call(client.query, Query.Request(prompt="where is the red cube?", camera=camera))
                    if reply.success or "no camera frame received yet" not in reply.error:
                        break
                    time.sleep(1.0)
                self.assertTrue(reply.success, reply.error)
                self.assertEqual(reply.result.header.frame_id, f"{camera}_optical_frame")
            client.wait_for(lambda: int(client.diagnostics.get("queries", "0")) >= len(CAMERAS), "query count")
            print(f"one node, three cameras: rss_mb={client.diagnostics['rss_mb']}")
        finally:
            client.close()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_every_process_exited_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
