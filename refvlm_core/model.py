"""RefVLM: dual encoder -> projector -> LLM -> router -> visual-unit decoders.

Image tokens are the ViT tokens through the projector. Region features (one per
``<region>``) come from mask-guided aggregation over the same ViT token map, so they
have the ViT width and share the projector, as in the paper. The decoders read the
ConvNeXt pyramid. ``forward(batch)`` returns every loss; generation is in predictor.py.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refvlm_core.aggregation import mask_guided_aggregation, tokens_to_map
from refvlm_core.config import ModelConfig
from refvlm_core.decoders import build_decoder
from refvlm_core.encoders import DualImageEncoder
from refvlm_core.errors import InputError
from refvlm_core.features import ImageFeatures
from refvlm_core.llm import RefLLM
from refvlm_core.losses import LossWeights
from refvlm_core.processor import Processor
from refvlm_core.projector import Projector
from refvlm_core.router import RoutedRefs, route, routing_problems


class RefVLM(nn.Module):
    def __init__(self, config: ModelConfig, encoder: DualImageEncoder, llm: RefLLM):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.llm = llm
        self.projector = Projector(encoder.vit_width, llm.hidden_size, config.projector.hidden_size)
        self.decoders = nn.ModuleDict({
            unit: build_decoder(unit, llm.hidden_size, encoder.pyramid_channels,
                                loss_weights=config.loss_weights, match_costs=config.match_costs, **kwargs)
            for unit, kwargs in config.decoders.items()})
        self.loss_weights = LossWeights.coerce(config.loss_weights)
        self.processor = (Processor(config, llm.tokenizer, self.num_image_tokens, self.decoders)
                          if llm.tokenizer is not None else None)

    @classmethod
    def from_config(cls, config: ModelConfig, inference: bool = False) -> "RefVLM":
        """Build every part; on the meta device (``with torch.device('meta')``) nothing is loaded.
        ``inference``: for answering only (RefLLM.from_config)."""
        config.validate()
        if torch.empty(0).device.type != "meta":
            config.check_paths()
        return cls(config, DualImageEncoder(config.vision), RefLLM.from_config(config, inference))

    # ---- features ---------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> ImageFeatures:
        """[B, 3, S, S] in [0, 1] -> frozen features."""
        return self.encoder(images)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the LLM sees: the ViT grid after ``config.llm_image_pool``."""
        return (self.encoder.vit_grid // self.config.llm_image_pool) ** 2

    def image_tokens(self, features: ImageFeatures, projector: Any = None) -> torch.Tensor:
        """-> [B, Ni, D] projected image tokens (the ViT grid average-pooled by llm_image_pool).
        ``projector``: another runtime's projector ([B, N, Dv] -> [B, N, D]); None: the module."""
        tokens = features.patch_tokens                                        # [B, G*G, Dv]
        pool = self.config.llm_image_pool
        if pool > 1:
            pooled = F.avg_pool2d(tokens_to_map(tokens), pool)                # [B, Dv, G/p, G/p]
            tokens = pooled.flatten(2).transpose(1, 2)
        return (self.projector if projector is None else projector)(tokens)

    def region_tokens(self, features: ImageFeatures, region_masks: torch.Tensor,
                      region_counts: list[int], projector: Any = None) -> torch.Tensor:
        """region_masks [R, S, S] (images' prompts concatenated) -> [R, D] projected features."""
        if sum(region_counts) != region_masks.shape[0]:
            raise InputError(f"region_counts {region_counts} do not add up to {region_masks.shape[0]} masks")
        if region_masks.shape[0] == 0:
            return features.patch_tokens.new_zeros(0, self.llm.hidden_size)
        token_map = tokens_to_map(features.patch_tokens)                     # [B, Dv, G, G]
        agg = self.config.aggregation
        pooled = []
        for b, masks in enumerate(torch.split(region_masks, region_counts)):
            if len(masks):
                pooled.append(mask_guided_aggregation(token_map[b:b + 1], masks[None], agg.grid,
                                                      agg.temperature, agg.alpha)[0])  # [R_b, Dv]
        pooled = torch.cat(pooled)                                            # [R, Dv]
        return self.projector(pooled) if projector is None else projector(pooled[None])[0]

    # ---- decoders ---------------------------------------------------------------------
    def route_refs(self, ref_embeddings: list[torch.Tensor], ref_units: list[list[tuple[str, ...]]],
                   ref_groups: list[list[int]]) -> dict[str, RoutedRefs]:
        # training pads each unit's group to its longest (the decoders' outputs for valid refs do
        # not depend on the padding) and warns of dropped <REF>s; inference keeps the fixed L of
        # the export contract and leaves reporting to the caller (Result.errors)
        units, length = tuple(self.decoders), self.config.router_length
        if self.training:
            for problem in routing_problems(ref_units, units, length):
                warnings.warn(problem, stacklevel=2)
        return route(ref_embeddings, ref_units, ref_groups, units, length, pad_to_longest=self.training)

    def run_decoders(self, routed: dict[str, RoutedRefs], pyramid: list[torch.Tensor]
                     ) -> dict[str, dict[str, torch.Tensor]]:
        """Runs the decoder of each unit in ``routed`` (inference routes only the units an answer names)."""
        return {unit: decoder(routed[unit].embeddings, routed[unit].valid, pyramid)
                for unit, decoder in self.decoders.items() if unit in routed}

    # ---- training ---------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], features: ImageFeatures | None = None,
                ref_embeddings: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Batch from ``Processor.collate`` -> {"loss": total, "loss_lm": ..., decoder losses}.

        ``features`` / ``ref_embeddings``: outputs of frozen parts computed earlier (a
        training cache); given ``ref_embeddings`` the LLM does not run and there is no LM loss.
        """
        features = features if features is not None else self.encode_images(batch["images"])
        losses = {}
        if ref_embeddings is None:
            hidden = self.llm_hidden_states(batch, features)                     # [B, T, D]
            losses["loss_lm"] = self.loss_weights.lm * self.llm.lm_loss(hidden, batch["labels"])
            ref_embeddings = self.teacher_forced_refs(batch, hidden)
        routed = self.route_refs(ref_embeddings, batch["ref_units"], batch["ref_groups"])
        outputs = self.run_decoders(routed, features.pyramid)
        for unit, decoder in self.decoders.items():
            losses.update(decoder.loss(outputs[unit], routed[unit], batch["targets"][unit]))
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def llm_hidden_states(self, batch: dict[str, Any], features: ImageFeatures) -> torch.Tensor:
        """Teacher-forced last hidden states [B, T, D] of a collated batch."""
        embeds = self.llm.embed_multimodal(
            batch["input_ids"], self.image_tokens(features),
            self.region_tokens(features, batch["region_masks"], batch["region_counts"]))
        return self.llm.hidden_states(embeds, batch["attention_mask"])

    def teacher_forced_refs(self, batch: dict[str, Any], hidden: torch.Tensor) -> list[torch.Tensor]:
        """Per image [n_b, D]: the hidden state at each <REF> token, in ordinal order."""
        refs = []
        for b, units in enumerate(batch["ref_units"]):
            positions = (batch["input_ids"][b] == self.llm.ref_id).nonzero().flatten()
            if len(positions) != len(units):
                raise InputError(f"image {b}: {len(positions)} <REF> tokens but {len(units)} REF targets")
            refs.append(hidden[b, positions])
        return refs


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
