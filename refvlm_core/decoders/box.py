"""Box decoders.

``BoxDecoder`` (registered as "box"): each <REF> becomes a DETR query decoded against the
pyramid, then dotted with every pixel of an FPN map: a heatmap over the image. The box
centre is the heatmap's expectation; its width, height and score come from the query and
the feature the heatmap pools. Trained with L1 + GIoU on the box, a cross-entropy that
pulls the heatmap mass inside the target box, and both on every decoder layer (auxiliary).

``DetrBoxDecoder`` (kind "detr"): the DETR-style baseline that regresses cx, cy, w, h
from the query alone. Kept for the side-by-side learning curves in the model card
(tools/compare_box_decoders.py); a model uses it with ``decoders: {box: {kind: detr}}``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from refvlm_core.decoders.base import UnitDecoder, layer_weights, per_image, register_decoder
from refvlm_core.decoders.layers import MLP, DenseRefDecoder, RefImageDecoder, dot_heatmap, soft_argmax
from refvlm_core.errors import InputError
from refvlm_core.geometry import Letterbox, box_iou, clip_boxes, cxcywh_to_xyxy, normalize_boxes, xyxy_to_cxcywh
from refvlm_core.losses import box_giou_loss, box_l1_loss, connected_zero, heatmap_box_loss
from refvlm_core.matching import (box_cost, grouped_hungarian, matched_predictions, matched_targets,
                                  pad_groups, pad_stack)
from refvlm_core.results import ReferredObject
from refvlm_core.router import RoutedRefs
from refvlm_core.sample import RefTarget
from refvlm_core.targets import TargetFrame, UnitTargets

BOX_LOSSES = ("loss_box_l1", "loss_box_giou", "loss_box_score", "loss_box_heatmap")


@register_decoder("box")
class BoxDecoder(UnitDecoder):
    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, ffn_dim: int | None = None, memory_levels: int = 3,
                 pixel_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(llm_dim, pyramid_channels, **kwargs)
        pixel_dim = pixel_dim or hidden_dim
        self.trunk = DenseRefDecoder(llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers,
                                     ffn_dim or 4 * hidden_dim, memory_levels, pixel_dim, ref_norm=self.ref_norm)
        self.heat_embed = MLP(hidden_dim, hidden_dim, pixel_dim, 2)
        self.size_head = MLP(hidden_dim + pixel_dim, hidden_dim, 2, 3)
        self.score_head = torch.nn.Linear(hidden_dim + pixel_dim, 1)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        queries, pixels = self.trunk(ref_embeddings, ref_valid, pyramid)       # [N, B, L, D], [B, C, h, w]
        heat = dot_heatmap(self.heat_embed(queries), pixels)                   # [N, B, L, h, w]
        centre, prob = soft_argmax(heat)                                       # [N, B, L, 2], [N, B, L, h, w]
        both = torch.cat([queries, torch.einsum("nblhw,bchw->nblc", prob, pixels)], dim=-1)
        boxes = torch.cat([centre, self.size_head(both).sigmoid()], dim=-1)    # [N, B, L, 4] cx, cy, w, h
        outputs = {"boxes": boxes[-1], "scores": self.score_head(both[-1]).squeeze(-1)}  # [B, L, 4], [B, L]
        if self.training:  # every layer, for the heatmap and auxiliary losses
            outputs.update(layer_boxes=boxes, layer_heatmaps=prob)
        return outputs

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        boxes = self.check_targets(routed, targets)
        w, zero = self.weights, connected_zero(outputs)
        if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
            return dict.fromkeys(BOX_LOSSES, zero)
        pred = outputs["boxes"]
        boxes = [b if b is not None else pred.new_zeros(0, 4) for b in boxes]
        groups = [t.group_ids.to(pred.device) for t in targets]
        c = self.costs
        cost = box_cost(pred.detach(), pad_stack(boxes).to(pred), c.box_l1, c.box_giou)  # [B, L, Mmax]
        matches = grouped_hungarian(cost, routed.group_ids, pad_groups(groups))
        tgt = matched_targets(boxes, matches).to(pred)
        num = max(tgt.shape[0], 1)
        layers = outputs.get("layer_boxes", pred[None])
        heatmaps = outputs.get("layer_heatmaps")
        sums = dict.fromkeys(("l1", "giou", "heatmap"), zero)
        for n, weight in enumerate(layer_weights(len(layers), w.aux)):
            src = matched_predictions(layers[n], matches)
            sums["l1"] = sums["l1"] + weight * box_l1_loss(src, tgt, num)
            sums["giou"] = sums["giou"] + weight * box_giou_loss(src, tgt, num)
            if heatmaps is not None:
                sums["heatmap"] = sums["heatmap"] + weight * heatmap_box_loss(matched_predictions(heatmaps[n], matches), tgt)
        src = matched_predictions(pred, matches)
        return {
            "loss_box_l1": w.box_l1 * sums["l1"] + zero,
            "loss_box_giou": w.box_giou * sums["giou"] + zero,
            "loss_box_score": w.box_score * box_score_loss(outputs["scores"], routed, matches, src, tgt) + zero,
            "loss_box_heatmap": w.box_heatmap * sums["heatmap"] + zero,
        }

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        return box_postprocess(outputs, routed)

    def encode_target(self, target: RefTarget, frame: TargetFrame) -> np.ndarray:
        """xyxy pixels (or the masks' tight boxes) -> [M, 4] cx, cy, w, h in [0, 1] of the model frame."""
        boxes = target.boxes if target.boxes is not None else mask_boxes(target.masks, frame.sample.id)
        model = frame.letterbox.boxes_to_model(boxes)
        return xyxy_to_cxcywh(normalize_boxes(model, frame.size)).clip(0, 1)

    def fill_object(self, obj: ReferredObject, output: dict[str, Any], letterbox: Letterbox) -> None:
        xyxy = cxcywh_to_xyxy(np.asarray(output["box_cxcywh"], np.float64)[None]) * letterbox.size
        obj.box_xyxy = clip_boxes(letterbox.boxes_to_image(xyxy), letterbox.height,
                                  letterbox.width)[0].astype(np.float32)
        obj.score = output["score"]


def box_score_loss(scores: Tensor, routed: RoutedRefs, matches: list, src: Tensor, tgt: Tensor) -> Tensor:
    """BCE of each valid ref's score towards its box's IoU with the matched target (0 if unmatched)."""
    iou = torch.diag(box_iou(cxcywh_to_xyxy(src.detach()), cxcywh_to_xyxy(tgt))).to(scores.dtype)
    goal = torch.zeros_like(scores)
    batch = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)]).to(scores.device)
    goal[batch, torch.cat([p for p, _ in matches]).to(scores.device)] = iou
    bce = F.binary_cross_entropy_with_logits(scores, goal, reduction="none")
    valid = routed.valid.to(scores.dtype)
    return (bce * valid).sum() / valid.sum().clamp(min=1.0)


