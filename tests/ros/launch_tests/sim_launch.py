"""launch_testing test of sim.launch.py, run by the `launch_test` command (test_launch_test.py
runs it in CI):

    launch_test tests/ros/launch_tests/sim_launch.py

Starts the installed `refvlm` package's sim.launch.py (tiny model), waits for the node to
be active, asks ~/query about the sim camera's frame, reads /diagnostics, and after
shutdown checks that every process exited cleanly.
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
TIMEOUT_S = float(os.environ.get("REFVLM_LAUNCH_TEST_TIMEOUT", "120"))


def generate_test_description():
    sim = os.path.join(get_package_share_directory("refvlm"), "launch", "sim.launch.py")
    return launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(sim),
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
        self.node = rclpy.create_node("sim_launch_test", context=self.context)
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


class TestSimGraph(unittest.TestCase):
    def test_active_answers_and_reports(self, proc_output):
        from lifecycle_msgs.srv import GetState
        from refvlm_interfaces.srv import Query

        client = Client()
        try:
            client.wait_for(lambda: client.call(client.get_state, GetState.Request())
                            .current_state.label == "active", "the node to be active")
            client.wait_for(lambda: client.diagnostics.get("frames_received", "0") != "0", "frames")
            reply = client.call(client.query, Query.Request(prompt="where is the red cube?"))
            self.assertTrue(reply.success, reply.error)
            self.assertEqual(reply.result.header.frame_id, "sim_camera_optical_frame")
            client.wait_for(lambda: int(client.diagnostics.get("queries", "0")) >= 1, "query count")
            self.assertEqual(client.diagnostics["state"], "active")
        finally:
            client.close()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_every_process_exited_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
