"""`refvlm bringup sim|camera`: the launch files' node graph, run in this process."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from refvlm_core.errors import ConfigError, RefVLMError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bringup",
        help="run the ROS 2 node graph (sim camera + node, or a real camera's node)",
        description="Runs the nodes of launch/sim.launch.py or launch/refvlm.launch.py in "
                    "this process (one MultiThreadedExecutor; lifecycle nodes configured "
                    "and activated). Ctrl-C shuts everything down.",
    )
    parser.add_argument("graph", choices=("sim", "camera"),
                        help="sim: SimWorld camera + perception node; camera: the node on "
                             "a real camera's topics")
    parser.add_argument("--params", type=Path, default=None, metavar="FILE",
                        help="ROS parameter file applied after the graph's own (keys: node "
                             "names), like the launch files' params_file argument")
    parser.add_argument("--graph-file", type=Path, default=None, metavar="FILE",
                        help="node graph YAML (default: launch/graph.yaml)")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from refvlm_ros.bringup import Bringup
    except ImportError as error:
        raise RefVLMError(f"ROS 2 parts are missing ({error}); run `make setup`, or "
                          "source a ROS 2 Jazzy install") from error
    from refvlm_ros.graph import load_graph

    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    graph = load_graph(args.graph, args.graph_file, args.params)
    bringup = Bringup(graph)
    # Ctrl-C (SIGINT) and `kill` (SIGTERM) end the wait; the main thread then runs the
    # shutdown, which a second signal does not interrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: bringup.request_stop())
    with bringup:
        names = ", ".join(bringup.nodes)
        print(f"bringup {graph.name}: running {names} (Ctrl-C to stop)", flush=True)
        bringup.spin_until_interrupted(args.duration)
    print(f"bringup {graph.name}: shut down", flush=True)
    return 0
