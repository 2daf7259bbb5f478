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
    parser.add_argument("arguments", nargs="*", metavar="NAME:=VALUE",
                        help="launch arguments, as for ros2 launch: namespace, model_path, "
                             "model_preset, device, runtime, image_topic, depth_topic, "
                             "camera_info_topic, use_sim_time")
    parser.add_argument("--params", type=Path, default=None, metavar="FILE",
                        help="ROS parameter file applied after the graph's own (keys: node "
                             "names), like the launch files' params_file argument")
    parser.add_argument("--graph-file", type=Path, default=None, metavar="FILE",
                        help="node graph YAML (default: launch/graph.yaml)")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.set_defaults(func=run)


def parse_launch_arguments(items: list[str]) -> dict[str, str]:
    """["namespace:=robot1", ...] -> {"namespace": "robot1"}; unknown names are errors."""
    from refvlm_ros.graph import GRAPH_ARGUMENTS

    arguments = {}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or name not in GRAPH_ARGUMENTS:
            raise ConfigError(f"bringup argument {item!r}: use NAME:=VALUE with NAME one of "
                              f"{', '.join(GRAPH_ARGUMENTS)}")
        arguments[name] = value
    return arguments


def run(args: argparse.Namespace) -> int:
    try:
        from refvlm_ros.bringup import Bringup
    except ImportError as error:
        raise RefVLMError(f"ROS 2 parts are missing ({error}); run `make setup`, or "
                          "source a ROS 2 Jazzy install") from error
    from refvlm_ros.graph import load_graph, with_arguments

    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    graph = with_arguments(load_graph(args.graph, args.graph_file, args.params),
                           parse_launch_arguments(args.arguments))
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
