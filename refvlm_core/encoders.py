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

Shape and colour in separate pathways (``vision.pyramid_input: luminance`` and
``vision.colour_channels``): a ConvNeXt that sees colour learns, on scenes where each
colour never meets some shape, to read shape from colour, and fails on exactly those
pairs (docs/model_probes.md). Given luminance only, it must read shape from form; colour
comes from a per-pixel pathway (1x1 convolutions: it cannot see form), appended to every
pyramid level.

Objects, class-agnostic (``vision.object_maps``): a head over the ConvNeXt levels gives, at
each cell of the finest level, the logit that an object's centre is there and the log
distances from the cell to that object's box edges. Stage 0 learns them from every object
of every scene; appended to level 0, they are the proposals a decoder chooses among.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refvlm_core import convnext, torchvision_compat, vit
from refvlm_core.config import VisionConfig
from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_core.features import ImageFeatures
from refvlm_core.load_timing import phase

log = logging.getLogger(__name__)
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


def load_tower_weights(tower: nn.Module, path: str, prefixes: tuple[str, ...], optional: bool = False) -> None:
    """Load a local checkpoint into a tower; keys may carry an open_clip prefix (``visual.``)
    or a model folder's (``encoder.convnext.``). ``optional``: a file without any key of
    ``prefixes`` leaves the part as initialised, with a warning (a ConvNeXt file of towers
    that had no colour pathway, fine-tuned into ones that have one)."""
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
    else:
        if optional:
            log.warning("%s holds no %s weights (keys %s...): that part starts as initialised",
                        file, type(tower).__name__, "/".join(prefixes))
            return
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(f"{file} lacks {len(missing)} tower weights (e.g. {missing[:3]}): "
                              "is it a checkpoint of the configured tower?")


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


class ColourPathway(nn.Module):
    """Per-pixel colour features: 1x1 convolutions on the image averaged over 4x4 cells,
    average-pooled to each pyramid level. No spatial kernel, so no shape."""

    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.GELU(), nn.Conv2d(hidden, hidden, 1), nn.GELU(),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, normalised: torch.Tensor, strides: list[int]) -> list[torch.Tensor]:
        """[B, 3, S, S] -> per level [B, channels, S / stride, S / stride]."""
        cells = self.net(F.avg_pool2d(normalised, 4))                 # stride 4
        return [F.avg_pool2d(cells, stride // 4) if stride > 4 else cells for stride in strides]


OBJECT_MAP_CHANNELS = 5  # centre logit; log distances (fractions of the frame) to the left, top, right, bottom edges


@dataclass(frozen=True)
class PyramidLayout:
    """Where things are in a pyramid level's channels: the ConvNeXt's first, then the colour
    pathway's, then (level 0 only) the object maps."""

    form: tuple[int, ...]     # ConvNeXt channels per level
    colour: int = 0
    maps: int = 0

    @property
    def channels(self) -> list[int]:
        return [c + self.colour + (self.maps if i == 0 else 0) for i, c in enumerate(self.form)]

    def split(self, levels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Levels -> (form levels, colour levels (empty without a pathway), object maps or None)."""
        form = [level[:, :c] for level, c in zip(levels, self.form)]
        colour = [level[:, c:c + self.colour] for level, c in zip(levels, self.form)] if self.colour else []
        maps = levels[0][:, self.form[0] + self.colour:] if self.maps else None
        return form, colour, maps


class ObjectMaps(nn.Module):
    """[B, 5, h0, w0] object maps from the ConvNeXt levels: an FPN, then a 1x1 head."""

    def __init__(self, form_channels: list[int], dim: int = 64) -> None:
        super().__init__()
        from refvlm_core.decoders.layers import PixelDecoder

        self.fpn = PixelDecoder(form_channels, dim, dim)
        self.head = nn.Conv2d(dim, OBJECT_MAP_CHANNELS, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.head(F.relu(self.fpn(levels)))


class DualImageEncoder(nn.Module):
    """CLIP-ViT + CLIP-ConvNeXt. ``forward(images [B,3,S,S] in [0,1]) -> ImageFeatures``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        with phase("vision_towers"):
            self.vit = build_vit(cfg)
            self.convnext = build_convnext(cfg)
            if cfg.vit_weights:
                load_tower_weights(self.vit, cfg.vit_weights, ("visual.", "vit.", "encoder.vit."))
            self.colour = ColourPathway(cfg.colour_channels) if cfg.colour_channels else None
            self.object_maps = ObjectMaps(self.form_channels) if cfg.object_maps else None
            if cfg.convnext_weights:
                load_tower_weights(self.convnext, cfg.convnext_weights,
                                   ("visual.trunk.", "trunk.", "convnext.", "encoder.convnext."))
                for prefixes, part in ((("colour_pathway.", "encoder.colour."), self.colour),
                                       (("object_maps.", "encoder.object_maps."), self.object_maps)):
                    if part is not None:
                        load_tower_weights(part, cfg.convnext_weights, prefixes, optional=True)
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
    def layout(self) -> PyramidLayout:
        return PyramidLayout(tuple(self.form_channels), self.cfg.colour_channels,
                             OBJECT_MAP_CHANNELS if self.cfg.object_maps else 0)

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of each level: the ConvNeXt's, the colour pathway's, then (level 0) the object maps."""
        return self.layout.channels

    @property
    def form_channels(self) -> list[int]:
        """The ConvNeXt's channels of each level (the first ones of a pyramid level)."""
        return [int(self.convnext.feature_info[s]["num_chs"]) for s in self.cfg.convnext_stages]

    @property
    def pyramid_strides(self) -> list[int]:
        return [2 ** (s + 2) for s in self.cfg.convnext_stages]

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

    def pyramid_input(self, images: torch.Tensor, normalised: torch.Tensor) -> torch.Tensor:
        """What the ConvNeXt sees: the normalised image, or its luminance normalised alike
        (mean and std of the channels) in all three channels (the stem keeps its shape)."""
        if self.cfg.pyramid_input == "rgb":
            return normalised
        luma = images.new_tensor(LUMA).view(1, 3, 1, 1)
        y = (images * luma).sum(dim=1, keepdim=True)
        y = (y - float((self.mean * luma).sum())) / float(self.std.mean())
        return y.expand(-1, 3, -1, -1)

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, S, S] in [0, 1] -> the pyramid levels, laid out as ``self.layout``."""
        normalised = (images - self.mean) / self.std
        form = self.convnext_pyramid(self.pyramid_input(images, normalised))
        levels = list(form)
        if self.colour is not None:
            colours = self.colour(normalised, self.pyramid_strides)
            levels = [torch.cat([level, colour], dim=1) for level, colour in zip(levels, colours)]
        if self.object_maps is not None:
            levels[0] = torch.cat([levels[0], self.object_maps(form)], dim=1)
        return levels

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        """images: [B, 3, S, S] float in [0, 1] (model frame). Frozen towers build no graph."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            normalised = (images - self.mean) / self.std
            return ImageFeatures(patch_tokens=self.vit_tokens(normalised), pyramid=self.pyramid(images))
