"""`refvlm train` and ``python -m refvlm_training.engine`` (what torchrun launches)."""
from __future__ import annotations

import argparse
import json
import logging


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True,
                        help="0: vision towers on SimWorld's dense ground truth; 1: projector, boxes as text; "
                        "2: projector + LLM + decoders; 3: external decoder")
    parser.add_argument("--config", required=True, help="training config (YAML or JSON), e.g. configs/train/tiny_stage1.yaml")
    parser.add_argument("--out", default=None, help="run folder (overrides the config's 'out')")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the config)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still written)")
    return parser


def run(args: argparse.Namespace) -> int:
    from refvlm_training.engine.config import load_config
    from refvlm_training.engine.distributed import shutdown
    from refvlm_training.engine.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, stage=args.stage, out=args.out, steps=args.steps)
    try:
        if cfg.stage == 0:
            from refvlm_training.engine.stage0 import pretrain_towers

            result = pretrain_towers(cfg, resume=args.resume, progress=not args.no_progress)
        else:
            result = train(cfg, resume=args.resume, progress=not args.no_progress)
    finally:
        shutdown()
    if result.model_dir is not None:
        last = result.history[-1] if result.history else {}
        print(json.dumps({"model_dir": str(result.model_dir), "steps": result.steps,
                          "seconds": round(result.seconds, 2),
                          "loss": last.get("loss")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train REF-VLM (stage 0, 1, 2 or 3); also runs under torchrun",
                                   description="Staged training on torch.distributed: "
                                   "torchrun --nproc_per_node N -m refvlm_training.engine takes the same arguments.")
    add_arguments(parser)
    parser.set_defaults(func=run)
