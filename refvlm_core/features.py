"""Image features handed from the dual image encoder to everything downstream."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    patch_tokens: torch.Tensor         # [B, Ng, Dv]  CLIP-ViT patch tokens (chosen layer, no CLS), before the projector
    pyramid: list[torch.Tensor]        # ConvNeXt stages, each [B, C_i, H_i, W_i], highest resolution first

    @property
    def pyramid_channels(self) -> list[int]:
        return [level.shape[1] for level in self.pyramid]
