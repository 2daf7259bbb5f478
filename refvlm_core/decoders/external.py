"""External decoders: kinds of the box and mask units built on transformers' modules.

- mask, kind ``sam``: transformers' ``SamMaskDecoder`` (two-way transformer + upscaling).
  Each <REF> embedding becomes one sparse prompt token; the image embedding is one
  pyramid level projected to SAM's width.
- box, kind ``grounding_dino``: transformers' ``GroundingDinoDecoderLayer`` stack
  (deformable cross-attention over the multi-scale pyramid, "text" cross-attention over
  all <REF> embeddings). Each <REF> embedding is one query; its reference point comes
  from the query itself.

A model picks one with ``ModelConfig.decoders[unit]["kind"]`` (training stage 3 swaps it
in, refvlm_training.engine.stage3), so a saved model builds it again on load. Sizes come
from the config; ``weights`` (a local safetensors file) initialises it when a model is
first built. They subclass the built-in decoders: targets, matching, losses,
postprocessing and results stay the same. transformers is imported only when one is built.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from refvlm_core.decoders.base import UnitDecoder, register_decoder
from refvlm_core.decoders.box import BoxDecoder
from refvlm_core.decoders.mask import MaskDecoder
from refvlm_core.errors import CheckpointError, ConfigError


def _transformers_module(name: str):
    import refvlm_core.torchvision_compat as compat

    compat.install_import_hook()  # transformers' vision models import torchvision
    import importlib

    return importlib.import_module(name)


def _load_weights(module: nn.Module, path: str | None, prefixes: Sequence[str]) -> None:
    """Tensors of a local safetensors file (e.g. a full SAM checkpoint) whose names start with
    one of ``prefixes``, with the prefix stripped, into ``module``."""
    if path is None:
        return
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"external decoder weights {path} do not exist: give a local safetensors file")
    tensors = load_file(path)
    picked = {}
    for name, tensor in tensors.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                picked[name[len(prefix):]] = tensor
                break
    missing, unexpected = module.load_state_dict(picked, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the external decoder: {len(missing)} missing "
                              f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                              "match its config sizes to the checkpoint")


@register_decoder("mask", kind="sam")
class SamMaskAdapter(MaskDecoder):
    """<REF> embeddings as SAM prompts -> mask logits [B, L, 4h, 4w] of one pyramid level (h, w)."""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_size: int = 256,
                 num_hidden_layers: int = 2, num_attention_heads: int = 8, mlp_dim: int = 2048,
                 level: int = -1, weights: str | None = None, **kwargs: Any) -> None:
        UnitDecoder.__init__(self, llm_dim, pyramid_channels, **kwargs)
        sam = _transformers_module("transformers.models.sam.modeling_sam")
        config = sam.SamMaskDecoderConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                          num_attention_heads=num_attention_heads, mlp_dim=mlp_dim,
                                          iou_head_hidden_dim=hidden_size)
        self.sam = sam.SamMaskDecoder(config)
        self.positional = sam.SamPositionalEmbedding(types.SimpleNamespace(scale=hidden_size // 2,
                                                                           num_pos_feats=hidden_size // 2))
        self.level = level
        self.image_proj = nn.Conv2d(self.pyramid_channels[level], hidden_size, 1)
        self.prompt_proj = nn.Linear(llm_dim, hidden_size)
        self.no_mask = nn.Parameter(torch.zeros(hidden_size))   # SAM's "no dense prompt" embedding
        _load_weights(self.sam, weights, ("mask_decoder.", ""))

    def _grid_positions(self, height: int, width: int, like: Tensor) -> Tensor:
        """[1, C, h, w] SAM random-Fourier positions of the pixel centres."""
        ys = (torch.arange(height, device=like.device, dtype=like.dtype) + 0.5) / height
        xs = (torch.arange(width, device=like.device, dtype=like.dtype) + 0.5) / width
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)       # [h, w, 2] (x, y)
        return self.positional(grid[None])[0].permute(2, 0, 1)[None]

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        image = self.image_proj(pyramid[self.level])                            # [B, C, h, w]
        b, _, h, w = image.shape
        prompts = self.prompt_proj(ref_embeddings)[:, :, None, :]                # [B, L, 1, C]
        dense = self.no_mask[None, :, None, None].expand(b, -1, h, w)
        positions = self._grid_positions(h, w, image).expand(b, -1, -1, -1)
        masks = self.sam(image_embeddings=image, image_positional_embeddings=positions,
                         sparse_prompt_embeddings=prompts, dense_prompt_embeddings=dense,
                         multimask_output=False)[0]                             # [B, L, 1, 4h, 4w]
        return {"mask_logits": masks[:, :, 0]}


@register_decoder("box", kind="grounding_dino")
class GroundingDinoBoxAdapter(BoxDecoder):
    """<REF> embeddings as Grounding-DINO decoder queries -> boxes [B, L, 4] and scores [B, L]."""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], d_model: int = 256,
                 num_layers: int = 2, num_heads: int = 8, ffn_dim: int = 1024, num_points: int = 4,
                 weights: str | None = None, **kwargs: Any) -> None:
        UnitDecoder.__init__(self, llm_dim, pyramid_channels, **kwargs)
        gd = _transformers_module("transformers.models.grounding_dino.modeling_grounding_dino")
        config = gd.GroundingDinoConfig(d_model=d_model, decoder_attention_heads=num_heads,
                                        decoder_ffn_dim=ffn_dim, decoder_n_points=num_points,
                                        num_feature_levels=len(self.pyramid_channels), dropout=0.0,
                                        attention_dropout=0.0, activation_dropout=0.0)
        self.num_heads = num_heads
        self.layers = nn.ModuleList(gd.GroundingDinoDecoderLayer(config) for _ in range(num_layers))
        self.level_proj = nn.ModuleList(nn.Conv2d(c, d_model, 1) for c in self.pyramid_channels)
        self.level_embed = nn.Parameter(torch.zeros(len(self.pyramid_channels), d_model))
        self.query_proj = nn.Linear(llm_dim, d_model)
        self.text_proj = nn.Linear(llm_dim, d_model)
        self.reference = nn.Linear(d_model, 2)
        self.box_head = gd.GroundingDinoMLPPredictionHead(d_model, d_model, 4, 3)
        self.score_head = nn.Linear(d_model, 1)
        _load_weights(self.layers, weights, ("model.decoder.layers.", "decoder.layers.", ""))

    def _memory(self, pyramid: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened levels [B, sum(hw), d], their shapes [n, 2] and start offsets [n]."""
        flat, shapes = [], []
        for i, (proj, level) in enumerate(zip(self.level_proj, pyramid)):
            x = proj(level)                                                     # [B, d, h, w]
            shapes.append(x.shape[-2:])
            flat.append(x.flatten(2).transpose(1, 2) + self.level_embed[i])
        spatial = torch.tensor([list(s) for s in shapes], dtype=torch.long, device=flat[0].device)
        starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
        return torch.cat(flat, 1), spatial, starts

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        memory, spatial, starts = self._memory(pyramid)
        queries = self.query_proj(ref_embeddings)                                # [B, L, d]
        text = self.text_proj(ref_embeddings)                                    # [B, L, d]
        # Padded <REF>s are masked out of the text cross-attention by a float additive mask;
        # a fully padded image keeps one slot visible so attention stays finite.
        text_valid = ref_valid.clone()
        text_valid[:, 0] |= ~ref_valid.any(dim=1)
        blocked = (~text_valid)[:, None, None, :].to(text.dtype) * torch.finfo(text.dtype).min
        text_mask = blocked.expand(-1, self.num_heads, queries.shape[1], -1)     # [B, heads, L, L] additive
        points = self.reference(queries).sigmoid()                               # [B, L, 2]
        levels = len(self.pyramid_channels)
        for layer in self.layers:
            queries = layer(queries, position_embeddings=None,
                            reference_points=points[:, :, None].expand(-1, -1, levels, -1),
                            spatial_shapes=spatial, spatial_shapes_list=[tuple(s) for s in spatial.tolist()],
                            level_start_index=starts, vision_encoder_hidden_states=memory,
                            vision_encoder_attention_mask=None, text_encoder_hidden_states=text,
                            text_encoder_attention_mask=text_mask, self_attn_mask=None)[0]
        return {"boxes": self.box_head(queries).sigmoid(), "scores": self.score_head(queries).squeeze(-1)}
