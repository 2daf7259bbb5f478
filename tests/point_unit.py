"""A toy visual unit, the way a plug-in adds one: this file and a registration, nothing else.

``point``: one (x, y) point per <REF> (the centre of the referred object), regressed from
the REF embedding. Ground truth comes from the block's boxes (or masks); the result goes to
``ReferredObject.outputs["point_xy"]`` in original pixels. Its loss weight comes with it, as
its constructor's setting (``ModelConfig.decoders["point"]["l1_weight"]``), and so does its
matching cost (one L1 term: no weight to set): LossWeights and MatchCosts hold the built-in
units' terms only, and a plug-in edits neither.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from refvlm_core.decoders import UnitDecoder, register_decoder, unregister_decoder
from refvlm_core.decoders.base import per_image
from refvlm_core.decoders.box import mask_boxes
from refvlm_core.geometry import Letterbox, normalize_boxes
from refvlm_core.losses import connected_zero
from refvlm_core.matching import grouped_hungarian, matched_predictions, matched_targets, pad_groups, pad_stack
from refvlm_core.results import ReferredObject
from refvlm_core.router import RoutedRefs
from refvlm_core.sample import RefTarget
from refvlm_core.targets import TargetFrame, UnitTargets

UNIT = "point"


class PointDecoder(UnitDecoder):
    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 32,
                 l1_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(llm_dim, pyramid_channels, **kwargs)
        self.l1_weight = float(l1_weight)  # the unit's own loss weight
        self.head = torch.nn.Sequential(torch.nn.Linear(llm_dim, hidden_dim), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden_dim, 2))

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        return {"points": self.head(ref_embeddings).sigmoid()}  # [B, L, 2] x, y in [0, 1]

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        goals, zero = self.check_targets(routed, targets), connected_zero(outputs)
        if sum(t.count for t in targets) == 0 or not bool(routed.valid.any()):
            return {"loss_point": zero}
        pred = outputs["points"]
        goals = [g.to(pred) if g is not None else pred.new_zeros(0, 2) for g in goals]
        cost = torch.cdist(pred.detach(), pad_stack(goals), p=1)                      # [B, L, Mmax]
        matches = grouped_hungarian(cost, routed.group_ids, pad_groups([t.group_ids for t in targets]))
        error = (matched_predictions(pred, matches) - matched_targets(goals, matches)).abs().sum(-1)
        return {"loss_point": self.l1_weight * error.mean() + zero}

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        points = outputs["points"].detach().float().cpu().numpy()
        return per_image(routed, lambda b, l: {"point": points[b, l]})

    def encode_target(self, target: RefTarget, frame: TargetFrame) -> np.ndarray:
        boxes = target.boxes if target.boxes is not None else mask_boxes(target.masks, frame.sample.id)
        x0, y0, x1, y1 = normalize_boxes(frame.letterbox.boxes_to_model(boxes), frame.size).T
        return np.stack([(x0 + x1) / 2, (y0 + y1) / 2], -1).astype(np.float32)  # [M, 2]

    def fill_object(self, obj: ReferredObject, output: dict[str, Any], letterbox: Letterbox) -> None:
        xy = np.asarray(output["point"], np.float64)[None] * letterbox.size
        obj.outputs["point_xy"] = letterbox.points_to_image(xy)[0].astype(np.float32)


def register() -> str:
    register_decoder(UNIT)(PointDecoder)
    return UNIT


def unregister() -> None:
    unregister_decoder(UNIT)
