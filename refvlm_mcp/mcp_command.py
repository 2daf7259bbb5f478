"""`refvlm mcp`: the MCP server, over the running node (ROS mode) or a Predictor in
this process (library mode), on stdio or streamable HTTP."""
from __future__ import annotations

import argparse
from pathlib import Path

from refvlm_core.errors import ConfigError, RefVLMError

EPILOG = """\
modes:
  ROS (default)  tools call the running node's ~/query; look reads its camera topic.
                 refvlm mcp --node /refvlm_node
  library        tools run a Predictor in this process on an image file (no ROS).
                 refvlm mcp --model models/nano --image scene.png [--depth depth.npy --intrinsics fx,fy,cx,cy]

An MCP client starts it as a command (stdio), e.g. {"command": "refvlm", "args": ["mcp"]};
with --http it serves streamable HTTP at http://HOST:PORT/mcp (HOST 127.0.0.1 unless --host).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "mcp", help="serve the perception node as typed MCP tools for agents (stdio or HTTP)",
        description="MCP server with the tools locate, segment, pose, depth, look and ask and the "
                    "resources refvlm://cameras and refvlm://status, for LLM planners and agent frameworks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ros = parser.add_argument_group("ROS mode")
    ros.add_argument("--node", default="/refvlm_node", help="the perception node's full name (default: %(default)s)")
    ros.add_argument("--image-topic", default=None, metavar="TOPIC",
                     help="camera topic for look (default: the Image topic the node subscribes to)")
    ros.add_argument("--timeout", type=float, default=60.0, metavar="S",
                     help="longest wait for one answer (default: %(default)s)")
    ros.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                     help="wait this long for the node's ~/query before a tool says it is not up "
                          "(default: %(default)s)")
    lib = parser.add_argument_group("library mode (chosen by --model or --preset)")
    lib.add_argument("--model", default=None, metavar="DIR", help="model folder, e.g. models/nano")
    lib.add_argument("--preset", default=None, help="untrained preset (tiny, nano) instead of a model folder")
    lib.add_argument("--image", type=Path, default=None, metavar="FILE",
                     help="the camera: an image file, read again on every call")
    lib.add_argument("--depth", type=Path, default=None, metavar="FILE",
                     help="depth aligned to the image: .npy metres, or 16-bit PNG millimetres")
    lib.add_argument("--intrinsics", default=None, metavar="FX,FY,CX,CY", help="camera intrinsics in pixels")
    lib.add_argument("--frame-id", default="camera", help="TF frame of the camera (default: %(default)s)")
    lib.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    lib.add_argument("--quantize", default="auto", choices=("auto", "int8", "none"),
                     help="LLM weights of a model folder, as the node's parameter (default: %(default)s)")
    transport = parser.add_argument_group("transport")
    transport.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    transport.add_argument("--host", default="127.0.0.1", help="HTTP address (default: %(default)s, this machine only)")
    transport.add_argument("--port", type=int, default=8765, help="HTTP port (default: %(default)s)")
    parser.set_defaults(func=run)


def _intrinsics(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        fx, fy, cx, cy = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--intrinsics {text!r}: give four numbers fx,fy,cx,cy (pixels)") from None
    if not (fx >= 1 and fy >= 1):
        raise ConfigError(f"--intrinsics {text!r}: focal lengths must be at least 1 pixel")
    return fx, fy, cx, cy


def make_perception(args: argparse.Namespace):
    if args.model or args.preset:
        from refvlm_mcp.local_perception import LocalPerception, load_predictor

        if args.image is None:
            raise ConfigError("library mode needs the camera image: --image FILE")
        if args.model and not Path(args.model).is_dir():
            raise ConfigError(f"--model {args.model}: no such model folder")
        intrinsics = _intrinsics(args.intrinsics)
        predictor, name = load_predictor(args.model, args.preset, args.device, args.quantize)
        return LocalPerception(predictor, args.image, name, args.depth, intrinsics, args.frame_id)
    try:
        from refvlm_mcp.ros_perception import RosPerception
    except ImportError as error:
        raise RefVLMError(f"ROS 2 parts are missing ({error}); run `make setup`, source a ROS 2 Jazzy "
                          "install, or use library mode (--model DIR --image FILE)") from error
    return RosPerception(args.node, args.image_topic, args.timeout, args.connect_timeout)


def run(args: argparse.Namespace) -> int:
    try:
        from refvlm_mcp.server import build_server
    except ImportError as error:
        raise RefVLMError(f"the MCP SDK is missing ({error}); run `make setup` or "
                          "`pip install -e '.[mcp]'`") from error
    perception = make_perception(args)
    server = build_server(perception)
    try:
        if args.http:
            server.run("streamable-http", host=args.host, port=args.port)
        else:
            server.run("stdio")
    finally:
        perception.close()
    return 0
