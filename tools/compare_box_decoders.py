"""Learning curves of box decoders on the same data and steps: the DETR-style regressor
(kind "detr"), the heatmap decoder (the default kind) and the object-centric decoder that
chooses among the towers' objects (kind "objects", towers with object maps).

The LLM is left out so that only the decoder differs: each REC phrase is embedded by a
bag of words (learnt jointly, the same for both), the image by frozen towers (stage 0's).
Every decoder sees the same batches in the same order; Acc@0.5 is measured on held-out
test-split REC items every ``--every`` steps. Writes a JSON of the curves and a PNG.

    python tools/compare_box_decoders.py --towers runs/nano/stage0/model --kinds heatmap,objects \
        --train runs/data/simworld/nano-train --test runs/data/simworld/nano-test --out runs/compare
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def rec_items(folder: str, limit: int) -> list[tuple[np.ndarray, str, np.ndarray]]:
    """(image, phrase, xyxy box) of single-box REC samples."""
    from refvlm_training.data.loader import VTInstructDataset

    items = []
    for sample in VTInstructDataset(folder, shuffle=False):
        if sample.task != "rec" or not sample.turns[1].targets:
            continue
        target = sample.turns[1].targets[0]
        items.append((sample.image, target.phrase, np.asarray(target.boxes[0], np.float32)))
        if len(items) >= limit:
            break
    return items


class PhraseEmbedding(nn.Module):
    """Mean of learnt word vectors: a "perfect phrase" stand-in for the LLM's <REF> state."""

    def __init__(self, vocabulary: dict[str, int], dim: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.bag = nn.EmbeddingBag(len(vocabulary) + 1, dim, mode="mean")

    def forward(self, phrases: list[str]) -> torch.Tensor:
        ids = [torch.tensor([self.vocabulary.get(w, 0) for w in re.findall(r"\w+", p.lower())] or [0])
               for p in phrases]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.bag(torch.cat(ids), offsets)                                # [B, D]


def encode(items, encoder, size: int):
    """Frozen pyramids and normalised cxcywh targets of every item."""
    from refvlm_core.geometry import CLIP_MEAN_RGB, Letterbox, normalize_boxes, xyxy_to_cxcywh

    pyramids, boxes = [], []
    with torch.no_grad():
        for image, _, xyxy in items:
            letterbox = Letterbox.fit(image.shape[0], image.shape[1], size)
            framed = torch.from_numpy(letterbox.image_to_model(image, CLIP_MEAN_RGB)).permute(2, 0, 1).float() / 255
            pyramids.append([level[0] for level in encoder(framed[None]).pyramid])
            boxes.append(xyxy_to_cxcywh(normalize_boxes(letterbox.boxes_to_model(xyxy[None]), size))[0])
    return pyramids, torch.tensor(np.stack(boxes), dtype=torch.float32)


def batch_of(pyramids, index):
    return [torch.stack([pyramids[i][k] for i in index]) for k in range(len(pyramids[0]))]


def accuracy(decoder, words, pyramids, boxes, phrases) -> float:
    from refvlm_core.geometry import box_iou, cxcywh_to_xyxy

    decoder.eval()
    hits = []
    with torch.no_grad():
        for start in range(0, len(phrases), 32):
            index = list(range(start, min(start + 32, len(phrases))))
            refs = words([phrases[i] for i in index])[:, None]
            out = decoder(refs, torch.ones(len(index), 1, dtype=torch.bool), batch_of(pyramids, index))
            iou = torch.diag(box_iou(cxcywh_to_xyxy(out["boxes"][:, 0]), cxcywh_to_xyxy(boxes[index])))
            hits += (iou >= 0.5).tolist()
    decoder.train()
    return float(np.mean(hits))


def train_curve(kind: str, train, test, vocabulary, pyramid_channels, args) -> list[tuple[int, float, float]]:
    from refvlm_core.decoders.base import build_decoder
    from refvlm_core.router import route
    from refvlm_core.targets import UnitTargets

    torch.manual_seed(0)
    decoder = build_decoder("box", args.dim, pyramid_channels, kind=KINDS[kind], hidden_dim=128, num_heads=4,
                            num_layers=2)
    words = PhraseEmbedding(vocabulary, args.dim)
    optimizer = torch.optim.AdamW(list(decoder.parameters()) + list(words.parameters()), lr=args.lr)
    order = np.random.default_rng(0)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        index = order.integers(0, len(train["phrases"]), args.batch).tolist()
        refs = words([train["phrases"][i] for i in index])
        routed = route([r[None] for r in refs], [[("box",)]] * len(index), [[0]] * len(index), ("box",), 1)["box"]
        targets = [UnitTargets(group_ids=torch.zeros(1, dtype=torch.long), value=train["boxes"][i:i + 1])
                   for i in index]
        losses = decoder.loss(decoder(routed.embeddings, routed.valid, batch_of(train["pyramids"], index)),
                              routed, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            acc = accuracy(decoder, words, test["pyramids"], test["boxes"], test["phrases"])
            curve.append((step, acc, round(time.perf_counter() - start, 1)))
            print(f"{kind:8s} step {step:5d}  test Acc@0.5 {acc:.3f}", flush=True)
    return curve


KINDS = {"detr": "detr", "heatmap": "default", "objects": "objects"}   # name here -> registered kind of "box"
LABELS = {"detr": "DETR-style regressor", "heatmap": "heatmap decoder", "objects": "choice among the towers' objects"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--towers", required=True, help="stage 0 model folder (vit/convnext.safetensors)")
    parser.add_argument("--train", required=True, help="SimWorld train shards (REC samples)")
    parser.add_argument("--test", required=True, help="SimWorld test shards (REC samples)")
    parser.add_argument("--out", required=True, help="folder for box_decoders.json and box_decoders.png")
    parser.add_argument("--kinds", default="detr,heatmap", help=f"decoders to compare, of {','.join(KINDS)}")
    parser.add_argument("--preset", default="nano", help="preset whose towers --towers holds (default nano)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dim", type=int, default=576, help="stand-in REF width (nano's LLM: 576)")
    parser.add_argument("--train-items", type=int, default=3000)
    parser.add_argument("--test-items", type=int, default=300)
    args = parser.parse_args()

    from refvlm_core.config import preset
    from refvlm_core.encoders import DualImageEncoder

    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds {args.kinds}: choose among {', '.join(KINDS)}")
    vision = preset(args.preset).vision
    vision.vit_weights = str(Path(args.towers) / "vit.safetensors")
    vision.convnext_weights = str(Path(args.towers) / "convnext.safetensors")
    encoder = DualImageEncoder(vision)
    data = {}
    for split, folder, limit in (("train", args.train, args.train_items), ("test", args.test, args.test_items)):
        items = rec_items(folder, limit)
        pyramids, boxes = encode(items, encoder, vision.image_size)
        data[split] = {"pyramids": pyramids, "boxes": boxes, "phrases": [phrase for _, phrase, _ in items]}
    words = sorted({w for p in data["train"]["phrases"] for w in re.findall(r"\w+", p.lower())})
    vocabulary = {w: i + 1 for i, w in enumerate(words)}
    curves = {kind: train_curve(kind, data["train"], data["test"], vocabulary, encoder.pyramid_channels, args)
              for kind in kinds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "box_decoders.json").write_text(json.dumps({"args": vars(args), "curves": curves}, indent=2))
    plot(curves, out / "box_decoders.png", args)
    print(f"wrote {out / 'box_decoders.json'} and {out / 'box_decoders.png'}")
    return 0


def plot(curves, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for kind, curve in curves.items():
        steps, acc = [c[0] for c in curve], [c[1] for c in curve]
        axis.plot(steps, acc, marker="o", label=LABELS[kind])
    axis.set_xlabel(f"steps (batch {args.batch}, the same batches for each)")
    axis.set_ylabel("test REC Acc@0.5")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title("Box decoders over stage-0 towers, phrase by bag of words")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
