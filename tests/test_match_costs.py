"""Hungarian matching minimises its own costs (ModelConfig.match_costs, detr's set_cost_*),
not the loss weights: changing a cost weight changes which target a <REF> is matched to,
changing a loss weight only scales its loss. Defaults are today's values."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from refvlm_core.config import LossWeights, MatchCosts, ModelConfig, preset
from refvlm_core.decoders import build_decoder
from refvlm_core.router import RoutedRefs
from refvlm_core.targets import UnitTargets

LLM_DIM, CHANNELS = 32, (8, 16, 32)
SIZES = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2}
# unit -> (its two cost names, the loss whose unweighted value shows the assignment)
UNITS = {"box": (("box_l1", "box_giou"), "box_l1"),
         "mask": (("mask_focal", "mask_dice"), "mask_dice"),
         "keypoint": (("keypoint_l1", "keypoint_visibility"), "keypoint_l1")}


def case(unit: str, seed: int) -> tuple[dict, torch.Tensor]:
    """Outputs of 2 <REF>s of one block and the block's 2 targets, random."""
    g = torch.Generator().manual_seed(seed)
    if unit == "box":
        return ({"boxes": torch.rand(1, 2, 4, generator=g) * 0.5 + 0.2, "scores": torch.zeros(1, 2)},
                torch.rand(2, 4, generator=g) * 0.5 + 0.2)
    if unit == "mask":
        return {"mask_logits": torch.randn(1, 2, 8, 8, generator=g) * 3}, (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    target = torch.cat([torch.rand(2, 17, 2, generator=g), torch.randint(0, 3, (2, 17, 1), generator=g).float()], -1)
    return {"keypoints": torch.rand(1, 2, 17, 2, generator=g), "visibility_logits": torch.randn(1, 2, 17, generator=g)}, target


def observed(unit: str, seed: int, loss_weights: dict | None = None, match_costs: dict | None = None) -> float:
    """The unweighted loss of the unit's matched pairs: it changes exactly when the assignment does."""
    decoder = build_decoder(unit, LLM_DIM, CHANNELS, loss_weights=loss_weights, match_costs=match_costs,
                            **SIZES).eval()
    outputs, target = case(unit, seed)
    routed = RoutedRefs(embeddings=torch.zeros(1, 2, LLM_DIM), valid=torch.ones(1, 2, dtype=torch.bool),
                        ordinals=torch.tensor([[0, 1]]), group_ids=torch.zeros(1, 2, dtype=torch.long))
    losses = decoder.loss(outputs, routed, [UnitTargets(group_ids=torch.zeros(2, dtype=torch.long), value=target)])
    name = UNITS[unit][1]
    return float(losses[f"loss_{name}"]) / getattr(LossWeights.coerce(loss_weights), name)


def disagreeing_seed(unit: str) -> int:
    """A case where matching by either cost alone picks a different assignment."""
    first, second = UNITS[unit][0]
    for seed in range(100):
        if observed(unit, seed, match_costs={first: 1.0, second: 0.0}) != pytest.approx(
                observed(unit, seed, match_costs={first: 0.0, second: 1.0}), rel=1e-4):
            return seed
    raise AssertionError(f"no case in 100 where {first} and {second} disagree")


@pytest.mark.parametrize("unit", list(UNITS))
def test_a_match_cost_changes_the_assignment_and_a_loss_weight_does_not(unit):
    first, second = UNITS[unit][0]
    seed = disagreeing_seed(unit)  # so some cost weights flip the assignment here
    default = observed(unit, seed)
    for weights in ({first: 1.0, second: 0.01}, {first: 0.01, second: 100.0}):
        assert observed(unit, seed, loss_weights=weights) == pytest.approx(default, rel=1e-4)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(MatchCosts)])
def test_each_match_cost_changes_the_assignment(name):
    unit = next(u for u, (costs, _) in UNITS.items() if name in costs)
    other = next(c for c in UNITS[unit][0] if c != name)
    seed = disagreeing_seed(unit)
    alone = observed(unit, seed, match_costs={name: 1.0, other: 0.0})
    assert observed(unit, seed, match_costs={name: 0.0, other: 1.0}) != pytest.approx(alone, rel=1e-4)
    assert observed(unit, seed, match_costs={name: 1000.0, other: 1.0}) == pytest.approx(alone, rel=1e-4)


def test_defaults_are_the_loss_weights_of_before_and_reach_the_decoders():
    weights, costs = LossWeights(), MatchCosts()
    assert (costs.box_l1, costs.box_giou, costs.mask_focal, costs.mask_dice, costs.keypoint_l1,
            costs.keypoint_visibility) == (5.0, 2.0, 20.0, 1.0, 1.0, 1.0)
    assert all(getattr(costs, f.name) == getattr(weights, f.name) for f in dataclasses.fields(MatchCosts))
    data = preset("tiny").to_dict()
    data["match_costs"] = {"box_l1": 1.0}
    config = ModelConfig.from_dict(data)
    assert config.match_costs == MatchCosts(box_l1=1.0)
    assert build_decoder("box", LLM_DIM, CHANNELS, match_costs=config.match_costs, **SIZES).costs.box_l1 == 1.0
    del data["match_costs"]  # a config saved before match_costs existed
    assert ModelConfig.from_dict(data).match_costs == MatchCosts()
