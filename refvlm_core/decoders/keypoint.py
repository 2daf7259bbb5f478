"""Keypoint decoder: 17 COCO keypoints per <REF>, on the shared dense path
(layers.DenseRefDecoder). Each decoded REF query gives one embedding per keypoint; dotted
with every pixel of the FPN map it is a heatmap whose expectation is the keypoint's x, y
(normalised model frame). A visibility logit per keypoint ("labelled": v > 0 in COCO
terms) comes from the query. Losses: L1 on x, y, a cross-entropy of each heatmap against
a Gaussian at the target, visibility BCE; L1 and heatmap on every layer (auxiliary)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import Tensor

from refvlm_core.decoders.base import UnitDecoder, layer_weights, per_image, register_decoder
from refvlm_core.decoders.layers import MLP, DenseRefDecoder, dot_heatmap, soft_argmax
from refvlm_core.losses import connected_zero, heatmap_keypoint_loss, keypoint_l1_loss, keypoint_visibility_loss
from refvlm_core.matching import (grouped_hungarian, keypoint_cost, matched_predictions, matched_targets,
                                  pad_groups, pad_stack)
from refvlm_core.errors import InputError
from refvlm_core.geometry import Letterbox
from refvlm_core.results import ReferredObject
from refvlm_core.router import RoutedRefs
from refvlm_core.sample import RefTarget
from refvlm_core.targets import TargetFrame, UnitTargets

NUM_KEYPOINTS = 17


@register_decoder("keypoint")
class KeypointDecoder(UnitDecoder):
    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, ffn_dim: int | None = None, memory_levels: int = 3,
                 pixel_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(llm_dim, pyramid_channels, **kwargs)
        self.pixel_dim = pixel_dim or hidden_dim
        self.trunk = DenseRefDecoder(llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers,
                                     ffn_dim or 4 * hidden_dim, memory_levels, self.pixel_dim, ref_norm=self.ref_norm)
        self.point_embed = MLP(hidden_dim, hidden_dim, NUM_KEYPOINTS * self.pixel_dim, 2)
        self.visibility_head = MLP(hidden_dim, hidden_dim, NUM_KEYPOINTS, 2)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        queries, pixels = self.trunk(ref_embeddings, ref_valid, pyramid)        # [N, B, L, D], [B, C, h, w]
        embeds = self.point_embed(queries).unflatten(-1, (NUM_KEYPOINTS, self.pixel_dim))  # [N, B, L, 17, C]
        heat = dot_heatmap(embeds, pixels)                                      # [N, B, L, 17, h, w]
        xy, _ = soft_argmax(heat)                                               # [N, B, L, 17, 2]
        outputs = {"keypoints": xy[-1],                                         # [B, L, 17, 2] x, y in [0, 1]
                   "visibility_logits": self.visibility_head(queries[-1])}      # [B, L, 17]
        if self.training:
            outputs.update(layer_keypoints=xy, layer_keypoint_heatmaps=heat)
        return outputs

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        keypoints = self.check_targets(routed, targets)
        w, zero = self.weights, connected_zero(outputs)
        names = ("loss_keypoint_l1", "loss_keypoint_visibility", "loss_keypoint_heatmap")
        if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
            return dict.fromkeys(names, zero)
        xy, vis = outputs["keypoints"], outputs["visibility_logits"]
        keypoints = [k.to(xy) if k is not None else xy.new_zeros(0, NUM_KEYPOINTS, 3) for k in keypoints]
        groups = [t.group_ids.to(xy.device) for t in targets]
        c = self.costs
        cost = keypoint_cost(xy.detach(), vis.detach(), pad_stack(keypoints), c.keypoint_l1, c.keypoint_visibility)
        matches = grouped_hungarian(cost, routed.group_ids, pad_groups(groups))
        tgt = matched_targets(keypoints, matches)
        layers, heatmaps = outputs.get("layer_keypoints", xy[None]), outputs.get("layer_keypoint_heatmaps")
        l1 = heat = zero
        for n, weight in enumerate(layer_weights(len(layers), w.aux)):
            l1 = l1 + weight * keypoint_l1_loss(matched_predictions(layers[n], matches), tgt)
            if heatmaps is not None:
                heat = heat + weight * heatmap_keypoint_loss(matched_predictions(heatmaps[n], matches), tgt)
        return {
            "loss_keypoint_l1": w.keypoint_l1 * l1 + zero,
            "loss_keypoint_visibility": w.keypoint_visibility * keypoint_visibility_loss(
                matched_predictions(vis, matches), tgt) + zero,
            "loss_keypoint_heatmap": w.keypoint_heatmap * heat + zero,
        }

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        xy = outputs["keypoints"].detach().float().cpu().numpy()
        vis = outputs["visibility_logits"].detach().float().sigmoid().cpu().numpy()
        # [17, 3]: x, y normalised, probability that the keypoint is labelled
        return per_image(routed, lambda b, l: {"keypoints": np.concatenate([xy[b, l], vis[b, l, :, None]], -1)})

    def encode_target(self, target: RefTarget, frame: TargetFrame) -> np.ndarray:
        """[M, 17, 3] x, y pixels, v -> [M, 17, 3] x, y in [0, 1] of the model frame, v."""
        if target.keypoints is None:
            raise InputError(f"sample {frame.sample.id}: a keypoint block's RefTarget has no keypoints")
        xy = frame.letterbox.points_to_model(target.keypoints[..., :2]) / frame.size
        return np.concatenate([xy, target.keypoints[..., 2:3]], -1)

    def fill_object(self, obj: ReferredObject, output: dict[str, Any], letterbox: Letterbox) -> None:
        keypoints = np.asarray(output["keypoints"], np.float64)
        xy = letterbox.points_to_image(keypoints[:, :2] * letterbox.size)
        obj.keypoints = np.concatenate([xy, keypoints[:, 2:3]], -1).astype(np.float32)
