"""Building blocks shared by the visual-unit decoders: attention with float additive
masks, a DETR-style query decoder, multi-scale memory with sine + level positions, an
FPN pixel decoder and an MLP.

Everything stays ONNX-exportable with the dynamo exporter: plain tensors in and out, no
data-dependent Python control flow, shapes taken from tensors (dynamic B, L, H, W).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASKED = -1.0e4  # additive logit of a padded key: finite, so a fully padded row softmaxes to uniform, not NaN


def key_padding_bias(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """valid [B, L] bool -> [B, 1, 1, L] float: 0 for real keys, MASKED for padding."""
    return ((~valid).to(dtype) * MASKED)[:, None, None, :]


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Attention(nn.Module):
    """Multi-head attention written out (matmul + softmax) so masks stay float and export is plain."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, h, T, D/h]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None = None) -> Tensor:
        # query [B, Tq, D], key/value [B, Tk, D], bias broadcastable to [B, h, Tq, Tk]
        q, k, v = self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias
        out = logits.softmax(dim=-1) @ v  # [B, h, Tq, D/h]
        return self.out(out.transpose(1, 2).flatten(2))


class QueryDecoderLayer(nn.Module):
    """Pre-norm: self-attention among the REF queries, cross-attention to the image, FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn, self.cross_attn = Attention(dim, num_heads), Attention(dim, num_heads)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.ffn = MLP(dim, ffn_dim, dim, 2)

    def forward(self, x: Tensor, query_pos: Tensor, self_bias: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        h = self.norms[0](x)
        x = x + self.self_attn(h + query_pos, h + query_pos, h, self_bias)
        h = self.norms[1](x)
        x = x + self.cross_attn(h + query_pos, memory + memory_pos, memory)
        return x + self.ffn(self.norms[2](x))


class QueryDecoder(nn.Module):
    """A stack of QueryDecoderLayer; returns the normalised queries [B, L, D]."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, ffn_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryDecoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, query_pos: Tensor, valid: Tensor, memory: Tensor, memory_pos: Tensor,
                all_layers: bool = False) -> Tensor:
        """-> [B, L, D], or [num_layers, B, L, D] (each layer normalised: auxiliary losses) with all_layers."""
        bias = key_padding_bias(valid, queries.dtype)
        outputs = []
        for layer in self.layers:
            queries = layer(queries, query_pos, bias, memory, memory_pos)
            outputs.append(self.norm(queries))
        return torch.stack(outputs) if all_layers else outputs[-1]


