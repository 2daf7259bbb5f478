"""End-to-end latency through the perception node versus the Predictor called directly.

    python bench/bench_node_latency.py [--runs 5] [--preset tiny]

The node runs in its own process (`refvlm bringup camera`, as on a robot); this process
sends the same SimWorld image with each Query (use_image) and times the service round
trip. Then it times Predictor.predict on that image here, with the same preset, seed and
torch thread count. Both must produce the same TRP text (same work), else it says so.
Target: median(node) / median(direct) <= 1.10.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMPT = "where is the red cube?"


def sim_image(width: int = 320, height: int = 240):
    from refvlm_ros.sim_scenes import SimScenes

    scenes = SimScenes("test", 0, width, height)
    return scenes.render(scenes.base_camera)[0]


def start_node(preset: str, threads: int, env: dict) -> subprocess.Popen:
    """`refvlm bringup camera` with the preset; returns once the node is active."""
    params = Path(tempfile.mkdtemp(prefix="refvlm-bench-")) / "params.yaml"
    params.write_text(yaml.safe_dump({"refvlm_node": {"ros__parameters": {
        "model_preset": preset, "model_path": "", "device": "cpu", "publish_overlay": False}}}))
    env = dict(env, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "refvlm_cli.main", "bringup", "camera",
                                "--params", str(params)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # the CLI prints "running" once configured and activated
        if "bringup camera: running" in line:
            return process
        if "error" in line.lower():
            print(line, end="", file=sys.stderr)
    raise RuntimeError(f"the node process exited with {process.wait()} before it was up")


def time_node(image_msg, runs: int) -> tuple[list[float], str]:
    import rclpy
    from refvlm_interfaces.srv import Query

    rclpy.init()
    node = rclpy.create_node("latency_bench")
    client = node.create_client(Query, "/refvlm_node/query")
    if not client.wait_for_service(timeout_sec=60.0):
        raise RuntimeError("/refvlm_node/query did not appear within 60 s")
    request = Query.Request(prompt=PROMPT, use_image=True, image=image_msg)
    seconds, text = [], ""
    try:
        for run in range(runs + 1):  # the first call warms up
            start = time.perf_counter()
            future = client.call_async(request)
            rclpy.spin_until_future_complete(node, future, timeout_sec=120.0)
            elapsed = time.perf_counter() - start
            response = future.result()
            if response is None or not response.success:
                raise RuntimeError(f"query failed: {response and response.error}")
            if run:
                seconds.append(elapsed)
            text = response.result.trp_text
    finally:
        node.destroy_node()
        rclpy.shutdown()
    return seconds, text


def time_direct(rgb, preset: str, runs: int) -> tuple[list[float], str]:
    from refvlm_core.predictor import Predictor

    predictor = Predictor.from_preset(preset, device="cpu")
    seconds, text = [], ""
    for run in range(runs + 1):
        start = time.perf_counter()
        result = predictor.predict(rgb, PROMPT)
        if run:
            seconds.append(time.perf_counter() - start)
        text = result.trp_text
    return seconds, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(random.randint(10, 99)))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="refvlm-bench-log-"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(env)  # before rclpy loads here

    import torch

    from refvlm_ros.image_conversions import array_to_image

    threads = torch.get_num_threads()
    rgb = sim_image()
    process = start_node(args.preset, threads, env)
    try:
        node_s, node_text = time_node(array_to_image(rgb, "rgb8"), args.runs)
    finally:
        process.terminate()  # SIGTERM: the bringup shuts down
        process.wait(timeout=30)
    direct_s, direct_text = time_direct(rgb, args.preset, args.runs)

    node_median, direct_median = statistics.median(node_s), statistics.median(direct_s)
    print(f"preset {args.preset}, 320x240 SimWorld image, {args.runs} runs, {threads} torch threads")
    print(f"  Predictor.predict (direct)   median {direct_median * 1e3:8.1f} ms  "
          f"min {min(direct_s) * 1e3:8.1f} ms")
    print(f"  Query service round trip     median {node_median * 1e3:8.1f} ms  "
          f"min {min(node_s) * 1e3:8.1f} ms")
    print(f"  ratio node / direct          {node_median / direct_median:8.3f}   (target <= 1.10)")
    if node_text != direct_text:
        print("  WARNING: the node and the direct call produced different text, so they did "
              "different amounts of work; the ratio is not comparable", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
