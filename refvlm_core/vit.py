"""The CLIP vision transformer of the small presets, in plain torch.

open_clip's ``VisionTransformer`` for a plain tower config (width, layers, head_width,
patch_size, image_size, mlp_ratio): the same modules, parameter names and shapes, so
its checkpoints (and ours) load into either, and the same construction order, so a
seeded build draws the same initial weights. Importing open_clip costs a second or more
of start-up (it pulls torchvision, timm and parts of transformers), which a node pays on
every configure; a config with any other open_clip field is still built by open_clip.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

REQUIRED = frozenset({"width", "layers", "patch_size", "image_size"})
PLAIN_FIELDS = REQUIRED | {"head_width", "mlp_ratio"}


def is_plain(vision_cfg: dict) -> bool:
    """True when this module builds the tower exactly as open_clip would."""
    return REQUIRED <= set(vision_cfg) <= PLAIN_FIELDS


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = nn.Identity()
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))
        self.ls_2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, width] -> [B, N, width]."""
        q = self.ln_1(x)
        x = x + self.ls_1(self.attn(q, q, q, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """Patch embedding, CLS token, learned positions, pre-norm transformer blocks.
    ``ln_post`` and ``proj`` (the CLIP head) exist for checkpoint compatibility only: the
    encoder reads patch tokens after a chosen block."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, head_width: int = 64,
                 mlp_ratio: float = 4.0, output_dim: int | None = None):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim or width))

    def _embeds(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> [B, 1 + G*G, width] (CLS first), normalised by ln_pre."""
        x = self.conv1(images).flatten(2).transpose(1, 2)                  # [B, G*G, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)


def build(vision_cfg: dict) -> VisionTransformer:
    cfg = dict(vision_cfg)
    return VisionTransformer(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["width"],
                             layers=cfg["layers"], head_width=cfg.get("head_width", 64),
                             mlp_ratio=cfg.get("mlp_ratio", 4.0), output_dim=cfg["width"])
