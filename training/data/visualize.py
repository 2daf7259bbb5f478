"""Draw one sample for a person to check: the image with boxes, masks, keypoint
skeletons and visual prompts, the depth map in colour, and the dialogue text."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from refvlm_core.sample import Sample

# COCO person skeleton, 0-based keypoint indices.
SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
            (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))


def _colour(i: int) -> tuple[float, float, float]:
    import matplotlib
    return matplotlib.colormaps["tab10"](i % 10)[:3]


def overlay_masks(image: np.ndarray, sample: Sample) -> np.ndarray:
    """[H, W, 3] uint8 with every target mask blended in its colour."""
    out = image.astype(np.float32)
    k = 0
    for turn in sample.turns:
        for target in turn.targets:
            for mask in target.masks if target.masks is not None else []:
                out[mask] = 0.5 * out[mask] + 0.5 * 255 * np.array(_colour(k))
                k += 1
    return out.clip(0, 255).astype(np.uint8)


def draw_sample(sample: Sample, out_path: str | Path) -> Path:
    """Write a PNG showing ``sample``; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if sample.depth is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5))
    ax = axes[0]
    ax.imshow(overlay_masks(sample.image, sample))
    ax.set_title(f"{sample.id} ({sample.task})", fontsize=8)
    k = 0
    for turn in sample.turns:
        for target in turn.targets:
            for i in range(target.count if target.boxes is not None or target.keypoints is not None else 0):
                colour = _colour(k)
                k += 1
                if target.boxes is not None:
                    x0, y0, x1, y1 = target.boxes[i]
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=1.5))
                    ax.text(x0, y0, target.phrase, color="white", fontsize=6,
                            bbox={"facecolor": colour, "pad": 1, "lw": 0})
                if target.keypoints is not None:
                    kps = target.keypoints[i]
                    for a, b in SKELETON:
                        if kps[a, 2] > 0 and kps[b, 2] > 0:
                            ax.plot(kps[[a, b], 0], kps[[a, b], 1], color=colour, lw=1)
                    seen = kps[:, 2] > 0
                    ax.scatter(kps[seen, 0], kps[seen, 1], s=6, color=colour)
    for j, prompt in enumerate(sample.visual_prompts):
        label = f"region {j}"
        if prompt.kind == "mask":
            ax.contour(prompt.mask, levels=[0.5], colors="yellow", linewidths=1)
        elif prompt.kind == "box":
            (x0, y0), (x1, y1) = prompt.points
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", ls="--"))
        else:
            ax.plot(prompt.points[:, 0], prompt.points[:, 1], "y-o", ms=3, lw=1)
        ax.annotate(label, prompt.points[0] if prompt.points is not None else (0, 0), color="yellow", fontsize=6)
    ax.axis("off")
    if sample.depth is not None:
        shown = axes[1].imshow(sample.depth, cmap="turbo")
        fig.colorbar(shown, ax=axes[1], fraction=0.046, label="metres")
        axes[1].set_title("depth", fontsize=8)
        axes[1].axis("off")
    text_ax = axes[-1]
    text_ax.axis("off")
    lines = [f"[system] {sample.system or ''}"]
    lines += [f"[{turn.role}] {turn.text}" for turn in sample.turns]
    wrapped = "\n".join(textwrap.fill(line, 70) for line in lines)
    text_ax.text(0, 1, wrapped, va="top", ha="left", fontsize=7, family="monospace", wrap=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out_path
