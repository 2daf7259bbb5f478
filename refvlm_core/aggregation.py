"""Mask-guided aggregation (paper eq. 1-3): parameter-free pooling of image features
under each visual-prompt mask, with a cosine positional encoding of where they lie.

For one prompt mask M (resized to the feature map, values in [0, 1]) and features
F [C, H, W], both split into an N x N grid of patches g:

  (1) patch feature     r_g = sum_{h,w} F_g[:, h, w] M_g[h, w] / (sum_{h,w} M_g[h, w] + eps)
  (2) positional code   p_g = alpha * PE_s(cx_g, cy_g)  (sin/cos of the patch centre in [0, 1],
                        frequencies s^(-2i/d): half the channels for x, half for y)
  (3) region feature    f = sum_g a_g (r_g + p_g) / (sum_g a_g + eps),  a_g = sum_{h,w} M_g[h, w]

f has the feature width C and goes through the projector shared with the image tokens.
Grids that do not divide H or W are zero-padded (features and mask), which leaves
every sum unchanged. An empty mask gives a zero feature.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, R, Hm, Wm] {0,1} -> [B, R, height, width] area fractions in [0, 1]."""
    if masks.shape[-2:] == (height, width):
        return masks.float()
    return F.adaptive_avg_pool2d(masks.float(), (height, width))


def cosine_position_encoding(grid: int, dim: int, temperature: float, alpha: float = 1.0,
                             device: torch.device | None = None) -> torch.Tensor:
    """[grid*grid, dim] code of the patch centres, rows in row-major (y, x) order."""
    if dim % 4:
        raise ValueError(f"positional encoding width {dim} must be a multiple of 4")
    centres = (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) / grid   # [N]
    quarter = dim // 4
    freqs = temperature ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    angles = centres[:, None] * freqs[None, :] * 2 * math.pi                          # [N, d/4]
    code_1d = torch.cat([angles.sin(), angles.cos()], dim=-1)                         # [N, d/2]
    code_y = code_1d[:, None, :].expand(grid, grid, dim // 2)
    code_x = code_1d[None, :, :].expand(grid, grid, dim // 2)
    return alpha * torch.cat([code_x, code_y], dim=-1).reshape(grid * grid, dim)


def _pad_to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    return F.pad(x, (0, (-width) % grid, 0, (-height) % grid))


def mask_guided_aggregation(features: torch.Tensor, masks: torch.Tensor, grid: int,
                            temperature: float, alpha: float = 1.0) -> torch.Tensor:
    """features [B, C, H, W], masks [B, R, Hm, Wm] -> region features [B, R, C]."""
    batch, channels, height, width = features.shape
    masks = resize_masks(masks, height, width)                                # eq. (1) input
    feats = _pad_to_grid(features, grid)
    masks = _pad_to_grid(masks, grid)
    ph, pw = feats.shape[-2] // grid, feats.shape[-1] // grid
    feats = feats.reshape(batch, channels, grid, ph, grid, pw)               # [B, C, N, ph, N, pw]
    masks = masks.reshape(batch, masks.shape[1], grid, ph, grid, pw)         # [B, R, N, ph, N, pw]
    weighted = torch.einsum("bcyhxw,bryhxw->bryxc", feats, masks)            # [B, R, N, N, C]
    area = masks.sum(dim=(3, 5))                                             # [B, R, N, N]
    patch = weighted / (area[..., None] + EPS)                               # eq. (1)
    code = cosine_position_encoding(grid, channels, temperature, alpha, features.device)  # eq. (2)
    patch = patch.reshape(batch, -1, grid * grid, channels) + code.to(patch.dtype)
    area = area.reshape(batch, -1, grid * grid, 1)
    return (area * patch).sum(dim=2) / (area.sum(dim=2) + EPS)               # eq. (3): [B, R, C]


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """ViT patch tokens [B, G*G, C] -> feature map [B, C, G, G]."""
    batch, count, channels = tokens.shape
    side = int(round(math.sqrt(count)))
    if side * side != count:
        raise ValueError(f"{count} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)
