"""`refvlm eval --task T --model M --data D [--out FILE] [--limit N]`: run a model on an
evaluation set and print the task's metrics; heavy imports happen in the handler.
Heavy imports happen in the handler."""
from __future__ import annotations

import argparse

_EPILOG = """\
tasks: caption vqa pope rec res reg ig gcg gcg_box ovd ovs freeform_ovd freeform_ovs keypoint depth
examples:
  refvlm eval --task rec --model runs/nano/final --data shards/simworld-test --out rec.json
  refvlm eval --task depth --model tiny --data simworld:test:5 --limit 3"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model on a task with the paper's metrics",
        description="Runs the model with the task's evaluation prompt over the samples of --data, "
        "prints a metrics table and writes a JSON report.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, metavar="T", help="evaluation task (see below)")
    parser.add_argument("--model", required=True, metavar="M",
                        help="checkpoint folder, or a preset name (tiny, nano) built as configured")
    parser.add_argument("--data", required=True, metavar="D",
                        help="folder of .tar shards (or one shard), or simworld:SPLIT:N[:SEED]")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="JSON report (default: eval-<task>.json in the current folder)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate at most N samples")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quantize", choices=("auto", "none", "int8"), default="none",
                        help="LLM weights of a checkpoint folder: none (default: float), int8, "
                        "auto (int8 on a CPU)")
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from refvlm_core.errors import InputError
    from refvlm_training.evaluation.runner import check_eval_task, evaluate, load_predictor, load_samples

    task = check_eval_task(args.task)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    samples = load_samples(args.data)
    predictor = load_predictor(args.model, args.device, args.quantize)
    report = evaluate(predictor, samples, task, limit=args.limit)
    report.meta = {"model": args.model, "data": args.data, "llm_weights": getattr(predictor, "quantize", "none")}
    print(report.table())
    path = report.write_json(args.out or f"eval-{task}.json")
    print(f"report: {path}")
    return 0
