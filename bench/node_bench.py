"""Shared by the node benchmarks (bench_node_latency.py, bench_node_backends.py): the ROS
environment they isolate, the SimWorld image they send, the node started as on a robot
(`refvlm bringup camera` with a parameter file), and a Query client that times round trips
and keeps the node's own stage timings."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMPT = "where is the red cube?"


def isolated_env(threads: int) -> dict:
    """This process's environment with ``threads`` OpenMP threads and a ROS domain, discovery
    range and log folder of its own (also applied here, before torch and rclpy load)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.setdefault("ROS_DOMAIN_ID", str(random.randint(10, 99)))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="refvlm-bench-log-"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(env)
    return env


def model_parameters(preset: str, model: str) -> dict:
    """refvlm_node parameters selecting a preset, or a model folder when ``model`` is set."""
    return {"model_preset": preset, "model_path": str(Path(model).resolve()) if model else ""}


def sim_image(width: int = 320, height: int = 240):
    from refvlm_ros.sim_scenes import SimScenes

    scenes = SimScenes("test", 0, width, height)
    return scenes.render(scenes.base_camera)[0]


def start_node(parameters: dict, env: dict, namespace: str = "") -> subprocess.Popen:
    """`refvlm bringup camera` with these refvlm_node parameters (cpu, no overlay unless they
    say otherwise), in ``namespace`` when given; returns once the node is configured and
    active, with what it printed until then in ``process.startup_log`` (lines)."""
    params = Path(tempfile.mkdtemp(prefix="refvlm-bench-")) / "params.yaml"
    params.write_text(yaml.safe_dump({"/**/refvlm_node": {"ros__parameters": {
        "device": "cpu", "publish_overlay": False, **parameters}}}))
    arguments = [f"namespace:={namespace}"] if namespace else []
    process = subprocess.Popen([sys.executable, "-m", "refvlm_cli.main", "bringup", "camera", *arguments,
                                "--params", str(params)], cwd=REPO, env=dict(env, PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process.startup_log = []
    for line in process.stdout:  # the CLI prints "running" once configured and activated
        process.startup_log.append(line.rstrip("\n"))
        if "bringup camera: running" in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # a full pipe would block it
            return process
        if "error" in line.lower():
            print(line, end="", file=sys.stderr)
    raise RuntimeError(f"the node ({parameters}) exited with {process.wait()} before it was up")


def stop_node(process: subprocess.Popen) -> None:
    process.terminate()  # SIGTERM: the bringup shuts down cleanly
    process.wait(timeout=30)


class NodeClient:
    """Query client of a node process (its own rclpy context, so several can run side by side);
    ``stages`` are the node's timings of the last answer."""

    def __init__(self, service: str = "/refvlm_node/query") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from refvlm_interfaces.srv import Query

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("node_bench", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        from refvlm_ros.client_qos import client_qos

        self.client = self.node.create_client(Query, service, qos_profile=client_qos())
        self.request_type = Query.Request
        self.stages: dict[str, float] = {}
        if not self.client.wait_for_service(timeout_sec=60.0):
            raise RuntimeError(f"{service} did not appear within 60 s")

    def ask(self, image_msg, prompt: str = PROMPT) -> str:
        import rclpy

        future = self.client.call_async(self.request_type(prompt=prompt, use_image=True, image=image_msg))
        rclpy.spin_until_future_complete(self.node, future, executor=self.executor, timeout_sec=120.0)
        response = future.result()
        if response is None or not response.success:
            raise RuntimeError(f"query failed: {response and response.error}")
        self.stages = dict(zip(response.result.stage_names, response.result.stage_seconds))
        return response.result.trp_text

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()
