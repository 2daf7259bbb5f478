"""Grouped Hungarian matching equals per-group scipy; the batched costs equal their loop definitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from refvlm_core.errors import InputError
from refvlm_core.geometry import cxcywh_to_xyxy, generalized_box_iou
from refvlm_core.losses import dice_loss, keypoint_visibility_loss, sigmoid_focal_loss
from refvlm_core.matching import box_cost, grouped_hungarian, keypoint_cost, mask_cost, pad_groups, pad_stack


def per_group_scipy(cost: np.ndarray, pred_group: np.ndarray, target_group: np.ndarray) -> set[tuple[int, int]]:
    """The reference: each group of one image solved on its own."""
    pairs = set()
    for g in set(pred_group[pred_group >= 0].tolist()) & set(target_group[target_group >= 0].tolist()):
        rows, cols = np.flatnonzero(pred_group == g), np.flatnonzero(target_group == g)
        r, c = linear_sum_assignment(cost[np.ix_(rows, cols)])
        pairs |= set(zip(rows[r].tolist(), cols[c].tolist()))
    return pairs


def random_case(rng: np.random.Generator, batch: int, max_groups: int, max_per_group: int):
    """Random groups (some empty on one side), shuffled slots, padding at the end; ties-free costs."""
    pred_groups, target_groups = [], []
    for _ in range(batch):
        groups = rng.integers(0, max_groups + 1)
        n = [int(rng.integers(0, max_per_group + 1)) for _ in range(groups)]
        m = [int(rng.integers(0, max_per_group + 1)) for _ in range(groups)]
        pred_groups.append(rng.permutation(np.repeat(np.arange(groups), n)))
        target_groups.append(rng.permutation(np.repeat(np.arange(groups), m)))
    n_max = max(1, max(len(p) for p in pred_groups)) + int(rng.integers(0, 3))  # extra padding slots
    m_max = max(1, max(len(t) for t in target_groups))
    pg = np.full((batch, n_max), -1)
    tg = np.full((batch, m_max), -1)
    for b in range(batch):
        pg[b, : len(pred_groups[b])] = pred_groups[b]
        tg[b, : len(target_groups[b])] = target_groups[b]
    cost = rng.normal(size=(batch, n_max, m_max)) * rng.choice([0.01, 1.0, 100.0])
    return torch.tensor(cost, dtype=torch.float32), torch.tensor(pg), torch.tensor(tg)


@pytest.mark.parametrize("seed", range(40))
def test_grouped_equals_per_group_scipy(seed):
    rng = np.random.default_rng(seed)
    cost, pg, tg = random_case(rng, batch=int(rng.integers(1, 6)), max_groups=4, max_per_group=8)
    matches = grouped_hungarian(cost, pg, tg)
    assert len(matches) == cost.shape[0]
    for b, (pred_idx, tgt_idx) in enumerate(matches):
        expected = per_group_scipy(cost[b].double().numpy(), pg[b].numpy(), tg[b].numpy())
        assert set(zip(pred_idx.tolist(), tgt_idx.tolist())) == expected
        assert pred_idx.tolist() == sorted(pred_idx.tolist())
        assert (pg[b, pred_idx] == tg[b, tgt_idx]).all()


def test_more_refs_than_targets_and_vice_versa_in_one_image():
    # group 0: 3 refs / 1 target; group 1: 1 ref / 3 targets; group 2: refs only; group 3: targets only
    pg = torch.tensor([[0, 0, 0, 1, 2, -1]])
    tg = torch.tensor([[1, 0, 1, 1, 3]])
    cost = torch.tensor(np.random.default_rng(1).random((1, 6, 5)), dtype=torch.float32)
    (pred_idx, tgt_idx), = grouped_hungarian(cost, pg, tg)
    assert set(zip(pred_idx.tolist(), tgt_idx.tolist())) == per_group_scipy(cost[0].double().numpy(), pg[0].numpy(),
                                                                             tg[0].numpy())
    assert len(pred_idx) == 2  # one pair in group 0, one in group 1; nothing across groups or with padding


def test_cross_group_pairs_never_win_even_when_cheap():
    cost = torch.full((1, 2, 2), 1000.0)
    cost[0, 0, 1] = cost[0, 1, 0] = -1000.0  # cheap, but across groups
    (pred_idx, tgt_idx), = grouped_hungarian(cost, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert pred_idx.tolist() == [0, 1] and tgt_idx.tolist() == [0, 1]


def test_all_padding_gives_empty_matches():
    matches = grouped_hungarian(torch.zeros(2, 3, 1), torch.full((2, 3), -1), torch.full((2, 1), -1))
    assert [len(p) for p, _ in matches] == [0, 0]


def test_nonfinite_cost_is_a_clear_error():
    cost = torch.tensor([[[float("nan")]]])
    with pytest.raises(InputError, match="NaN"):
        grouped_hungarian(cost, torch.tensor([[0]]), torch.tensor([[0]]))


def test_box_cost_matches_pairwise_definition():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 5, 4) * 0.5 + 0.2, torch.rand(2, 3, 4) * 0.5 + 0.2
    cost = box_cost(pred, target, l1_weight=5.0, giou_weight=2.0)
    for b in range(2):
        for n in range(5):
            for m in range(3):
                giou = generalized_box_iou(cxcywh_to_xyxy(pred[b, n : n + 1]), cxcywh_to_xyxy(target[b, m : m + 1]))
                expected = 5.0 * (pred[b, n] - target[b, m]).abs().sum() - 2.0 * giou[0, 0]
                assert torch.allclose(cost[b, n, m], expected, atol=1e-5)


def test_mask_cost_equals_the_mask_loss_of_each_pair():
    torch.manual_seed(0)
    logits, target = torch.randn(1, 4, 50), (torch.rand(1, 3, 50) > 0.5).float()
    cost = mask_cost(logits, target, focal_weight=20.0, dice_weight=1.0)
    for n in range(4):
        for m in range(3):
            pair = logits[0, n : n + 1], target[0, m : m + 1]
            expected = 20.0 * sigmoid_focal_loss(*pair, num_masks=1) + dice_loss(*pair, num_masks=1)
            assert torch.allclose(cost[0, n, m], expected, atol=1e-5)


def test_keypoint_cost_uses_labelled_keypoints_only():
    torch.manual_seed(0)
    xy, vis = torch.rand(1, 3, 17, 2), torch.randn(1, 3, 17)
    target = torch.cat([torch.rand(1, 2, 17, 2), torch.randint(0, 3, (1, 2, 17, 1)).float()], dim=-1)
    cost = keypoint_cost(xy, vis, target, l1_weight=1.0, visibility_weight=1.0)
    for n in range(3):
        for m in range(2):
            labelled = target[0, m, :, 2] > 0
            l1 = (xy[0, n] - target[0, m, :, :2]).abs().sum(-1)[labelled].sum() / labelled.sum().clamp(min=1)
            bce = keypoint_visibility_loss(vis[0, n : n + 1], target[0, m : m + 1])
            assert torch.allclose(cost[0, n, m], l1 + bce, atol=1e-5)
    moved = target.clone()
    moved[0, 0, :, :2] += (moved[0, 0, :, 2:] == 0) * 5.0  # move only unlabelled keypoints
    assert torch.allclose(keypoint_cost(xy, vis, moved, l1_weight=1.0, visibility_weight=1.0), cost)


def test_padding_helpers():
    stacked = pad_stack([torch.ones(2, 4), torch.ones(0, 4)])
    assert stacked.shape == (2, 2, 4) and stacked[1].abs().sum() == 0
    assert pad_groups([torch.tensor([3]), torch.tensor([], dtype=torch.long)]).tolist() == [[3], [-1]]
