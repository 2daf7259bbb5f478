"""MaskFormer-like mask decoder on the shared dense path (layers.DenseRefDecoder): an FPN
pixel decoder builds the mask feature map, the REF queries decode against the
multi-scale memory, and each query's mask embedding dotted with the feature map gives
its mask logits. Focal + dice losses on the last layer and, weighted ``aux``, on every
earlier layer with the last layer's matching."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from refvlm_core.decoders.base import UnitDecoder, layer_weights, per_image, register_decoder
from refvlm_core.decoders.layers import MLP, DenseRefDecoder, dot_heatmap
from refvlm_core.losses import connected_zero, dice_loss, sigmoid_focal_loss
from refvlm_core.matching import grouped_hungarian, mask_cost, matched_predictions, matched_targets, pad_groups, pad_stack
from refvlm_core.errors import InputError
from refvlm_core.geometry import Letterbox
from refvlm_core.results import ReferredObject
from refvlm_core.router import RoutedRefs
from refvlm_core.sample import RefTarget
from refvlm_core.targets import TargetFrame, UnitTargets


@register_decoder("mask")
class MaskDecoder(UnitDecoder):
    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, ffn_dim: int | None = None, memory_levels: int = 3,
                 mask_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(llm_dim, pyramid_channels, **kwargs)
        mask_dim = mask_dim or hidden_dim
        self.trunk = DenseRefDecoder(llm_dim, pyramid_channels, hidden_dim, num_heads, num_layers,
                                     ffn_dim or 4 * hidden_dim, memory_levels, mask_dim, ref_norm=self.ref_norm)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        queries, pixels = self.trunk(ref_embeddings, ref_valid, pyramid)       # [N, B, L, D], [B, C, H0, W0]
        logits = dot_heatmap(self.mask_embed(queries), pixels)                 # [N, B, L, H0, W0]
        outputs = {"mask_logits": logits[-1]}
        if self.training:
            outputs["layer_mask_logits"] = logits
        return outputs

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        masks = self.check_targets(routed, targets)
        w, zero = self.weights, connected_zero(outputs)
        names = ("loss_mask_focal", "loss_mask_dice")
        if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
            return dict.fromkeys(names, zero)
        logits = outputs["mask_logits"]  # [B, L, h, w]
        size = logits.shape[-2:]
        # Targets at the prediction's resolution (soft 0..1 at edges after area-style resize).
        masks = [_resize(m.to(logits), size) if m is not None else logits.new_zeros(0, *size) for m in masks]
        flat = [m.flatten(1) for m in masks]  # per image [M_b, h*w]
        groups = [t.group_ids.to(logits.device) for t in targets]
        cost = mask_cost(logits.detach().flatten(2), pad_stack(flat), self.costs.mask_focal, self.costs.mask_dice,
                         w.focal_alpha, w.focal_gamma)
        matches = grouped_hungarian(cost, routed.group_ids, pad_groups(groups))
        tgt = matched_targets(flat, matches)
        num = max(tgt.shape[0], 1)
        layers = outputs.get("layer_mask_logits", logits[None])
        focal = dice = zero
        for n, weight in enumerate(layer_weights(len(layers), w.aux)):
            src = matched_predictions(layers[n].flatten(2), matches)
            focal = focal + weight * sigmoid_focal_loss(src, tgt, num, w.focal_alpha, w.focal_gamma)
            dice = dice + weight * dice_loss(src, tgt, num)
        return {"loss_mask_focal": w.mask_focal * focal + zero, "loss_mask_dice": w.mask_dice * dice + zero}

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        logits = outputs["mask_logits"].detach().float().cpu().numpy()
        return per_image(routed, lambda b, l: {"mask_logits": logits[b, l]})

    def encode_target(self, target: RefTarget, frame: TargetFrame) -> np.ndarray:
        """[M, H, W] bool pixels -> [M, h, w] coverage in [0, 1] at the dense size of the model frame."""
        if target.masks is None:
            raise InputError(f"sample {frame.sample.id}: a mask block's RefTarget has no masks")
        return np.stack([frame.letterbox.mask_coverage_to_model(m, frame.dense_size) for m in target.masks])

    def fill_object(self, obj: ReferredObject, output: dict[str, Any], letterbox: Letterbox) -> None:
        obj.mask = letterbox.mask_to_image(output["mask_logits"].astype(np.float32)) > 0.0


def _resize(masks: Tensor, size: torch.Size) -> Tensor:
    """[M, H, W] 0/1 -> [M, h, w] in [0, 1]."""
    if masks.shape[0] == 0:
        return masks.new_zeros(0, *size)
    if masks.shape[-2:] == size:
        return masks
    return F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)[:, 0]