def box_postprocess(outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
    boxes = outputs["boxes"].detach().float().cpu().numpy()
    scores = outputs["scores"].detach().float().sigmoid().cpu().numpy()
    return per_image(routed, lambda b, l: {"box_cxcywh": boxes[b, l], "score": float(scores[b, l])})


def mask_boxes(masks: np.ndarray | None, sample_id: str) -> np.ndarray:
    """Tight xyxy boxes of masks (a box block given only masks)."""
    if masks is None:
        raise InputError(f"sample {sample_id}: a box block's RefTarget has neither boxes nor masks")
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            raise InputError(f"sample {sample_id}: an empty instance mask cannot give a box")
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(boxes, dtype=np.float32)


@register_decoder("box", kind="detr")
class DetrBoxDecoder(BoxDecoder):
    """The DETR-style baseline: cx, cy, w, h and a score regressed from the decoded query
    (BoxDecoder's losses, without the heatmap term it has no heatmap for)."""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, ffn_dim: int | None = None, memory_levels: int = 3, **kwargs: Any) -> None:
        UnitDecoder.__init__(self, llm_dim, pyramid_channels, **kwargs)
        self.trunk = RefImageDecoder(llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers,
                                     ffn_dim or 4 * hidden_dim, memory_levels, ref_norm=self.ref_norm)
        self.box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.score_head = torch.nn.Linear(hidden_dim, 1)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        x = self.trunk(ref_embeddings, ref_valid, pyramid)  # [B, L, hidden]
        return {"boxes": self.box_head(x).sigmoid(),        # [B, L, 4] cx, cy, w, h in [0, 1]
                "scores": self.score_head(x).squeeze(-1)}   # [B, L] logit
