"""One node for three cameras vs one node per camera: resident memory and per-camera
latency under a standing prompt.

    python bench/bench_multi_camera.py [--model models/nano] [--seconds 40]

Three SimWorld cameras (layouts 0, 1, 2 of val, 320x240, 5 Hz) are published from this
process. Setup A: one `refvlm_node` process with cameras:=front,left,right. Setup B: three
`refvlm_node` processes, one camera each. Both run the same standing prompt (rate_hz 10:
as fast as the model goes), each node process with one OpenMP thread; A and B run one after
the other. Printed per setup: the node processes' total RSS once they answer (VmRSS of
each, summed), and per camera the answers per second and the median / p90 latency from the
image's stamp to its answer arriving here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_bench import isolated_env  # noqa: E402

CAMERAS = ("front", "left", "right")
PROMPT = "where is the yellow cube?"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def node_process(name: str, parameters: dict, remaps: dict, env: dict) -> subprocess.Popen:
    args = [str(Path(sys.executable).parent / "refvlm_node"), "--ros-args", "-r", f"__node:={name}"]
    for key, value in {"autostart": True, "publish_overlay": False, "rate_hz": 10.0,
                       "standing_prompt": PROMPT, **parameters}.items():
        args += ["-p", f"{key}:={str(value).lower() if isinstance(value, bool) else value}"]
    for source, target in remaps.items():
        args += ["-r", f"{source}:={target}"]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_setup(label: str, processes: dict[str, subprocess.Popen], result_topics: dict[str, str],
              seconds: float) -> None:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from refvlm_interfaces.msg import RefResult

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("bench_multi_camera_client", context=context)
    latencies = {camera: [] for camera in CAMERAS}

    def on_result(camera):
        def record(msg):
            if msg.objects or msg.answer:
                sent = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
                latencies[camera].append(node.get_clock().now().nanoseconds * 1e-9 - sent)
        return record

    for camera, topic in result_topics.items():
        node.create_subscription(RefResult, topic, on_result(camera), 50)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 600
        while not all(latencies.values()):  # every camera answered once: all loaded and running
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes.values()):
                raise SystemExit(f"{label}: the nodes did not answer every camera")
            time.sleep(0.5)
        for values in latencies.values():
            values.clear()
        rss = {name: rss_mb(p.pid) for name, p in processes.items()}
        time.sleep(seconds)
        rss_after = {name: rss_mb(p.pid) for name, p in processes.items()}
    finally:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    total = sum(max(rss[n], rss_after[n]) for n in rss)
    print(f"\n{label}: {len(processes)} node process(es), RSS total {total:.0f} MB "
          f"({', '.join(f'{n} {max(rss[n], rss_after[n]):.0f}' for n in rss)})")
    for camera, values in latencies.items():
        values = sorted(values)
        if not values:
            print(f"  {camera:6s} no answers in {seconds:.0f} s")
            continue
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"  {camera:6s} {len(values) / seconds:5.2f} answers/s, latency median {statistics.median(values):.2f} s,"
              f" p90 {p90:.2f} s ({len(values)} answers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "nano"))
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    env = isolated_env(threads=1)

    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from refvlm_ros.sim_node import SimCameraNode

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    for index, camera in enumerate(CAMERAS):
        executor.add_node(SimCameraNode(
            context=context, cli_args=["--ros-args", "-r", f"__node:=sim_{camera}"], parameter_overrides=[
                Parameter("layout_index", value=index), Parameter("frame_id", value=f"{camera}_optical_frame"),
                Parameter("world_frame", value=f"world_{camera}"), Parameter("base_frame", value="")]))
    threading.Thread(target=executor.spin, daemon=True).start()
    model = {"model_path": str(Path(args.model).resolve())}
    sim = {camera: {t: f"/sim_{camera}/{t}" for t in ("image", "depth", "camera_info")} for camera in CAMERAS}

    one = {"refvlm_cameras": node_process(
        "refvlm_cameras", {**model, "cameras": ",".join(CAMERAS)},
        {f"{camera}/{t}": topic for camera in CAMERAS for t, topic in sim[camera].items()}, env)}
    run_setup("A: one node, three cameras", one, {c: f"/refvlm_cameras/{c}/result" for c in CAMERAS}, args.seconds)

    three = {f"refvlm_{camera}": node_process(f"refvlm_{camera}", model, sim[camera], env) for camera in CAMERAS}
    run_setup("B: three nodes, one camera each", three, {c: f"/refvlm_{c}/result" for c in CAMERAS}, args.seconds)
    executor.shutdown()
    context.try_shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
