"""Keypoint decoder: 17 COCO keypoints per <REF>. Each REF query cross-attends to the
pyramid; an MLP gives x, y (sigmoid, normalised model frame) and a visibility logit per
keypoint ("labelled": v > 0 in COCO terms)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import Tensor

from refvlm_core.decoders.base import UnitDecoder, per_image, register_decoder
from refvlm_core.decoders.layers import MLP, RefImageDecoder
from refvlm_core.losses import connected_zero, keypoint_l1_loss, keypoint_visibility_loss
from refvlm_core.matching import (grouped_hungarian, keypoint_cost, matched_predictions, matched_targets,
                                  pad_groups, pad_stack)
from refvlm_core.router import RoutedRefs, UnitTargets

NUM_KEYPOINTS = 17


@register_decoder("keypoint")
class KeypointDecoder(UnitDecoder):
    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, ffn_dim: int | None = None, memory_levels: int = 3, **kwargs: Any) -> None:
        super().__init__(llm_dim, pyramid_channels, **kwargs)
        self.trunk = RefImageDecoder(llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers,
                                     ffn_dim or 4 * hidden_dim, memory_levels)
        self.head = MLP(hidden_dim, hidden_dim, NUM_KEYPOINTS * 3, 3)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        x = self.head(self.trunk(ref_embeddings, ref_valid, pyramid)).unflatten(-1, (NUM_KEYPOINTS, 3))
        return {"keypoints": x[..., :2].sigmoid(),    # [B, L, 17, 2] x, y in [0, 1]
                "visibility_logits": x[..., 2]}        # [B, L, 17]

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        keypoints = self.check_targets(routed, targets, "keypoints")
        w, zero = self.weights, connected_zero(outputs)
        names = ("loss_keypoint_l1", "loss_keypoint_visibility")
        if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
            return dict.fromkeys(names, zero)
        xy, vis = outputs["keypoints"], outputs["visibility_logits"]
        keypoints = [k.to(xy) if k is not None else xy.new_zeros(0, NUM_KEYPOINTS, 3) for k in keypoints]
        groups = [t.group_ids.to(xy.device) for t in targets]
        cost = keypoint_cost(xy.detach(), vis.detach(), pad_stack(keypoints), w.keypoint_l1, w.keypoint_visibility)
        matches = grouped_hungarian(cost, routed.group_ids, pad_groups(groups))
        tgt = matched_targets(keypoints, matches)
        return {
            "loss_keypoint_l1": w.keypoint_l1 * keypoint_l1_loss(matched_predictions(xy, matches), tgt) + zero,
            "loss_keypoint_visibility": w.keypoint_visibility * keypoint_visibility_loss(
                matched_predictions(vis, matches), tgt) + zero,
        }

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        xy = outputs["keypoints"].detach().float().cpu().numpy()
        vis = outputs["visibility_logits"].detach().float().sigmoid().cpu().numpy()
        # [17, 3]: x, y normalised, probability that the keypoint is labelled
        return per_image(routed, lambda b, l: {"keypoints": np.concatenate([xy[b, l], vis[b, l, :, None]], -1)})
