"""`refvlm data ...`: convert public datasets, render SimWorld, show and count shards; heavy
imports happen inside the handlers."""
from __future__ import annotations

import argparse

from refvlm_core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build and inspect VT-Instruct data (convert, simworld, show, stats)",
                                 description="Build VT-Instruct tar shards and look at them.")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    commands.required = True

    from refvlm_training.data.converters import CONVERTERS  # a dict of names: cheap
    convert = commands.add_parser("convert", help="convert a public dataset from its own layout to shards")
    convert.add_argument("name", choices=sorted(CONVERTERS), help="dataset")
    convert.add_argument("--root", required=True, help="the dataset's folder, in its published layout")
    convert.add_argument("--out", required=True, help="output folder for the shards")
    convert.add_argument("--split", default=None, help="dataset split (e.g. val2017, validation, testA)")
    convert.add_argument("--images", default=None, help="image folder when it is not where the layout puts it")
    convert.add_argument("--limit", type=int, default=None, help="convert at most this many images")
    convert.add_argument("--max-per-task", type=int, default=4,
                         help="samples per task and image (0 = all; default 4)")
    convert.add_argument("--conversations", type=int, default=1, help="mixed multi-turn samples per image")
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    convert.set_defaults(func=_convert)

    simworld = commands.add_parser("simworld", help="render SimWorld scenes and write their samples as shards")
    simworld.add_argument("--split", required=True, help="train, val or test")
    simworld.add_argument("--n", type=int, required=True, help="number of scenes")
    simworld.add_argument("--out", required=True, help="output folder for the shards")
    simworld.add_argument("--seed", type=int, default=0)
    simworld.add_argument("--size", default="320x240", help="image size WxH (default 320x240)")
    simworld.add_argument("--tasks", default=None,
                          help="comma-separated tasks to write (default: all), e.g. rec,res,keypoint,depth")
    simworld.add_argument("--conversations", type=int, default=1,
                          help="mixed multi-turn conversations per scene (default 1)")
    simworld.add_argument("--system", choices=("task", "default"), default="task",
                          help="system prompt of the samples: each task's instruction (task), or none stored so "
                          "the model's default prompt is used, as the node and `refvlm infer` send (default)")
    simworld.set_defaults(func=_simworld)

    show = commands.add_parser("show", help="draw one sample (image, targets, depth, dialogue) to a PNG")
    show.add_argument("shard", help="SHARD.tar[:INDEX] (INDEX defaults to 0)")
    show.add_argument("--out", required=True, help="PNG to write")
    show.set_defaults(func=_show)

    stats = commands.add_parser("stats", help="print task/unit counts and histograms of a shard folder")
    stats.add_argument("dir", help="folder of shards (or one shard)")
    stats.set_defaults(func=_stats)


def _convert(args: argparse.Namespace) -> int:
    from refvlm_training.data.converters.common import convert

    options = {k: v for k, v in (("split", args.split), ("images", args.images), ("limit", args.limit))
               if v is not None}
    summary = convert(args.name, args.root, args.out, seed=args.seed,
                      max_per_task=args.max_per_task or None, conversations=args.conversations,
                      max_samples_per_shard=args.shard_size, **options)
    print(summary.to_text())
    return 0


def _simworld(args: argparse.Namespace) -> int:
    from refvlm_training.data.templates import TASKS
    from refvlm_simworld import SimWorldConfig
    from refvlm_core.geometry import parse_size
    from refvlm_training.data.simworld import write_split

    width, height = parse_size(args.size)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else TASKS
    summary = write_split(args.split, args.n, args.out, SimWorldConfig(seed=args.seed, width=width, height=height),
                          tasks=tasks, conversations=args.conversations, system=args.system)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def parse_shard_index(text: str) -> tuple[str, int]:
    """"dir/x-00000.tar:3" -> ("dir/x-00000.tar", 3)."""
    path, _, index = text.rpartition(":") if not text.endswith(".tar") else (text, "", "0")
    if not path:
        path, index = text, "0"
    try:
        return path, int(index)
    except ValueError:
        raise InputError(f"expected SHARD.tar[:INDEX], got {text!r}") from None


def _show(args: argparse.Namespace) -> int:
    from refvlm_training.data.shards import read_sample
    from refvlm_training.data.visualize import draw_sample

    path, index = parse_shard_index(args.shard)
    print(draw_sample(read_sample(path, index), args.out))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from refvlm_training.data import stats

    print(stats.to_text(stats.collect(args.dir)))
    return 0
