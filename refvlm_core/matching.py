"""Parallel Grouped Hungarian Matching (REF-VLM eq. 4-8) and the pairwise matching costs.

Only <REF>s and targets of the same unit block (group) may match. The costs of all groups
of a batch are computed in one padded ``[B, Nmax, Mmax]`` tensor; pairs across groups and
padding get a cost larger than any set of real pairs can add up to, the whole tensor moves
to the host once, and one assignment is solved per image. Because the cross-group cost
dominates, each image's optimum contains exactly min(n_g, m_g) pairs inside every group g,
and its within-group pairs are each group's own optimum: the result equals solving each
group separately with scipy (tests/test_matching.py checks it on random cases).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from refvlm_core.errors import InputError
from refvlm_core.geometry import cxcywh_to_xyxy, generalized_box_iou

Match = tuple[Tensor, Tensor]  # (pred_idx [K] long, tgt_idx [K] long), sorted by pred_idx


def grouped_hungarian(cost: Tensor, pred_group: Tensor, target_group: Tensor) -> list[Match]:
    """Minimum-cost matching inside groups, for a whole batch.

    cost:         [B, Nmax, Mmax] pairwise cost (only same-group, non-padding entries are read)
    pred_group:   [B, Nmax] long group id of each prediction, -1 for padding
    target_group: [B, Mmax] long group id of each target, -1 for padding
    Returns per image (pred_idx, tgt_idx) long CPU tensors, sorted by pred_idx.
    """
    if cost.dim() != 3 or cost.shape[:2] != pred_group.shape or cost.shape[::2] != target_group.shape:
        raise InputError(f"grouped_hungarian: cost {tuple(cost.shape)} must be [B, N, M] with pred_group [B, N] "
                         f"and target_group [B, M]; got {tuple(pred_group.shape)} and {tuple(target_group.shape)}")
    same = (pred_group[:, :, None] == target_group[:, None, :]) & (pred_group[:, :, None] >= 0)  # [B, N, M]
    cost64 = cost.detach().to(torch.float64)
    if not bool(torch.isfinite(cost64[same]).all()):
        raise InputError("grouped_hungarian: the matching cost has NaN/inf entries between real pairs; "
                         "the predictions have diverged (lower the learning rate or check the inputs)")
    masked = torch.where(same, cost64, torch.zeros((), dtype=torch.float64, device=cost.device))
    # A cross-group pair must cost more than any difference of within-group totals: 2 * K * max|c| + 1.
    k = min(cost.shape[1], cost.shape[2])
    big = 2.0 * k * masked.abs().amax(dim=(1, 2), keepdim=True) + 1.0  # [B, 1, 1]
    masked = torch.where(same, cost64, big)
    rows_used = same.any(dim=2)  # [B, N]: rows whose group has targets (others can only take cross pairs)
    cols_used = same.any(dim=1)  # [B, M]
    host = (masked.cpu().numpy(), same.cpu().numpy(), rows_used.cpu().numpy(), cols_used.cpu().numpy())
    return [_solve_image(*per_image) for per_image in zip(*host)]


def _solve_image(cost: np.ndarray, same: np.ndarray, rows_used: np.ndarray, cols_used: np.ndarray) -> Match:
    rows, cols = np.flatnonzero(rows_used), np.flatnonzero(cols_used)
    if rows.size == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    r, c = linear_sum_assignment(cost[np.ix_(rows, cols)])
    pred_idx, tgt_idx = rows[r], cols[c]
    keep = same[pred_idx, tgt_idx]  # drop the forced cross-group pairs
    pred_idx, tgt_idx = pred_idx[keep], tgt_idx[keep]
    order = np.argsort(pred_idx, kind="stable")
    return torch.as_tensor(pred_idx[order]), torch.as_tensor(tgt_idx[order])


# ---- pairwise costs, batched: [B, N, ...] x [B, M, ...] -> [B, N, M] -------------------
# Their weights are ModelConfig.match_costs (MatchCosts), passed by the decoders.

def box_cost(pred: Tensor, target: Tensor, l1_weight: float, giou_weight: float) -> Tensor:
    """pred [B, N, 4], target [B, M, 4] cxcywh in [0, 1] -> l1_weight * L1 - giou_weight * GIoU."""
    l1 = torch.cdist(pred, target, p=1)
    giou = torch.vmap(generalized_box_iou)(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))
    return l1_weight * l1 - giou_weight * giou


def mask_cost(pred_logits: Tensor, target: Tensor, focal_weight: float, dice_weight: float,
              alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """pred_logits [B, N, P], target [B, M, P] 0/1 on the same P pixels (or sampled points) -> focal + dice."""
    prob = pred_logits.sigmoid()
    pos = alpha * (1 - prob) ** gamma * torch.nn.functional.softplus(-pred_logits)   # focal if target = 1
    neg = (1 - alpha) * prob ** gamma * torch.nn.functional.softplus(pred_logits)    # focal if target = 0
    focal = (pos @ target.transpose(1, 2) + neg @ (1 - target).transpose(1, 2)) / pred_logits.shape[-1]
    inter = prob @ target.transpose(1, 2)
    dice = 1 - (2 * inter + 1) / (prob.sum(-1)[:, :, None] + target.sum(-1)[:, None, :] + 1)
    return focal_weight * focal + dice_weight * dice


def keypoint_cost(pred_xy: Tensor, vis_logits: Tensor, target: Tensor,
                  l1_weight: float, visibility_weight: float) -> Tensor:
    """pred_xy [B, N, 17, 2], vis_logits [B, N, 17], target [B, M, 17, 3] -> L1 over labelled keypoints + vis BCE."""
    labelled = (target[..., 2] > 0).to(pred_xy.dtype)  # [B, M, 17]
    error = (pred_xy[:, :, None] - target[:, None, :, :, :2]).abs().sum(-1)  # [B, N, M, 17]
    l1 = (error * labelled[:, None]).sum(-1) / labelled.sum(-1).clamp(min=1.0)[:, None]
    log_p, log_not_p = torch.nn.functional.logsigmoid(vis_logits), torch.nn.functional.logsigmoid(-vis_logits)
    bce = -(log_p @ labelled.transpose(1, 2) + log_not_p @ (1 - labelled).transpose(1, 2)) / vis_logits.shape[-1]
    return l1_weight * l1 + visibility_weight * bce


# ---- padding and gathering ----------------------------------------------------------

def pad_stack(tensors: Sequence[Tensor], fill: float = 0.0) -> Tensor:
    """Per image [M_b, ...] -> [B, Mmax, ...], padded with ``fill`` (Mmax >= 1 so shapes stay non-empty)."""
    m_max = max([1] + [t.shape[0] for t in tensors])
    out = tensors[0].new_full((len(tensors), m_max, *tensors[0].shape[1:]), fill)
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
    return out


def pad_groups(group_ids: Sequence[Tensor]) -> Tensor:
    """Per image target group ids [M_b] -> [B, Mmax] long, -1 at padding."""
    return pad_stack([g.long() for g in group_ids], fill=-1).long()


def matched_predictions(values: Tensor, matches: Sequence[Match]) -> Tensor:
    """values [B, L, ...] -> [K, ...]: the matched predictions of all images, image by image."""
    batch = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)]).to(values.device)
    pred = torch.cat([p for p, _ in matches]).to(values.device)
    return values[batch, pred]


def matched_targets(values: Sequence[Tensor], matches: Sequence[Match]) -> Tensor:
    """Per image targets [M_b, ...] -> [K, ...], in the order of matched_predictions."""
    return torch.cat([v[t.to(v.device)] for v, (_, t) in zip(values, matches)])
