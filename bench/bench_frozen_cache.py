"""Training step time with and without the frozen-output cache, side by side in one run.

Two set-ups on the same samples: stage 2 with frozen towers (the cache keeps their
features per image) and the decoder phase (``trainable: [decoders]``: the cache keeps
the REF states per sample too, so the LLM does not run). Each is timed on a small data
set after one pass over it, so every image / sample is in the cache: the steady state
of later epochs. Prints the median step time of each and the ratio.

    python bench/bench_frozen_cache.py [--preset tiny|nano] [--steps 6] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def write_data(folder: Path, scenes: int) -> Path:
    from refvlm_simworld import SimWorldConfig
    from refvlm_training.data.simworld import write_split

    write_split("train", scenes, folder, SimWorldConfig(width=256, height=192), progress=False,
                max_per_task=1, conversations=0, tasks=("rec", "res", "depth"), system="default")
    return folder


def step_seconds(data: Path, out: Path, preset: str, batch: int, steps: int, **fields) -> float:
    from refvlm_training.engine.config import config_from_dict
    from refvlm_training.engine.trainer import Trainer

    samples = 2 * batch
    cfg = config_from_dict({"stage": 2, "out": str(out), "steps": 10 ** 6, "batch_size": batch,
                            "data": {"train": str(data), "max_samples": samples},
                            "model": {"preset": preset}, **fields})
    trainer = Trainer(cfg, progress=False)
    for _ in range(samples // batch):  # one pass: every image and sample is now cached
        trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "nano"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data", scenes=args.batch)
        rows = []
        for name, fields in (("stage 2 (frozen towers)", {}), ("decoder phase", {"trainable": ["decoders"]})):
            cached = step_seconds(data, Path(tmp) / "a", args.preset, args.batch, args.steps, **fields)
            plain = step_seconds(data, Path(tmp) / "b", args.preset, args.batch, args.steps, cache_frozen=False,
                                 **fields)
            rows.append((name, plain, cached))
    print(f"{args.preset} preset, batch {args.batch}, 1 thread, median of {args.steps} steps (s)")
    print(f"{'set-up':26s} {'no cache':>9s} {'cache':>9s} {'speed-up':>9s}")
    for name, plain, cached in rows:
        print(f"{name:26s} {plain:9.3f} {cached:9.3f} {plain / cached:8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
