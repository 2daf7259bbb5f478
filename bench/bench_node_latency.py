"""End-to-end latency through the perception node versus the Predictor called directly.

    python bench/bench_node_latency.py [--runs 5] [--preset tiny] [--model models/nano] [--quantize auto]

The node runs in its own process (`refvlm bringup camera`, as on a robot); this process
sends the same SimWorld image with each Query (use_image) and times the service round
trip, alternating with Predictor.predict on that image here (same preset, seed and torch
thread count). Both must produce the same TRP text (same work), else it says so.
Target: median(node) / median(direct) <= 1.10. It also prints how long the node took
from process start to active (imports, configure with the model load, activate), how
long configure's model load took in the node (its log line, with the load phases) and how
long the Predictor load took here; target for configure: <= 10 s on a warm machine.
``--quantize`` (auto, none, int8) picks the LLM weights of a --model in both processes.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_bench import PROMPT, NodeClient, isolated_env, model_parameters, sim_image, start_node, stop_node  # noqa: E402

LOADED = re.compile(r"model loaded in ([0-9.]+) s \(.*\): (.*)$")


def timed(call) -> tuple[float, str]:
    start = time.perf_counter()
    text = call()
    return time.perf_counter() - start, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default="", help="a model folder (e.g. models/nano) instead of the preset")
    parser.add_argument("--quantize", default="auto", choices=("auto", "none", "int8"),
                        help="LLM weights of --model (default none: float, the node's default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads in both processes (default 1: stable on a "
                             "shared machine)")
    args = parser.parse_args(argv)
    env = isolated_env(args.threads)  # before torch and rclpy load here

    import torch

    from refvlm_ros.image_conversions import array_to_image

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rgb = sim_image()
    from refvlm_core.predictor import Predictor

    start = time.perf_counter()
    predictor = (Predictor.from_pretrained(args.model, quantize=args.quantize) if args.model
                 else Predictor.from_preset(args.preset, device="cpu"))
    load_s = time.perf_counter() - start
    image_msg = array_to_image(rgb, "rgb8")
    start = time.perf_counter()
    process = start_node({**model_parameters(args.preset, args.model), "quantize": args.quantize},
                         env)  # same thread count as here
    node_up_s = time.perf_counter() - start
    loaded = next((m for m in map(LOADED.search, process.startup_log) if m), None)
    node_s, direct_s = [], []
    try:
        client = NodeClient()
        # Alternate the two, so that both see the same machine load; the first pair warms up.
        for run in range(args.runs + 1):
            node_time, node_text = timed(lambda: client.ask(image_msg))
            direct_time, direct_text = timed(lambda: predictor.predict(rgb, PROMPT).trp_text)
            if run:
                node_s.append(node_time)
                direct_s.append(direct_time)
        client.close()
    finally:
        stop_node(process)

    node_median, direct_median = statistics.median(node_s), statistics.median(direct_s)
    print(f"{args.model or 'preset ' + args.preset}, 320x240 SimWorld image, {args.runs} runs, "
          f"{threads} torch threads")
    print(f"  node up (process start to active) {node_up_s:6.1f} s; Predictor load here {load_s:6.1f} s "
          f"(LLM weights {getattr(predictor, 'quantize', 'none')})")
    if loaded:
        print(f"  node configure's model load   {float(loaded.group(1)):6.1f} s (target <= 10 s warm): "
              f"{loaded.group(2)}")
    print(f"  Predictor.predict (direct)   median {direct_median * 1e3:8.1f} ms  "
          f"min {min(direct_s) * 1e3:8.1f} ms")
    print(f"  Query service round trip     median {node_median * 1e3:8.1f} ms  "
          f"min {min(node_s) * 1e3:8.1f} ms")
    print(f"  ratio node / direct          {node_median / direct_median:8.3f}   (target <= 1.10)")
    node_stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in client.stages.items())
    print(f"  node's own stage timings of the last call (ms): {node_stages}")
    if node_text != direct_text:
        print("  WARNING: the node and the direct call produced different text, so they did "
              "different amounts of work; the ratio is not comparable", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