def sine_position_2d(height: int, width: int, dim: int, like: Tensor, temperature: float = 10000.0) -> Tensor:
    """DETR-style 2D sine/cosine position embedding of an H x W grid -> [H*W, dim] (dim divisible by 4)."""
    quarter = dim // 4
    freq = temperature ** (torch.arange(quarter, device=like.device, dtype=like.dtype) / quarter)  # [dim/4]
    ys = (torch.arange(height, device=like.device, dtype=like.dtype) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=like.device, dtype=like.dtype) + 0.5) / width * 2 * math.pi
    y = ys[:, None] / freq  # [H, dim/4]
    x = xs[:, None] / freq  # [W, dim/4]
    y_emb = torch.cat([y.sin(), y.cos()], dim=-1)[:, None, :].expand(height, width, 2 * quarter)
    x_emb = torch.cat([x.sin(), x.cos()], dim=-1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([y_emb, x_emb], dim=-1).flatten(0, 1)


class MultiScaleMemory(nn.Module):
    """The coarsest ``num_levels`` pyramid levels projected to one width and flattened.

    Returns memory [B, S, D] and its position embedding [1, S, D] (sine + learned level),
    S = sum of H_i * W_i of the used levels.
    """

    def __init__(self, pyramid_channels: Sequence[int], dim: int, num_levels: int = 3) -> None:
        super().__init__()
        self.num_levels = min(num_levels, len(pyramid_channels))
        used = list(pyramid_channels)[-self.num_levels:]
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(_groups(dim), dim)) for c in used)
        self.level_embed = nn.Parameter(torch.randn(self.num_levels, dim) * 0.02)

    def forward(self, pyramid: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        memory, pos = [], []
        for i, (proj, level) in enumerate(zip(self.proj, list(pyramid)[-self.num_levels:])):
            x = proj(level)  # [B, D, H, W]
            memory.append(x.flatten(2).transpose(1, 2))
            pos.append(sine_position_2d(x.shape[-2], x.shape[-1], x.shape[1], x) + self.level_embed[i])
        return torch.cat(memory, dim=1), torch.cat(pos, dim=0)[None]


class PixelDecoder(nn.Module):
    """FPN over the pyramid (high-res first): returns the finest fused map [B, out_dim, H0, W0]."""

    def __init__(self, pyramid_channels: Sequence[int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in pyramid_channels)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(_groups(dim), dim), nn.ReLU())
            for _ in pyramid_channels)
        self.out = nn.Conv2d(dim, out_dim, 1)

    def forward(self, pyramid: Sequence[Tensor]) -> Tensor:
        levels = list(pyramid)
        x = self.smooth[-1](self.lateral[-1](levels[-1]))
        for i in range(len(levels) - 2, -1, -1):  # coarse to fine; a fixed loop over the config's levels
            lateral = self.lateral[i](levels[i])
            x = self.smooth[i](lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest"))
        return self.out(x)


def _groups(dim: int) -> int:
    """GroupNorm groups: 32 when the width allows, fewer for tiny widths."""
    for groups in (32, 16, 8, 4, 2):
        if dim % groups == 0:
            return groups
    return 1


REF_NORMS = ("layer", "standard")


class RefStandardizer(nn.Module):
    """Each dimension of the <REF> states standardised by statistics of the data.

    An LLM's hidden states share a few huge dimensions: different questions' <REF> states
    had mean cosine 0.997 on the nano model, and a per-state LayerNorm keeps that shared
    part, so every query started nearly the same. Subtracting each dimension's mean over
    the data and dividing by its spread keeps what differs between questions. The running
    mean and variance are updated from the valid states of each training batch (a
    cumulative average, then an exponential one) and frozen in eval mode; they are buffers,
    so they are saved with the model and are constants of the exported graphs.
    """

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-4) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, states: Tensor) -> None:
        """states [N, D]: fold one batch's valid states into the running statistics."""
        if states.shape[0] == 0:
            return
        rate = max(1.0 / float(self.count + 1), self.momentum)
        self.mean.lerp_(states.mean(0).to(self.mean), rate)
        self.var.lerp_(states.var(0, unbiased=False).to(self.var), rate)
        self.count += 1

    def forward(self, states: Tensor, valid: Tensor) -> Tensor:
        """states [B, L, D], valid [B, L] bool -> standardised states [B, L, D]."""
        if self.training:
            self.update(states.detach()[valid.bool()].float())
        return (states - self.mean.to(states.dtype)) * torch.rsqrt(self.var.to(states.dtype) + self.eps)


class RefQueries(nn.Module):
    """<REF> latent embeddings [B, L, D_llm] -> decoder queries and query positions [B, L, D].

    ``norm``: "layer" normalises each state alone (LayerNorm, the models trained before the
    standardiser), "standard" standardises each dimension by data statistics (RefStandardizer).
    """

    def __init__(self, llm_dim: int, dim: int, norm: str = "layer") -> None:
        super().__init__()
        if norm not in REF_NORMS:
            raise ValueError(f"ref_norm={norm!r}: use one of {REF_NORMS}")
        self.norm = nn.LayerNorm(llm_dim) if norm == "layer" else RefStandardizer(llm_dim)
        self.content = nn.Linear(llm_dim, dim)
        self.position = nn.Linear(llm_dim, dim)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm(ref_embeddings) if isinstance(self.norm, nn.LayerNorm) else self.norm(ref_embeddings, ref_valid)
        return self.content(x), self.position(x)


