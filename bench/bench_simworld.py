"""SimWorld throughput on one core: scenes/s (layout + render) and samples/s
(render + language + task builders) at 320x240 and 640x480.

Run: python bench/bench_simworld.py [--scenes N]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import time  # noqa: E402

from refvlm_simworld import SimWorld, SimWorldConfig  # noqa: E402
from refvlm_training.data.simworld import world_samples  # noqa: E402


def rate(function, count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        function(index)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40)
    args = parser.parse_args()
    print(f"{'resolution':>10} {'scenes/s':>9} {'ms/scene':>9} {'samples/s':>10} {'scenes/s with samples':>22}")
    for width, height in ((320, 240), (640, 480)):
        world = SimWorld(SimWorldConfig(width=width, height=height), "train")
        world.scene(0)  # warm caches and imports
        scenes_per_s = rate(world.scene, args.scenes)
        count = max(args.scenes // 4, 5)
        start = time.perf_counter()
        samples = sum(len(world_samples(world, i)) for i in range(count))
        seconds = time.perf_counter() - start
        print(f"{width}x{height:>4} {scenes_per_s:9.1f} {1000 / scenes_per_s:9.1f} {samples / seconds:10.1f} "
              f"{count / seconds:22.1f}")


if __name__ == "__main__":
    main()
