"""DETR-like box decoder: each <REF> embedding becomes a query that cross-attends to the
flattened multi-scale pyramid; an MLP gives a sigmoid cx, cy, w, h and a score logit."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from refvlm_core.decoders.base import UnitDecoder, per_image, register_decoder
from refvlm_core.decoders.layers import MLP, RefImageDecoder
from refvlm_core.geometry import box_iou, cxcywh_to_xyxy
from refvlm_core.losses import box_giou_loss, box_l1_loss, connected_zero
from refvlm_core.matching import (box_cost, grouped_hungarian, matched_predictions, matched_targets,
                                  pad_groups, pad_stack)
from refvlm_core.router import RoutedRefs, UnitTargets


@register_decoder("box")
class BoxDecoder(UnitDecoder):
    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, ffn_dim: int | None = None, memory_levels: int = 3, **kwargs: Any) -> None:
        super().__init__(llm_dim, pyramid_channels, **kwargs)
        self.trunk = RefImageDecoder(llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers,
                                     ffn_dim or 4 * hidden_dim, memory_levels)
        self.box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.score_head = torch.nn.Linear(hidden_dim, 1)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        x = self.trunk(ref_embeddings, ref_valid, pyramid)  # [B, L, hidden]
        return {"boxes": self.box_head(x).sigmoid(),        # [B, L, 4] cx, cy, w, h in [0, 1]
                "scores": self.score_head(x).squeeze(-1)}   # [B, L] logit

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        boxes = self.check_targets(routed, targets, "boxes")
        w, zero = self.weights, connected_zero(outputs)
        names = ("loss_box_l1", "loss_box_giou", "loss_box_score")
        if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
            return dict.fromkeys(names, zero)
        pred = outputs["boxes"]
        boxes = [b if b is not None else pred.new_zeros(0, 4) for b in boxes]
        groups = [t.group_ids.to(pred.device) for t in targets]
        cost = box_cost(pred.detach(), pad_stack(boxes).to(pred), w.box_l1, w.box_giou)  # [B, L, Mmax]
        matches = grouped_hungarian(cost, routed.group_ids, pad_groups(groups))
        src, tgt = matched_predictions(pred, matches), matched_targets(boxes, matches).to(pred)
        num = max(src.shape[0], 1)
        return {
            "loss_box_l1": w.box_l1 * box_l1_loss(src, tgt, num) + zero,
            "loss_box_giou": w.box_giou * box_giou_loss(src, tgt, num) + zero,
            "loss_box_score": w.box_score * self._score_loss(outputs["scores"], routed, matches, src, tgt) + zero,
        }

    @staticmethod
    def _score_loss(scores: Tensor, routed: RoutedRefs, matches: list, src: Tensor, tgt: Tensor) -> Tensor:
        """BCE of each valid ref's score towards its box's IoU with the matched target (0 if unmatched)."""
        iou = torch.diag(box_iou(cxcywh_to_xyxy(src.detach()), cxcywh_to_xyxy(tgt))).to(scores.dtype)
        goal = torch.zeros_like(scores)
        batch = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)]).to(scores.device)
        goal[batch, torch.cat([p for p, _ in matches]).to(scores.device)] = iou
        bce = F.binary_cross_entropy_with_logits(scores, goal, reduction="none")
        valid = routed.valid.to(scores.dtype)
        return (bce * valid).sum() / valid.sum().clamp(min=1.0)

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        boxes = outputs["boxes"].detach().float().cpu().numpy()
        scores = outputs["scores"].detach().float().sigmoid().cpu().numpy()
        return per_image(routed, lambda b, l: {"box_cxcywh": boxes[b, l], "score": float(scores[b, l])})
