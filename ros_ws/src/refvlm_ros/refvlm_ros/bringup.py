"""Run a node graph (refvlm_ros.graph) in this process: the nodes `ros2 launch` would
start, on one MultiThreadedExecutor, lifecycle nodes configured and activated.

    with Bringup(load_graph("sim")) as bringup:
        node = bringup.node("refvlm_node")
        ...

Names, parameter files, inline parameters and remappings reach each node exactly as
launch_ros passes them to a process (`--ros-args -r __node:=... --params-file ...`).
"""
from __future__ import annotations

import importlib
import threading
import time
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from refvlm_core.errors import ConfigError, RefVLMError
from refvlm_ros.graph import GraphSpec, NodeSpec


def import_node_class(path: str) -> type:
    """'package.module:Class' -> the class."""
    module_name, _, class_name = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot import node class '{path}' ({error}); "
                          "check node_class in the graph file and that the package "
                          "is installed (make setup)") from error


def create_node(spec: NodeSpec, context: Context) -> Node:
    """Instantiate the node of `spec` as `ros2 run` + launch_ros would configure it."""
    node_class = import_node_class(spec.node_class)
    overrides = [Parameter(name, value=value) for name, value in spec.parameters.items()]
    return node_class(cli_args=spec.ros_args(), parameter_overrides=overrides,
                      context=context)


class Bringup:
    """The nodes of one graph, spinning on a background MultiThreadedExecutor."""

    def __init__(self, graph: GraphSpec, *, num_threads: int = 4,
                 domain_id: int | None = None) -> None:
        self.graph = graph
        self.context = Context()
        self._num_threads = num_threads
        self._domain_id = domain_id
        self._nodes: dict[str, Node] = {}
        self._active: list[LifecycleNode] = []
        self._executor: MultiThreadedExecutor | None = None
        self._spin_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stop_requested = threading.Event()

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> "Bringup":
        # No rclpy signal handlers: Ctrl-C / request_stop() end the wait and shutdown()
        # then runs in order on a live context (rclpy's would shut the context first).
        init_args: dict[str, Any] = {"context": self.context,
                                     "signal_handler_options": SignalHandlerOptions.NO}
        if self._domain_id is not None:
            init_args["domain_id"] = self._domain_id
        rclpy.init(**init_args)
        try:
            self._executor = MultiThreadedExecutor(num_threads=self._num_threads,
                                                   context=self.context)
            for spec in self.graph.nodes:
                node = create_node(spec, self.context)
                self._nodes[spec.name] = node
                self._executor.add_node(node)
            self._spin_thread = threading.Thread(target=self._spin, name="bringup-executor",
                                                 daemon=True)
            self._spin_thread.start()
            for spec in self.graph.nodes:
                if spec.lifecycle:
                    self._configure_and_activate(spec.name, self._nodes[spec.name])
        except BaseException:
            self.shutdown()
            raise
        return self

    def _spin(self) -> None:
        try:
            while not self._stop.is_set() and self.context.ok():
                self._executor.spin_once(timeout_sec=0.1)
        except Exception:  # the context was shut down under the executor
            if self.context.ok():
                raise

    def _configure_and_activate(self, name: str, node: Node) -> None:
        if not isinstance(node, LifecycleNode):
            raise ConfigError(f"node '{name}' is marked lifecycle in the graph but "
                              f"{type(node).__name__} is not a LifecycleNode")
        for transition in ("configure", "activate"):
            outcome = getattr(node, f"trigger_{transition}")()
            if outcome != TransitionCallbackReturn.SUCCESS:
                raise RefVLMError(f"lifecycle node '{name}' failed to {transition} "
                                  f"({outcome.name}); its log above says why")
            if transition == "activate":
                self._active.append(node)

    def add_node(self, node: Node) -> None:
        """Spin one more node (a client, a probe) on the graph's executor."""
        self._executor.add_node(node)

    def node(self, name: str) -> Node:
        if name not in self._nodes:
            raise ConfigError(f"graph '{self.graph.name}' has no running node '{name}'")
        return self._nodes[name]

    @property
    def nodes(self) -> dict[str, Node]:
        return dict(self._nodes)

    def spin_until_interrupted(self, duration: float | None = None) -> None:
        """Block the calling thread until Ctrl-C, request_stop() (e.g. from a SIGTERM
        handler), a shutdown of the context, or `duration` seconds."""
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while (self.context.ok() and self._spin_thread.is_alive()
                   and not self._stop_requested.is_set()
                   and (deadline is None or time.monotonic() < deadline)):
                self._stop_requested.wait(0.1)
        except KeyboardInterrupt:
            pass

    def request_stop(self) -> None:
        """Make spin_until_interrupted() return; safe from a signal handler."""
        self._stop_requested.set()

    def shutdown(self) -> None:
        """Deactivate and clean up lifecycle nodes, stop the executor, destroy every
        node, shut DDS down. Safe to call twice."""
        for node in reversed(self._active):
            node.trigger_deactivate()
            node.trigger_cleanup()
        self._active.clear()
        if self._executor is not None:
            for node in self._executor.get_nodes():
                self._executor.remove_node(node)  # no new callbacks from here on
        self._stop.set()
        if self._spin_thread is not None:
            self._spin_thread.join(timeout=5.0)
            self._spin_thread = None
        if self._executor is not None:
            self._wait_for_running_callbacks(timeout=5.0)
            self._executor.shutdown(timeout_sec=5.0)
            self._executor = None
        for node in self._nodes.values():
            node.destroy_node()
        self._nodes.clear()
        self.context.try_shutdown()

    def _wait_for_running_callbacks(self, timeout: float) -> None:
        """Let callbacks already handed to the thread pool finish before their nodes are
        destroyed (Executor.shutdown does not wait for them in rclpy 7)."""
        deadline = time.monotonic() + timeout
        running = getattr(self._executor, "_futures", [])
        while any(not task.done() for task in list(running)) and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> "Bringup":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
