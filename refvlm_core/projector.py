"""The vision-language projector: a 2-layer MLP (GELU) into the LLM width, shared by the
image tokens and the region features of visual prompts (as in LLaVA-1.5)."""
from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim]"""
        return self.net(features)
