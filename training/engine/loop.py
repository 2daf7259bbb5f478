"""The loop every stage runs, whatever its step is: steps until ``cfg.steps``, metrics as JSON
lines, TensorBoard scalars and a tqdm bar, a checkpoint every ``cfg.checkpoint_every`` steps and
at the last one, then the stage's model folder.

A stage brings a ``StageRunner``: its own model, data and ``train_step``; how it checkpoints and
resumes (the trainer's LLM stages, stage 0's towers). Logs, progress and checkpoint cadence
are this module's, so they behave the same in every stage, and a killed run resumed from its
checkpoint writes the same metrics file as an unbroken one (``resume_metrics``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"


@dataclass
class TrainResult:
    out: Path
    model_dir: Path | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    seconds: float = 0.0


class StageRunner(Protocol):
    step: int  # optimizer steps taken (restored by the runner's resume)

    def train_step(self) -> dict[str, float]: ...  # one optimizer step; step += 1

    def save_checkpoint(self) -> None: ...

    def save_model(self) -> Path | None: ...


def loss_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's postfix: every loss term, short."""
    return {k.removeprefix("loss_"): f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss")}


def fit(runner: StageRunner, cfg, *, is_main: bool = True, progress: bool = True,
        postfix: Callable[[dict[str, float]], dict[str, str]] = loss_postfix) -> TrainResult:
    """Run ``runner`` from its current step to ``cfg.steps``; logs and the bar on the main process."""
    out = Path(cfg.out)
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    logger = MetricsLogger(out, cfg) if is_main else None
    bar = progress_bar(cfg.steps, runner.step, is_main and progress)
    try:
        while runner.step < cfg.steps:
            metrics = runner.train_step()
            metrics["seconds"] = round(time.perf_counter() - start, 3)
            step = runner.step
            history.append({"step": step, **metrics})
            if logger is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                logger.log(step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(postfix(metrics), refresh=False)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                runner.save_checkpoint()
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    model_dir = runner.save_model()
    return TrainResult(out, model_dir, runner.step, history, time.perf_counter() - start)


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def resume_metrics(out: Path, step: int) -> None:
    """Drop log lines past the checkpoint's step: the resumed run writes those steps again."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """JSON lines (one object per logged step) and TensorBoard scalars, on the main process."""

    def __init__(self, out: Path, cfg) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.handle = open(out / METRICS_FILE, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()
