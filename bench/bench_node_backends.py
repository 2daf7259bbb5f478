"""The node's query latency per backend, side by side, with its encoder and decoder stages.

    python bench/bench_node_backends.py [--preset tiny | --model models/nano] [--runs 5]
        [--backends torch,onnxruntime] [--export DIR]

Exports the model first (`refvlm export onnx`, into a temporary folder unless --export is
given), then for each backend starts the node (`refvlm bringup camera`, backend and
export_dir set) and times ~/query round trips with the same SimWorld image, one backend
after the other. Prints the round-trip median and the node's own stage medians (encode =
encoders + projector + aggregation, decoders = router + unit decoders), and whether every
backend produced the same TRP text (same work).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_node_latency import NodeClient, sim_image  # noqa: E402

STAGES = ("encode", "prefill", "decode", "decoders")


def start_node(model_params: dict, backend: str, export_dir: str, env: dict) -> subprocess.Popen:
    """`refvlm bringup camera` on ``backend``; returns once the node is active."""
    params = Path(tempfile.mkdtemp(prefix="refvlm-bench-")) / "params.yaml"
    params.write_text(yaml.safe_dump({"refvlm_node": {"ros__parameters": {
        **model_params, "device": "cpu", "publish_overlay": False, "backend": backend,
        "export_dir": export_dir}}}))
    process = subprocess.Popen([sys.executable, "-m", "refvlm_cli.main", "bringup", "camera",
                                "--params", str(params)], cwd=REPO, env=dict(env, PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # the CLI prints "running" once configured and activated
        if "bringup camera: running" in line:
            return process
        if "error" in line.lower():
            print(line, end="", file=sys.stderr)
    raise RuntimeError(f"the {backend} node exited with {process.wait()} before it was up")


def measure(backend: str, model_params: dict, export_dir: str, image_msg, runs: int, env: dict) -> dict:
    """{"round_trip": [s], stage: [s], "text": last TRP} over ``runs`` queries after one warm-up."""
    process = start_node(model_params, backend, export_dir, env)
    samples: dict = {"round_trip": [], **{stage: [] for stage in STAGES}}
    try:
        client = NodeClient()
        for run in range(runs + 1):
            start = time.perf_counter()
            samples["text"] = client.ask(image_msg)
            if run:  # the first query warms up
                samples["round_trip"].append(time.perf_counter() - start)
                for stage in STAGES:
                    samples[stage].append(client.stages.get(stage, float("nan")))
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default="", help="a model folder (e.g. models/nano) instead of the preset")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--export", default="", help="an existing export folder (default: export now)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("ROS_DOMAIN_ID", str(random.randint(10, 99)))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="refvlm-bench-log-"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(env)  # before torch and rclpy load here

    from refvlm_cli.main import main as refvlm
    from refvlm_ros.image_conversions import array_to_image

    model_arg = str(Path(args.model).resolve()) if args.model else args.preset
    export_dir = args.export or str(Path(tempfile.mkdtemp(prefix="refvlm-export-")) / "export")
    if not args.export:
        start = time.perf_counter()
        if refvlm(["export", "onnx", "--model", model_arg, "--out", export_dir]) != 0:
            return 1
        print(f"exported {model_arg} in {time.perf_counter() - start:.1f} s")
    model_params = {"model_preset": args.preset, "model_path": str(Path(args.model).resolve()) if args.model else ""}
    image_msg = array_to_image(sim_image(), "rgb8")
    results = {b: measure(b, model_params, export_dir, image_msg, args.runs, env) for b in args.backends.split(",")}

    print(f"{args.model or 'preset ' + args.preset}, 320x240 SimWorld image, {args.runs} runs, "
          f"{args.threads} thread(s), medians in ms")
    print(f"  {'backend':<12} {'round trip':>10} " + " ".join(f"{s:>9}" for s in STAGES))
    for backend, samples in results.items():
        stages = " ".join(f"{statistics.median(samples[s]) * 1e3:9.1f}" for s in STAGES)
        print(f"  {backend:<12} {statistics.median(samples['round_trip']) * 1e3:10.1f} {stages}")
    if len({samples["text"] for samples in results.values()}) > 1:
        print("  WARNING: the backends produced different text, so they did different work", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
