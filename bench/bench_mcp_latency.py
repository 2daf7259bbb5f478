"""Latency an agent sees per MCP tool call versus the node's Query service called directly.

    python bench/bench_mcp_latency.py [--model models/nano] [--preset tiny] [--runs 7]

Brings up the sim graph (`refvlm bringup sim`: SimWorld camera 320x240 + refvlm_node) in
its own process, then alternates, on the node's latest camera frame:
  direct - a Query request ("Locate the red cube.") from an rclpy client here;
  mcp    - the `locate` tool ("red cube", the same prompt) through `refvlm mcp` started by
           the MCP SDK's stdio client, as an MCP client would start it.
Prints medians (ms) of the round trips, of the node's own time for the answer (its
node_total stage) and of the rest (transport, the MCP server, result conversion), and the
ratio mcp / direct. Use a model that finds the object (models/nano): the random tiny preset
often answers nothing, and then locate does less work than the Query.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from node_bench import isolated_env  # noqa: E402

PROMPT, DESCRIPTION = "Locate the red cube.", "red cube"


def start_sim(model: str, preset: str, env: dict) -> subprocess.Popen:
    arguments = [f"model_path:={Path(model).resolve()}"] if model else [f"model_preset:={preset}"]
    process = subprocess.Popen([sys.executable, "-m", "refvlm_cli.main", "bringup", "sim", *arguments], cwd=REPO,
                               env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "bringup sim: running" in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process
    raise RuntimeError(f"the sim graph exited with {process.wait()} before it was up")


class DirectClient:
    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile

        from refvlm_interfaces.srv import Query

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("mcp_bench_direct", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.client = self.node.create_client(Query, "/refvlm_node/query", qos_profile=QoSProfile(depth=100))
        self.request_type = Query.Request
        if not self.client.wait_for_service(timeout_sec=60.0):
            raise RuntimeError("/refvlm_node/query did not appear")

    def ask(self) -> tuple[float, float]:
        """(round trip s, node_total s), retried while the camera's first frame is on its way."""
        import rclpy

        while True:
            start = time.perf_counter()
            future = self.client.call_async(self.request_type(prompt=PROMPT))
            rclpy.spin_until_future_complete(self.node, future, executor=self.executor, timeout_sec=120.0)
            seconds, response = time.perf_counter() - start, future.result()
            if response.success:
                stages = dict(zip(response.result.stage_names, response.result.stage_seconds))
                return seconds, stages["node_total"]
            if "no camera frame" not in response.error:
                raise RuntimeError(response.error)
            time.sleep(0.5)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default="", help="a model folder (e.g. models/nano) instead of the preset")
    args = parser.parse_args(argv)
    env = isolated_env(threads=1)

    from mcp import Client, StdioServerParameters

    from tests.mcp_session import McpSession

    sim = start_sim(args.model, args.preset, env)
    direct = session = None
    try:
        direct = DirectClient()
        session = McpSession(Client(StdioServerParameters(
            command=sys.executable, args=["-m", "refvlm_cli.main", "mcp", "--timeout", "300"], env=env,
            cwd=str(REPO))), timeout_s=300)

        def via_mcp() -> tuple[float, float]:
            start = time.perf_counter()
            result = session.call_tool("locate", {"description": DESCRIPTION})
            seconds = time.perf_counter() - start
            if result.is_error and "nothing matched" not in result.content[0].text:
                raise RuntimeError(result.content[0].text)
            model_ms = None if result.is_error else result.structured_content["model_ms"]
            return seconds, (model_ms or float("nan")) / 1e3

        direct.ask(), via_mcp()  # warm-up: first frame, first answer
        times: dict[str, list[tuple[float, float]]] = {"direct": [], "mcp": []}
        for run in range(args.runs):
            order = ("direct", "mcp") if run % 2 == 0 else ("mcp", "direct")
            for name in order:
                times[name].append(direct.ask() if name == "direct" else via_mcp())
        median = {name: [statistics.median(column) * 1e3 for column in
                         zip(*[(t, m, t - m) for t, m in v])] for name, v in times.items()}
        model = args.model or f"preset {args.preset}"
        print(f"{model}, {args.runs} runs each, medians in ms (round trip / the node's own time / "
              "outside the node):")
        for name, (round_trip, node, outside) in median.items():
            print(f"  {name:6s} {round_trip:8.1f} / {node:8.1f} / {outside:6.1f}")
        print(f"  mcp / direct round trip: {median['mcp'][0] / median['direct'][0]:.3f}; "
              f"outside the node: +{median['mcp'][2] - median['direct'][2]:.1f} ms per call")
    finally:
        if session is not None:
            session.close()
        if direct is not None:
            direct.close()
        sim.terminate()
        sim.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
