"""The `refvlm` command. Each subcommand is one ``<name>_command`` module with a
``register(subparsers)`` function, in the package whose work it runs; those modules import
nothing heavy at import time so that ``refvlm --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from refvlm_core.errors import RefVLMError

# refvlm_ros (the `bringup` command) is installed by `make setup` from ros_ws/ and is
# absent where only the library is installed.
COMMAND_MODULES = [
    "refvlm_cli.trp_command",
    "refvlm_cli.infer_command",
    "refvlm_training.data_command",
    "refvlm_training.engine.train_command",
    "refvlm_training.evaluation.eval_command",
    "refvlm_training.evaluation.probe_command",
    "refvlm_export.export_command",
    "refvlm_ros.bringup_command",
    "refvlm_cli.demo_command",
    "refvlm_mcp.mcp_command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refvlm",
        description="REF-VLM referring perception: parse TRP, run the model, build data, "
        "train, evaluate, export, and bring up the ROS 2 node.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue  # that part is not installed here
            raise  # a real missing dependency: say so
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RefVLMError as error:
        print(f"refvlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
