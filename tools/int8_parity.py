"""Int8 LLM weights against float ones on evaluation prompts: TRP structure, units and metrics.

    python tools/int8_parity.py [--model models/nano] [--per-task 25] [--data simworld:test:120:11]
                                [--node-layouts 10]

Runs the float and the int8 Predictor of one model folder on the same evaluation items
(each task's fixed evaluation prompt, as ``refvlm eval`` asks), alternating item by item,
and on the node's kind of question (the demo's short questions and a depth request under
the model's default system prompt, on the first ``--node-layouts`` scenes), and prints per
task: the share of answers with the same TRP structure (the unit blocks in
order, each with its units and its number of <REF>s, and whether the text parses), the
share with the same text, and each metric of both. Writes the comparison as JSON
(``--out``). Parity holds at >= 98% same structure and a drop of at most 1 point (0.01)
in every fraction metric, in the direction the metric improves; rmse (metres, no
points) is shown as its relative change, counts such as valid_images as they are.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from refvlm_core import trp

TASKS = ("rec", "res", "keypoint", "depth")
LOWER_IS_BETTER = ("absrel", "rmse")  # depth error metrics
RELATIVE = ("rmse",)                   # in metres: scored relative to the float value
COUNTS = ("valid_images",)


def structure(text: str) -> tuple:
    """(parses, ((units, number of <REF>s) per unit block, in text order))."""
    parse = trp.parse(text)
    return parse.ok, tuple((block.units, len(block.refs)) for _, block in parse.blocks())


def drop(name: str, float_value: float, int8_value: float) -> float:
    """How much worse int8 is (positive: worse), as a fraction (0.01 = 1 point)."""
    worse = int8_value - float_value if name in LOWER_IS_BETTER else float_value - int8_value
    return worse / max(abs(float_value), 1e-9) if name in RELATIVE else worse  # RELATIVE: a fraction of it


def compare_task(task: str, samples, predictors, per_task: int) -> dict:
    from refvlm_training.evaluation.runner import compute_metrics, eval_items

    items = eval_items(samples, task, limit=per_task)
    results: dict[str, list] = {name: [] for name in predictors}
    for item in items:
        for name, predictor in predictors.items():
            results[name].append(predictor.predict(item.sample.image, item.prompt, item.visual_prompts,
                                                   system=item.sample.system))
    same = [structure(a.trp_text) == structure(b.trp_text) for a, b in zip(results["float"], results["int8"])]
    metrics = {name: compute_metrics(task, items, rows) for name, rows in results.items()}
    return {
        "items": len(items),
        "same_structure": sum(same) / len(items),
        "same_text": sum(a.trp_text == b.trp_text for a, b in zip(results["float"], results["int8"])) / len(items),
        "metrics": metrics,
        "drops": {key: drop(key, metrics["float"][key], metrics["int8"][key])
                  for key in metrics["float"] if key not in COUNTS},
        "different": [{"prompt": item.prompt, "float": a.trp_text, "int8": b.trp_text}
                      for item, a, b, ok in zip(items, results["float"], results["int8"], same) if not ok],
        "query_s": {name: sum(r.timings["decode"] + r.timings["prefill"] + r.timings["encode"] for r in rows)
                    / len(rows) for name, rows in results.items()},
    }


DEPTH_QUESTION = "Please estimate the depth map of the image."  # the demo asks none


def node_questions() -> tuple[str, ...]:
    """What the node is asked: the demo's questions (refvlm_ros.demo) and a depth request."""
    from refvlm_ros.demo import DEFAULT_QUESTIONS

    return (*(question.prompt for question in DEFAULT_QUESTIONS), DEPTH_QUESTION)


def compare_node_questions(samples, predictors, layouts: int) -> dict:
    images = list({sample.image.tobytes(): sample.image for sample in samples}.values())[:layouts]
    rows = [{name: predictor.predict(image, question).trp_text for name, predictor in predictors.items()}
            | {"prompt": question} for image in images for question in node_questions()]
    same = [structure(row["float"]) == structure(row["int8"]) for row in rows]
    return {"items": len(rows), "same_structure": sum(same) / max(len(rows), 1),
            "same_text": sum(row["float"] == row["int8"] for row in rows) / max(len(rows), 1),
            "different": [row for row, ok in zip(rows, same) if not ok]}


def main() -> None:
    from refvlm_core.predictor import Predictor
    from refvlm_training.evaluation.runner import load_samples

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/nano")
    parser.add_argument("--per-task", type=int, default=25)
    parser.add_argument("--data", default="simworld:test:120:11", help="shard folder or simworld:SPLIT:N[:SEED]")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--node-layouts", type=int, default=10, help="scenes asked the node's questions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="int8-parity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictors = {"float": Predictor.from_pretrained(args.model, quantize="none"),
                  "int8": Predictor.from_pretrained(args.model, quantize="int8")}
    samples = list(load_samples(args.data))
    start, report = time.perf_counter(), {}
    for task in args.tasks.split(","):
        report[task] = compare_task(task, samples, predictors, args.per_task)
        row = report[task]
        print(f"{task}: {row['items']} prompts, same TRP structure {row['same_structure']:.1%}, same text "
              f"{row['same_text']:.1%}; " + ", ".join(
                  f"{key} {row['metrics']['float'][key]:.4f} -> {row['metrics']['int8'][key]:.4f}"
                  for key in row["metrics"]["float"]) + f"; query s float {row['query_s']['float']:.2f} "
              f"int8 {row['query_s']['int8']:.2f}", flush=True)
    total = sum(r["items"] for r in report.values())
    same = sum(r["same_structure"] * r["items"] for r in report.values()) / total
    worst = max(d for r in report.values() for k, d in r["drops"].items() if k not in RELATIVE)
    relative = {k: d for r in report.values() for k, d in r["drops"].items() if k in RELATIVE}
    print(f"all: {total} prompts, same TRP structure {same:.1%} (parity needs >= 98%), worst drop of a "
          f"fraction metric {worst * 100:.2f} points (parity needs <= 1); "
          + "".join(f"{k} {d:+.1%} relative; " for k, d in relative.items()) + f"{time.perf_counter() - start:.0f} s")
    node = compare_node_questions(samples, predictors, args.node_layouts)
    print(f"node questions: {node['items']} ({len(node_questions())} on {args.node_layouts} scenes), same TRP "
          f"structure {node['same_structure']:.1%}, same text {node['same_text']:.1%}", flush=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "data": args.data, "tasks": report,
                                          "same_structure": same, "worst_drop": worst, "node_questions": node},
                                         indent=1))


if __name__ == "__main__":
    main()
