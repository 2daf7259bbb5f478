"""NYU Depth v2 in its common extracted layout (the labeled .mat exported to PNGs).

Layout::

    root/<split>/rgb/<name>.png      # 8-bit RGB (jpg also accepted)
    root/<split>/depth/<name>.png    # 16-bit single channel, millimetres, 0 = no reading

The official ``nyu_depth_v2_labeled.mat`` (HDF5) is not read directly: export it to this
layout first (images as RGB PNG, depths x 1000 as uint16 PNG). Depth becomes float32
metres with NaN where there is no reading (REP-118).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from refvlm_training.data.converters.common import ImageItem, Skipped, iter_limit, need_dir, read_image
from refvlm_training.data.tasks import ImageAnnotations

TASKS = ("depth",)


def read_depth_png(path: Path) -> np.ndarray | None:
    """16-bit millimetre PNG -> [H, W] float32 metres, NaN for 0; None if not 16-bit."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 2 or raw.dtype != np.uint16:
        return None
    depth = raw.astype(np.float32) / 1000.0
    depth[raw == 0] = np.nan
    return depth


def open_dataset(name: str, root: Path, split: str = "test", limit: int | None = None,
                 images: str | None = None) -> tuple[tuple[str, ...], Iterator, int]:
    rgb_dir = need_dir(root / split / "rgb", f"{split}/rgb")
    depth_dir = need_dir(root / split / "depth", f"{split}/depth")
    files = sorted(p for p in rgb_dir.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    total = len(files) if limit is None else min(limit, len(files))
    return TASKS, iter_limit(_items(files, depth_dir), limit), total


def _items(files: list[Path], depth_dir: Path) -> Iterator[ImageItem | Skipped]:
    for path in files:
        image = read_image(path)
        depth = read_depth_png(depth_dir / f"{path.stem}.png")
        if image is None:
            yield Skipped(path.name, "unreadable_image")
        elif depth is None or depth.shape != image.shape[:2]:
            yield Skipped(path.name, "bad_depth_png")
        else:
            yield ImageItem(ImageAnnotations(image_id=f"nyu_{path.stem}", image=image, depth=depth), path)
