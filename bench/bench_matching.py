"""Grouped Hungarian matching: batched (one padded cost tensor, one host transfer, one
assignment per image) vs a loop that computes and solves each group on its own with scipy.

Batch of B images, each with 1..G unit blocks of 1..T instances (refs = instances, as in
teacher forcing), refs padded to L. Box costs (L1 + GIoU). Prints the median time of
both and their ratio, end to end (cost + matching) and for the assignment alone, and
checks that both give the same pairs.

    python bench/bench_matching.py [--batch 16] [--max-targets 20] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from refvlm_core.config import MatchCosts
from refvlm_core.matching import box_cost, grouped_hungarian, pad_groups, pad_stack

COSTS = MatchCosts()


def make_batch(rng: np.random.Generator, batch: int, max_groups: int, max_targets: int, length: int, device: str):
    """Predicted boxes [B, L, 4] with group ids [B, L]; per image target boxes [M_b, 4] and group ids [M_b]."""
    pred_boxes, pred_groups, tgt_boxes, tgt_groups = [], [], [], []
    for _ in range(batch):
        sizes = rng.integers(1, max_targets + 1, size=rng.integers(1, max_groups + 1))
        groups = np.repeat(np.arange(len(sizes)), sizes)[:length]
        n = len(groups)
        boxes = rng.uniform(0.2, 0.6, size=(length, 4))
        pred_boxes.append(boxes)
        pred_groups.append(np.concatenate([groups, np.full(length - n, -1)]))
        tgt_boxes.append(torch.tensor(rng.uniform(0.2, 0.6, size=(n, 4)), dtype=torch.float32, device=device))
        tgt_groups.append(torch.tensor(rng.permutation(groups), dtype=torch.long, device=device))
    return (torch.tensor(np.stack(pred_boxes), dtype=torch.float32, device=device),
            torch.tensor(np.stack(pred_groups), dtype=torch.long, device=device), tgt_boxes, tgt_groups)


def batched(pred, pred_group, tgt_boxes, tgt_groups):
    cost = box_cost(pred, pad_stack(tgt_boxes), COSTS.box_l1, COSTS.box_giou)  # [B, L, Mmax]
    return grouped_hungarian(cost, pred_group, pad_groups(tgt_groups))


def per_group_loop(pred, pred_group, tgt_boxes, tgt_groups):
    """What a straightforward implementation does: one small cost and one solve per group."""
    matches = []
    for b in range(pred.shape[0]):
        pairs = []
        for g in torch.unique(tgt_groups[b]).tolist():
            rows = (pred_group[b] == g).nonzero().flatten()
            cols = (tgt_groups[b] == g).nonzero().flatten()
            pair = box_cost(pred[b, rows][None], tgt_boxes[b][cols][None], COSTS.box_l1, COSTS.box_giou)
            cost = pair[0].cpu().numpy()
            r, c = linear_sum_assignment(cost)
            pairs += zip(rows.cpu().numpy()[r].tolist(), cols.cpu().numpy()[c].tolist())
        pairs.sort()
        matches.append((torch.tensor([p for p, _ in pairs], dtype=torch.long),
                        torch.tensor([t for _, t in pairs], dtype=torch.long)))
    return matches


def solve_loop(cost: np.ndarray, pred_group: np.ndarray, target_group: np.ndarray) -> None:
    """Assignment only: per-group scipy on a precomputed host cost."""
    for b in range(cost.shape[0]):
        for g in np.unique(target_group[b][target_group[b] >= 0]):
            rows, cols = np.flatnonzero(pred_group[b] == g), np.flatnonzero(target_group[b] == g)
            linear_sum_assignment(cost[b][np.ix_(rows, cols)])


def median_ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-groups", type=int, default=4)
    parser.add_argument("--max-targets", type=int, default=20)
    parser.add_argument("--length", type=int, default=100, help="router length L")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    data = make_batch(rng, args.batch, args.max_groups, args.max_targets, args.length, args.device)
    a, b = batched(*data), per_group_loop(*data)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b)), "results differ"
    groups = sum(len(torch.unique(g)) for g in data[3])
    targets = sum(len(g) for g in data[3])
    print(f"B={args.batch}, {groups} groups, {targets} targets (1-{args.max_targets} per group), "
          f"L={args.length}, device={args.device}, torch threads=1; identical matches: yes")

    t_batched = median_ms(lambda: batched(*data), args.repeats, args.device)
    t_loop = median_ms(lambda: per_group_loop(*data), args.repeats, args.device)
    print(f"cost + matching   batched {t_batched:8.2f} ms   per-group loop {t_loop:8.2f} ms   "
          f"loop / batched = {t_loop / t_batched:5.1f}x")

    cost = box_cost(data[0], pad_stack(data[2]), COSTS.box_l1, COSTS.box_giou)
    target_group = pad_groups(data[3])
    host = (cost.cpu().numpy(), data[1].cpu().numpy(), target_group.cpu().numpy())
    s_batched = median_ms(lambda: grouped_hungarian(cost, data[1], target_group), args.repeats, args.device)
    s_loop = median_ms(lambda: solve_loop(*host), args.repeats, args.device)
    print(f"assignment only   batched {s_batched:8.2f} ms   per-group loop {s_loop:8.2f} ms   "
          f"loop / batched = {s_loop / s_batched:5.1f}x  (loop timed on a host cost already there)")


if __name__ == "__main__":
    main()
