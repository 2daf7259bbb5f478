"""The node's query latency per runtime, side by side, with its encoder and decoder stages.

    python bench/bench_node_runtimes.py [--preset tiny | --model models/nano] [--runs 5]
        [--runtimes torch,onnxruntime] [--export DIR] [--prompt TEXT] [--quantize auto|none|int8]

Takes the model's export from the export cache (refvlm_export.cache; exported on first
use) unless --export names one, then starts one node per runtime (`refvlm bringup camera`
in a namespace per runtime, runtime and export_dir set), all at once, and times ~/query
round trips with the same SimWorld image, asking the runtimes in turn (the order reversed
every other round) so that each sees the same machine load. Prints the round-trip median
and the node's own stage medians (encode = encoders + projector + aggregation, prefill and
decode = the LLM, which is torch on every runtime, decoders = router + unit decoders),
each runtime's ratio to the first one, and whether every runtime produced the same TRP
text (same work).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_bench import (PROMPT, NodeClient, isolated_env, model_parameters, sim_image, start_node,  # noqa: E402
                        stop_node)

STAGES = ("encode", "prefill", "decode", "decoders")
COLUMNS = ("round_trip", *STAGES)


def measure(runtimes: list[str], parameters: dict, export_dir: str, image_msg, prompt: str, runs: int,
            env: dict) -> dict:
    """runtime -> {"round_trip": [s], stage: [s], "text": last TRP}: one node per runtime (each
    in its own namespace), all up at once, asked in turn (the order reversed every other
    round, so each runtime sees the same machine load) ``runs`` times after a warm-up each."""
    processes, clients = {}, {}
    try:
        for runtime in runtimes:
            processes[runtime] = start_node({**parameters, "runtime": runtime, "export_dir": export_dir}, env,
                                            namespace=runtime)
            clients[runtime] = NodeClient(f"/{runtime}/refvlm_node/query")
        samples = {b: {column: [] for column in COLUMNS} for b in runtimes}
        for run in range(runs + 1):
            for runtime in (runtimes if run % 2 else runtimes[::-1]):
                start = time.perf_counter()
                samples[runtime]["text"] = clients[runtime].ask(image_msg, prompt)
                if run:  # the first round warms up
                    samples[runtime]["round_trip"].append(time.perf_counter() - start)
                    for stage in STAGES:
                        samples[runtime][stage].append(clients[runtime].stages.get(stage, float("nan")))
        return samples
    finally:
        for client in clients.values():
            client.close()
        for process in processes.values():
            stop_node(process)


def export_folder(model_arg: str, given: str) -> str:
    if given:
        return given
    from refvlm_export.cache import cached_export

    start = time.perf_counter()
    folder = cached_export(model_arg, say=print)
    print(f"export ready in {time.perf_counter() - start:.1f} s: {folder}")
    return str(folder)


def report(results: dict, title: str) -> None:
    medians = {b: {c: statistics.median(s[c]) * 1e3 for c in COLUMNS} for b, s in results.items()}
    first = next(iter(medians))
    print(title)
    print(f"  {'runtime':<22} " + " ".join(f"{c.replace('_', ' '):>10}" for c in COLUMNS))
    for runtime, row in medians.items():
        print(f"  {runtime:<22} " + " ".join(f"{row[c]:10.1f}" for c in COLUMNS))
    for runtime, row in medians.items():
        if runtime != first:
            print(f"  {runtime + ' / ' + first:<22} " + " ".join(f"{row[c] / medians[first][c]:10.2f}"
                                                              for c in COLUMNS))
    texts = {samples["text"] for samples in results.values()}
    print(f"  answer: {next(iter(texts))!r}" if len(texts) == 1 else
          "  WARNING: the runtimes produced different text, so they did different work")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default="", help="a model folder (e.g. models/nano) instead of the preset")
    parser.add_argument("--runtimes", default="torch,onnxruntime")
    parser.add_argument("--export", default="", help="an export folder (default: the export cache's)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantize", default="auto", choices=("auto", "none", "int8"),
                        help="the node's LLM weights, the same for every runtime (default none, as the node's)")
    args = parser.parse_args(argv)
    env = isolated_env(args.threads)  # before torch and rclpy load here

    from refvlm_ros.image_conversions import array_to_image

    model_arg = str(Path(args.model).resolve()) if args.model else args.preset
    export_dir = export_folder(model_arg, args.export)
    image_msg = array_to_image(sim_image(), "rgb8")
    parameters = {**model_parameters(args.preset, args.model), "quantize": args.quantize}
    results = measure(args.runtimes.split(","), parameters, export_dir, image_msg, args.prompt, args.runs, env)
    report(results, f"{args.model or 'preset ' + args.preset}, 320x240 SimWorld image, {args.prompt!r}, "
                    f"LLM weights quantize={args.quantize}, {args.runs} runs, {args.threads} thread(s), "
                    "medians in ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