class RefImageDecoder(nn.Module):
    """REF queries cross-attending to the multi-scale image memory: the shared trunk of the
    box, mask and keypoint decoders. Returns decoded queries [B, L, D]."""

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int, num_heads: int,
                 num_layers: int, ffn_dim: int, memory_levels: int, ref_norm: str = "layer") -> None:
        super().__init__()
        self.queries = RefQueries(llm_dim, hidden_dim, ref_norm)
        self.memory = MultiScaleMemory(pyramid_channels, hidden_dim, memory_levels)
        self.decoder = QueryDecoder(hidden_dim, num_heads, num_layers, ffn_dim)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> Tensor:
        queries, query_pos = self.queries(ref_embeddings, ref_valid)
        memory, memory_pos = self.memory(pyramid)
        return self.decoder(queries, query_pos, ref_valid, memory, memory_pos)


class DenseRefDecoder(nn.Module):
    """The dense query-to-pixel path shared by the box, mask and keypoint decoders.

    REF queries are decoded against the multi-scale memory (DETR layers) and then dotted
    with every pixel of an FPN map, so a query scores each location directly. A query
    that carries the phrase finds its object from the first steps this way, where boxes
    regressed from the query alone stayed at chance (docs/architecture.md). ``forward``
    returns the decoded queries, of every layer in training mode (auxiliary losses) or of
    the last layer, and the pixel map.
    """

    def __init__(self, llm_dim: int, pyramid_channels: Sequence[int], hidden_dim: int, num_heads: int,
                 num_layers: int, ffn_dim: int, memory_levels: int, pixel_dim: int, ref_norm: str = "layer") -> None:
        super().__init__()
        self.queries = RefQueries(llm_dim, hidden_dim, ref_norm)
        self.memory = MultiScaleMemory(pyramid_channels, hidden_dim, memory_levels)
        self.decoder = QueryDecoder(hidden_dim, num_heads, num_layers, ffn_dim)
        self.pixel_decoder = PixelDecoder(pyramid_channels, hidden_dim, pixel_dim)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """-> queries [N, B, L, D] (N = num_layers in training, 1 in eval), pixels [B, C, h, w]."""
        queries, query_pos = self.queries(ref_embeddings, ref_valid)
        memory, memory_pos = self.memory(pyramid)
        decoded = self.decoder(queries, query_pos, ref_valid, memory, memory_pos, all_layers=self.training)
        return (decoded if self.training else decoded[None]), self.pixel_decoder(pyramid)


def dot_heatmap(embeds: Tensor, pixels: Tensor) -> Tensor:
    """embeds [N, B, L, (K,) C] . pixels [B, C, h, w] -> logits [N, B, L, (K,) h, w], scaled by 1/sqrt(C)."""
    flat = embeds.flatten(2, -2) if embeds.dim() == 5 else embeds          # [N, B, L*K, C]
    logits = torch.einsum("nbqc,bchw->nbqhw", flat, pixels) / math.sqrt(pixels.shape[1])
    return logits.unflatten(2, embeds.shape[2:-1]) if embeds.dim() == 5 else logits


def soft_argmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """logits [..., h, w] -> (expected location [..., 2] as x, y in [0, 1], probabilities [..., h, w])."""
    h, w = logits.shape[-2:]
    prob = logits.flatten(-2).softmax(dim=-1).unflatten(-1, (h, w))
    ys = (torch.arange(h, device=logits.device, dtype=logits.dtype) + 0.5) / h
    xs = (torch.arange(w, device=logits.device, dtype=logits.dtype) + 0.5) / w
    x = (prob.sum(dim=-2) * xs).sum(dim=-1)
    y = (prob.sum(dim=-1) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1), prob


def cell_centres(h: int, w: int, like: Tensor) -> Tensor:
    """[h, w, 2] x, y of each cell centre in [0, 1]."""
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
