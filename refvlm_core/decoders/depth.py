"""Depth decoder: dense metric depth for the image, conditioned on the <REF>.

An FPN pixel decoder builds a feature map; each REF embedding modulates it (FiLM:
scale and shift per channel) before a small convolutional head with a softplus, so every
ref gets its own positive depth map [h, w] in metres. "Depth of the referred region" is
that map restricted to the region's mask, done by the caller.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refvlm_core.decoders.base import UnitDecoder, per_image, register_decoder
from refvlm_core.decoders.layers import PixelDecoder
from refvlm_core.losses import connected_zero, silog_loss
from refvlm_core.errors import InputError
from refvlm_core.geometry import Letterbox
from refvlm_core.results import ReferredObject
from refvlm_core.router import RoutedRefs
from refvlm_core.sample import RefTarget
from refvlm_core.targets import TargetFrame, UnitTargets


@register_decoder("depth")
class DepthDecoder(UnitDecoder):
    instance_targets = False  # the image's depth map supervises every depth <REF> of it

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int = 64,
                 min_depth: float = 1e-3, init_depth: float = 2.0, **kwargs: Any) -> None:
        super().__init__(llm_dim, pyramid_channels, **kwargs)
        self.min_depth = float(min_depth)
        self.pixel_decoder = PixelDecoder(pyramid_channels, hidden_dim, hidden_dim)
        self.film = nn.Sequential(nn.LayerNorm(llm_dim), nn.Linear(llm_dim, 2 * hidden_dim))
        nn.init.normal_(self.film[1].weight, std=0.02)  # start near the identity modulation (not at it: the
        # embeddings must get a gradient from the first step)
        nn.init.zeros_(self.film[1].bias)
        self.head = nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(hidden_dim, 1, 1))
        nn.init.constant_(self.head[-1].bias, math.log(math.expm1(init_depth)))  # softplus(bias) = init_depth

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        features = self.pixel_decoder(pyramid)                              # [B, C, h, w]
        scale, shift = self.film(ref_embeddings).chunk(2, dim=-1)           # [B, L, C] each
        x = features[:, None] * (1 + scale[..., None, None]) + shift[..., None, None]  # [B, L, C, h, w]
        raw = self.head(x.flatten(0, 1)).unflatten(0, x.shape[:2])[:, :, 0]            # [B, L, h, w]
        return {"depth": F.softplus(raw) + self.min_depth}                  # metres, > 0

    def loss(self, outputs: dict[str, Tensor], routed: RoutedRefs, targets: list[UnitTargets]) -> dict[str, Tensor]:
        maps = self.check_targets(routed, targets)
        zero = connected_zero(outputs)
        pred = outputs["depth"]  # [B, L, h, w]
        losses = []
        for b, target in enumerate(maps):  # a depth map per image: every depth ref of the image is supervised
            slots = routed.valid[b].nonzero().flatten()
            if target is None or slots.numel() == 0:
                continue
            target = target.to(pred)
            refs = F.interpolate(pred[b, slots][:, None], size=target.shape[-2:], mode="bilinear",
                                 align_corners=False)[:, 0]  # [k, H, W]
            losses.append(silog_loss(refs, target, self.weights.silog_lambda))
        if not losses:
            return {"loss_depth_silog": zero}
        return {"loss_depth_silog": self.weights.depth_silog * torch.stack(losses).mean() + zero}

    def postprocess(self, outputs: dict[str, Tensor], routed: RoutedRefs) -> list[list[dict[str, Any]]]:
        depth = outputs["depth"].detach().float().cpu().numpy()
        return per_image(routed, lambda b, l: {"depth": depth[b, l]})

    def encode_target(self, target: RefTarget, frame: TargetFrame) -> None:
        if frame.sample.depth is None:
            raise InputError(f"sample {frame.sample.id}: a depth block but Sample.depth is None")
        return None  # the map is per image (collate_targets)

    def collate_targets(self, parts: list[np.ndarray], group_ids: Tensor, frame: TargetFrame) -> UnitTargets:
        """The sample's depth map [h, w] at the dense size, NaN where any pixel under it is unknown."""
        if not len(group_ids) or frame.sample.depth is None:
            return UnitTargets(group_ids=group_ids)
        depth = frame.letterbox.image_to_model(frame.sample.depth.astype(np.float32), np.nan)
        depth = torch.from_numpy(np.ascontiguousarray(depth)).float()[None, None]
        return UnitTargets(group_ids=group_ids, value=F.adaptive_avg_pool2d(depth, frame.dense_size)[0, 0])

    def fill_object(self, obj: ReferredObject, output: dict[str, Any], letterbox: Letterbox) -> None:
        obj.depth = letterbox.dense_to_image(output["depth"].astype(np.float32))
