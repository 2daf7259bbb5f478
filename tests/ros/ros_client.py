"""The test side of the DDS tests: a client node in its own rclpy context, spun in a
background thread, and handles on the services of a refvlm_node (query, lifecycle,
parameters) that the test files share.

    client = SpinningClient("my_test_client")
    node = NodeHandle(client, "refvlm_node")       # the node's name with its namespace
    assert node.transition("configure")
    reply = node.ask("where is the red cube?", image=image)
    client.diagnostics_of["refvlm_node"]           # the node's latest /diagnostics values
    client.close()

Waits are on conditions; their margins go through ``scaled`` (longer on a loaded machine).
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable


def scaled(seconds: float) -> float:
    """A wait's margin on this machine: ``seconds`` on a quiet machine, longer in proportion
    to its load (processes wanting a core per core over the last minute), so a test on
    shared, busy cores waits for the same condition as long as it takes there rather than
    failing on a wait sized for a quiet one."""
    load_per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * max(1.0, load_per_core)


def spawn_node(command: list[str], log: Path) -> subprocess.Popen:
    """A node process on one torch thread, its output in ``log`` (kept as ``process.log``)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    process.log = log
    return process


def stop_nodes(processes, timeout_s: float = 20.0) -> None:
    """Terminate node processes (all first, so they shut down together), killing any that
    has not exited within ``timeout_s``."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()


class SpinningClient:
    """A client node spun by a multi-threaded executor in a background thread; keeps the
    latest /diagnostics values of every node by hardware id."""

    def __init__(self, name: str) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.diagnostics_of: dict[str, dict[str, str]] = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            self.diagnostics_of[status.hardware_id] = {kv.key: kv.value for kv in status.values}

    def call(self, client: Any, request: Any, timeout: float = 30.0) -> Any:
        """The service's response; fails the test when it is not there or does not answer
        in time (``timeout`` on a quiet machine, ``scaled``)."""
        timeout = scaled(timeout)
        assert client.wait_for_service(timeout_sec=timeout), f"{client.srv_name} not available"
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        assert done.wait(timeout), f"{client.srv_name} did not answer within {timeout} s"
        return future.result()

    @staticmethod
    def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.05) -> None:
        """Until ``condition()`` is true; fails the test after ``timeout`` (on a quiet machine,
        ``scaled``)."""
        deadline = time.monotonic() + scaled(timeout)
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(poll_s)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


class NodeHandle:
    """The Query, lifecycle and parameter services of one refvlm_node, called through a
    SpinningClient."""

    def __init__(self, client: SpinningClient, name: str) -> None:
        from lifecycle_msgs.srv import ChangeState, GetState
        from rcl_interfaces.srv import SetParameters
        from refvlm_interfaces.srv import Query

        from refvlm_ros.client_qos import client_qos

        self.client, self.name = client, name
        n, qos = client.node, client_qos()  # many requests may be outstanding at once
        self.query = n.create_client(Query, f"/{name}/query", qos_profile=qos)
        self.change_state = n.create_client(ChangeState, f"/{name}/change_state", qos_profile=qos)
        self.get_state = n.create_client(GetState, f"/{name}/get_state", qos_profile=qos)
        self.set_parameters_service = n.create_client(SetParameters, f"/{name}/set_parameters", qos_profile=qos)

    @property
    def diagnostics(self) -> dict[str, str]:
        """The node's latest /diagnostics values (hardware id: its name without namespace)."""
        return self.client.diagnostics_of.get(self.name.rsplit("/", 1)[-1], {})

    def transition(self, label: str, timeout: float = 60.0) -> bool:
        from lifecycle_msgs.srv import ChangeState
        request = ChangeState.Request()
        request.transition.label = label
        return self.client.call(self.change_state, request, timeout).success

    def state(self, timeout: float = 30.0) -> str:
        from lifecycle_msgs.srv import GetState
        return self.client.call(self.get_state, GetState.Request(), timeout).current_state.label

    def set_parameters(self, **values: Any) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter
        request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                    for k, v in values.items()])
        results = self.client.call(self.set_parameters_service, request).results
        assert all(r.successful for r in results), [r.reason for r in results]

    def ask(self, prompt: str, image: Any = None, visual_prompts: Any = (), timeout: float = 30.0,
            depth: Any = None, camera_info: Any = None) -> Any:
        """Query.Response about the latest camera frame, or about ``image`` (with its depth)."""
        from refvlm_interfaces.srv import Query
        request = Query.Request(prompt=prompt, visual_prompts=list(visual_prompts))
        if image is not None:
            request.use_image, request.image = True, image
        if depth is not None:
            request.depth, request.camera_info = depth, camera_info
        return self.client.call(self.query, request, timeout)
