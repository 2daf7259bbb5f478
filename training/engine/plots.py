"""Loss curves of training runs as one PNG, from the runs' metrics.jsonl files.

    python -m refvlm_training.engine.plots --out losses.png runs/nano/stage1 runs/nano/stage2

Stages are drawn one after the other on a shared step axis; each loss term gets its own
panel (they differ by orders of magnitude) with a moving average over the raw points.
Steps where a term is exactly zero (no target of that unit in the batch) are left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from refvlm_core.errors import InputError


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl (or of that file itself)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{path} does not exist: pass a training run folder (with metrics.jsonl) "
                         "or the metrics.jsonl file itself")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "step" in r and "loss" in r]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over at most ``window`` points (shorter at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (sums[index] - sums[start]) / (index - start)


def plot_losses(runs: list[str | Path], out: str | Path, window: int = 20) -> Path:
    """One panel per loss term over all ``runs`` in order; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(Path(run).name, read_metrics(run)) for run in runs]
    names = sorted({key for _, records in stages for r in records for key in r if key.startswith("loss")})
    if not names:
        raise InputError(f"no loss records in {', '.join(map(str, runs))}: has training logged a step yet?")
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        offset = 0
        for label, records in stages:
            # exactly 0.0: the unit had no target in that batch (or trains in a later stage)
            points = [(offset + r["step"], r[name]) for r in records if r.get(name)]
            if points:
                steps, values = np.array(points, dtype=float).T
                axis.plot(steps, values, alpha=0.25, linewidth=0.8)
                axis.plot(steps, moving_average(values, window), label=label, linewidth=1.5)
            offset += max((r["step"] for r in records), default=0)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refvlm_training.engine.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files), in stage order")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--window", type=int, default=20, help="moving-average window in steps (default 20)")
    args = parser.parse_args(argv)
    print(plot_losses(args.runs, args.out, args.window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
