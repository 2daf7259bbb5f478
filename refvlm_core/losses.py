"""Decoder losses: box L1 + GIoU, mask focal + dice, keypoint L1 + visibility BCE, and the
scale-invariant log depth loss (Eigen et al., 2014). Weights are ``LossWeights`` fields
(defined with the model config, ``refvlm_core.config``, where their defaults live).

Every function takes already-matched, flattened predictions and targets (see
refvlm_core.matching) and returns an unweighted scalar; the decoders weight them.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from refvlm_core.config import LossWeights  # noqa: F401  (the losses' weights, imported from here)
from refvlm_core.geometry import cxcywh_to_xyxy, generalized_box_iou


def connected_zero(outputs: Mapping[str, Tensor]) -> Tensor:
    """A zero that depends on every floating output, so each parameter gets a (zero) gradient.

    Distributed data parallel waits for a gradient of every parameter: a decoder whose
    unit has no targets in a batch must still be part of the graph.
    """
    parts = [value.sum() * 0.0 for value in outputs.values() if value.is_floating_point()]
    return torch.stack(parts).sum()


# ---- boxes -------------------------------------------------------------------------

def box_l1_loss(pred: Tensor, target: Tensor, num_boxes: float) -> Tensor:
    """pred, target [K, 4] cxcywh -> L1 summed over coordinates, averaged over boxes."""
    return F.l1_loss(pred, target, reduction="sum") / num_boxes


def box_giou_loss(pred: Tensor, target: Tensor, num_boxes: float) -> Tensor:
    """pred, target [K, 4] cxcywh -> mean (1 - GIoU) over boxes."""
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target)))
    return (1.0 - giou).sum() / num_boxes


def heatmap_box_loss(prob: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """prob [K, h, w] (a softmax over cells), target [K, 4] cxcywh -> mean -log(mass inside the box).

    The cell holding the box centre always counts as inside, so a box smaller than a cell
    still has a cell to pull the mass to.
    """
    h, w = prob.shape[-2:]
    ys = (torch.arange(h, device=prob.device, dtype=prob.dtype) + 0.5) / h
    xs = (torch.arange(w, device=prob.device, dtype=prob.dtype) + 0.5) / w
    x0, y0, x1, y1 = cxcywh_to_xyxy(target).unbind(-1)                                 # [K] each
    inside_x = (xs[None] >= x0[:, None]) & (xs[None] <= x1[:, None])                   # [K, w]
    inside_y = (ys[None] >= y0[:, None]) & (ys[None] <= y1[:, None])                   # [K, h]
    inside = inside_y[:, :, None] & inside_x[:, None, :]                               # [K, h, w]
    cx = (target[:, 0] * w).long().clamp(0, w - 1)
    cy = (target[:, 1] * h).long().clamp(0, h - 1)
    inside[torch.arange(len(target), device=prob.device), cy, cx] = True
    mass = (prob * inside).flatten(1).sum(dim=1)
    return -(mass + eps).log().mean()


# ---- masks -------------------------------------------------------------------------

def sigmoid_focal_loss(logits: Tensor, target: Tensor, num_masks: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """logits, target [K, P] (P pixels) -> focal loss averaged over pixels, summed over masks / num_masks."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean(dim=1).sum() / num_masks


def dice_loss(logits: Tensor, target: Tensor, num_masks: float) -> Tensor:
    """logits, target [K, P] -> mean (1 - soft dice) over masks."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * target).sum(dim=1)
    denominator = prob.sum(dim=1) + target.sum(dim=1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


# ---- keypoints ---------------------------------------------------------------------

def keypoint_l1_loss(pred_xy: Tensor, target: Tensor) -> Tensor:
    """pred_xy [K, 17, 2], target [K, 17, 3] (x, y, v) -> L1 over labelled (v > 0) keypoints, per keypoint."""
    labelled = (target[..., 2] > 0).to(pred_xy.dtype)  # [K, 17]
    error = (pred_xy - target[..., :2]).abs().sum(dim=-1)  # [K, 17]
    return (error * labelled).sum() / labelled.sum().clamp(min=1.0)


def heatmap_keypoint_loss(logits: Tensor, target: Tensor, sigma_cells: float = 1.0) -> Tensor:
    """logits [K, 17, h, w], target [K, 17, 3] -> cross-entropy against a Gaussian (sigma in cells)
    around each labelled keypoint, mean over labelled keypoints."""
    h, w = logits.shape[-2:]
    ys = torch.arange(h, device=logits.device, dtype=logits.dtype) + 0.5
    xs = torch.arange(w, device=logits.device, dtype=logits.dtype) + 0.5
    dx = xs.view(1, 1, 1, w) - (target[..., 0] * w)[..., None, None]                   # [K, 17, 1, w]
    dy = ys.view(1, 1, h, 1) - (target[..., 1] * h)[..., None, None]                   # [K, 17, h, 1]
    goal = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma_cells ** 2))                     # [K, 17, h, w]
    goal = goal / goal.flatten(-2).sum(-1).clamp(min=1e-6)[..., None, None]
    log_prob = logits.flatten(-2).log_softmax(dim=-1).unflatten(-1, (h, w))
    ce = -(goal * log_prob).flatten(-2).sum(dim=-1)                                     # [K, 17]
    labelled = (target[..., 2] > 0).to(ce.dtype)
    return (ce * labelled).sum() / labelled.sum().clamp(min=1.0)


def keypoint_visibility_loss(vis_logits: Tensor, target: Tensor) -> Tensor:
    """vis_logits [K, 17], target [K, 17, 3] -> BCE of "labelled" (v > 0), mean over keypoints."""
    return F.binary_cross_entropy_with_logits(vis_logits, (target[..., 2] > 0).to(vis_logits.dtype))


# ---- depth -------------------------------------------------------------------------

def silog_loss(pred: Tensor, target: Tensor, lam: float = 0.5, eps: float = 1e-6) -> Tensor:
    """Scale-invariant log loss (Eigen et al., 2014) over valid pixels.

    pred [K, h, w] metres (> 0), target [h, w] or [K, h, w] metres with NaN or <= 0 for
    unknown. Per map: mean(d^2) - lam * mean(d)^2 with d = log pred - log target over its
    valid pixels; averaged over maps that have any valid pixel (0 if none).
    """
    target = target.expand_as(pred)
    valid = torch.isfinite(target) & (target > 0)
    safe_target = torch.where(valid, target, torch.ones_like(target))
    d = (torch.log(pred.clamp(min=eps)) - torch.log(safe_target)) * valid  # [K, h, w], 0 where invalid
    count = valid.flatten(1).sum(dim=1)  # [K]
    n = count.clamp(min=1).to(pred.dtype)
    mean_sq = d.pow(2).flatten(1).sum(dim=1) / n
    mean = d.flatten(1).sum(dim=1) / n
    per_map = mean_sq - lam * mean.pow(2)
    has_pixels = (count > 0).to(pred.dtype)
    return (per_map * has_pixels).sum() / has_pixels.sum().clamp(min=1.0)
