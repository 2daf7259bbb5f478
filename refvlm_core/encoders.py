"""Dual image encoder: CLIP-ViT tokens from a chosen layer + CLIP-ConvNeXt pyramid.

Both towers are built by open_clip (``pretrained=None``: never downloads) or, for the
small presets, from tower configs given in code: then both are built in plain torch (the
ViT by vit.py, the ConvNeXt by convnext.py, with the module names and seeded weights of
open_clip and timm), and neither open_clip nor timm is imported. Weights come from local
files named in the config. They start frozen (``requires_grad=False``, eval mode, no
autograd graph), as in the paper where the CLIP towers never train.
``set_trainable(True)`` unfreezes them (stage 0 pretraining, or a run that fine-tunes
them): then they follow ``train()`` / ``eval()`` and their forward builds a graph, so an
optimizer step moves their weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refvlm_core import convnext, torchvision_compat, vit
from refvlm_core.config import VisionConfig
from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_core.features import ImageFeatures
from refvlm_core.load_timing import phase

torchvision_compat.install_import_hook()  # open_clip/timm import torchvision


def build_vit(cfg: VisionConfig) -> nn.Module:
    """The ViT of ``cfg.vit_custom`` (plain fields: refvlm_core.vit, no open_clip import) or
    open_clip's VisionTransformer of a named config."""
    if cfg.vit_custom is not None and vit.is_plain(cfg.vit_custom):
        return vit.build(cfg.vit_custom)
    with phase("import_open_clip"):
        from open_clip.model import _build_vision_tower

    vision_cfg = cfg.vit_custom or _open_clip_vision_cfg(cfg.vit_model)
    if vision_cfg.get("timm_model_name"):
        raise ConfigError(f"vision.vit_model={cfg.vit_model!r} is not a ViT: pick an open_clip ViT config")
    return _build_vision_tower(embed_dim=vision_cfg.get("width", 64), vision_cfg=dict(vision_cfg))


def build_convnext(cfg: VisionConfig) -> nn.Module:
    """A ConvNeXt trunk (stem + 4 stages) of ``cfg.convnext_custom`` (plain fields:
    refvlm_core.convnext, no timm import; other timm kwargs: timm's ConvNeXt) or of
    open_clip's config."""
    if cfg.convnext_custom is not None and convnext.is_plain(cfg.convnext_custom):
        return convnext.build(cfg.convnext_custom)
    if cfg.convnext_custom is not None:
        with phase("import_timm"):
            from timm.models.convnext import ConvNeXt

        kwargs = {"num_classes": 0, **cfg.convnext_custom}
        return ConvNeXt(**kwargs)
    from open_clip.model import _build_vision_tower

    vision_cfg = dict(_open_clip_vision_cfg(cfg.convnext_model))
    if "convnext" not in str(vision_cfg.get("timm_model_name", "")):
        raise ConfigError(f"vision.convnext_model={cfg.convnext_model!r} is not a ConvNeXt config")
    vision_cfg["image_size"] = cfg.image_size
    return _build_vision_tower(embed_dim=768, vision_cfg=vision_cfg).trunk


def _open_clip_vision_cfg(name: str) -> dict:
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ConfigError(f"open_clip has no model config {name!r}: see open_clip.list_models()")
    return dict(model_cfg["vision_cfg"])


def load_tower_weights(tower: nn.Module, path: str, prefixes: tuple[str, ...]) -> None:
    """Load a local checkpoint into a tower; keys may carry an open_clip prefix (``visual.``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"vision weights {file} do not exist: fix the path in the config")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except Exception as error:  # corrupt file: say which and what to do
        raise CheckpointError(f"cannot read {file} ({error}): re-export the tower weights") from error
    for prefix in prefixes:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped:
            state = stripped
            break
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(f"{file} lacks {len(missing)} tower weights (e.g. {missing[:3]}): "
                              "is it a checkpoint of the configured tower?")


class DualImageEncoder(nn.Module):
    """CLIP-ViT + CLIP-ConvNeXt. ``forward(images [B,3,S,S] in [0,1]) -> ImageFeatures``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        with phase("vision_towers"):
            self.vit = build_vit(cfg)
            self.convnext = build_convnext(cfg)
            if cfg.vit_weights:
                load_tower_weights(self.vit, cfg.vit_weights, ("visual.", "vit."))
            if cfg.convnext_weights:
                load_tower_weights(self.convnext, cfg.convnext_weights,
                                   ("visual.trunk.", "trunk.", "convnext."))
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        num_blocks = len(self.vit.transformer.resblocks)
        self.vit_blocks = cfg.vit_layer % num_blocks + 1  # blocks to run: layer -2 of 24 -> 23
        if not -num_blocks <= cfg.vit_layer < num_blocks:
            raise ConfigError(f"vision.vit_layer={cfg.vit_layer} outside a {num_blocks}-block ViT")
        self.set_trainable(False)

    @property
    def trainable(self) -> bool:
        """True when any tower weight takes a gradient (set_trainable or requires_grad_)."""
        return any(p.requires_grad for p in self.parameters())

    def set_trainable(self, trainable: bool) -> "DualImageEncoder":
        self.requires_grad_(trainable)
        return self.train(trainable and self.training)

    def train(self, mode: bool = True) -> "DualImageEncoder":
        # frozen towers stay in eval mode (dropout off) even when the whole model trains
        return super().train(mode and self.trainable)

    @property
    def vit_width(self) -> int:
        return int(self.vit.transformer.width)

    @property
    def vit_grid(self) -> int:
        return int(self.vit.grid_size[0])

    @property
    def num_image_tokens(self) -> int:
        return self.vit_grid ** 2

    @property
    def pyramid_channels(self) -> list[int]:
        return [int(self.convnext.feature_info[s]["num_chs"]) for s in self.cfg.convnext_stages]

    def vit_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised -> [B, G*G, Dv] patch tokens after the configured block."""
        size = self.vit.image_size[0] if isinstance(self.vit.image_size, tuple) else self.vit.image_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        x = self.vit._embeds(images)                              # [B, 1+G*G, Dv]
        for block in self.vit.transformer.resblocks[: self.vit_blocks]:
            x = block(x)
        return x[:, 1:]                                           # drop CLS, as LLaVA does

    def convnext_pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, S, S] normalised -> configured stages, each [B, C_i, S/2^(i+2), ...]."""
        x = self.convnext.stem(images)
        levels = []
        for index, stage in enumerate(self.convnext.stages[: max(self.cfg.convnext_stages) + 1]):
            x = stage(x)
            if index in self.cfg.convnext_stages:
                levels.append(x)
        return levels

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        """images: [B, 3, S, S] float in [0, 1] (model frame). Frozen towers build no graph."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            normalised = (images - self.mean) / self.std
            return ImageFeatures(patch_tokens=self.vit_tokens(normalised),
                                 pyramid=self.convnext_pyramid(normalised))
