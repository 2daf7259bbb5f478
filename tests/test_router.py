"""Latent Embeddings Router: grouping by generated unit, composite blocks, padding, truncation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refvlm_core.errors import InputError
from refvlm_core.router import route, routing_problems


def embeddings(*counts: int, dim: int = 6) -> list[torch.Tensor]:
    """Per image [n, dim], row i filled with i + 1 + 100 * image so rows are recognisable."""
    return [(torch.arange(n, dtype=torch.float32)[:, None] + 1 + 100 * b).expand(n, dim).clone()
            for b, n in enumerate(counts)]


def test_groups_by_generated_unit_with_composite_blocks():
    # image 0: "<Unit>box</Unit>[0]<REF>[1]<REF>", "<Unit>box,mask</Unit>[0]<REF>", "<Unit>keypoint</Unit>[0]<REF>"
    ref_units = [[("box",), ("box",), ("box", "mask"), ("keypoint",)], [("mask",)]]
    ref_groups = [[0, 0, 1, 2], [0]]
    routed = route(embeddings(4, 1), ref_units, ref_groups, units=("box", "mask", "keypoint", "depth"), router_length=5)
    assert set(routed) == {"box", "mask", "keypoint", "depth"}
    box = routed["box"]
    assert box.embeddings.shape == (2, 5, 6)
    assert box.ordinals.tolist() == [[0, 1, 2, -1, -1], [-1] * 5]
    assert box.group_ids.tolist() == [[0, 0, 1, -1, -1], [-1] * 5]
    assert box.embeddings[0, :3, 0].tolist() == [1.0, 2.0, 3.0] and box.embeddings[0, 3:].abs().sum() == 0
    mask = routed["mask"]
    assert mask.ordinals.tolist() == [[2, -1, -1, -1, -1], [0, -1, -1, -1, -1]]
    assert mask.embeddings[1, 0, 0] == 101.0
    assert routed["keypoint"].group_ids[0, 0] == 2 and routed["keypoint"].num_refs == 1
    depth = routed["depth"]  # requested but unused: all padding, still the full shape
    assert depth.embeddings.shape == (2, 5, 6) and not depth.valid.any()
    assert (box.valid == (box.ordinals >= 0)).all()


def test_truncates_to_router_length_and_says_so():
    units = [[("box",)] * 5]
    routed = route(embeddings(5), units, [[0] * 5], units=("box",), router_length=3)
    assert routed["box"].ordinals.tolist() == [[0, 1, 2]]
    [problem] = routing_problems(units, ("box",), router_length=3)
    assert "5 <REF>s for unit 'box' exceed router_length=3" in problem
    assert routing_problems(units, ("box",), router_length=5) == []


def test_unknown_unit_is_dropped_and_named():
    units = [[("polygon",), ("box",)]]
    routed = route(embeddings(2), units, [[0, 1]], units=("box",), router_length=2)
    assert routed["box"].ordinals.tolist() == [[1, -1]]
    assert routing_problems(units, ("box",), router_length=2) == [
        "no decoder for unit(s) ['polygon']; their <REF>s are not decoded (decoders exist for ['box'])"]


@pytest.fixture(scope="module")
def tiny_predictor():
    from refvlm_core.predictor import Predictor

    return Predictor.from_preset("tiny")


def test_training_warns_of_dropped_refs_and_inference_reports_them_in_the_result(tiny_predictor):
    """The model warns while training; the Predictor puts the same words in Result.errors."""
    from model_samples import forced_answer_hook

    model = tiny_predictor.model
    units = [[("box",)] * (model.config.router_length + 1)]
    states = [torch.randn(len(units[0]), model.llm.hidden_size)]
    model.train()
    try:
        with pytest.warns(UserWarning, match="exceed router_length"):
            model.route_refs(states, units, [[0] * len(units[0])])
    finally:
        model.eval()
    answer = "<Phrase>blobs</Phrase> (<Unit>box</Unit>" + "".join(
        f"[{i}]<REF>" for i in range(model.config.router_length + 1)) + ")"
    image = np.zeros((32, 32, 3), np.uint8)
    result = tiny_predictor.predict(image, "Find the blobs.", constrained=False, max_new_tokens=200,
                                    logits_hook=forced_answer_hook(model.llm.tokenizer, answer))
    assert any("exceed router_length" in e for e in result.errors), result.errors
    assert sum(o.box_xyxy is not None for o in result.objects) == model.config.router_length


def test_gradient_flows_back_to_the_llm_embeddings():
    source = torch.randn(3, 4, requires_grad=True)
    routed = route([source], [[("box",), ("mask",), ("box", "mask")]], [[0, 1, 2]], units=("box", "mask"),
                   router_length=4)
    (routed["box"].embeddings.sum() + 2 * routed["mask"].embeddings.sum()).backward()
    assert source.grad[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(InputError, match="one entry per image"):
        route(embeddings(1, 1), [[("box",)]], [[0]], units=("box",))
    with pytest.raises(InputError, match="each <REF> needs one"):
        route(embeddings(2), [[("box",)]], [[0]], units=("box",))
    with pytest.raises(InputError, match="tuples of names"):
        route(embeddings(1), [["box"]], [[0]], units=("box",))
    with pytest.raises(InputError, match="router_length"):
        route(embeddings(1), [[("box",)]], [[0]], units=("box",), router_length=0)


def test_pad_to_longest_keeps_the_valid_refs_and_drops_only_padding():
    embeddings = [torch.randn(3, 8), torch.randn(1, 8)]
    units = [[("box",), ("box",), ("mask",)], [("box",)]]
    groups = [[0, 0, 1], [0]]
    fixed = route(embeddings, units, groups, ("box", "mask", "depth"), router_length=10)
    short = route(embeddings, units, groups, ("box", "mask", "depth"), router_length=10, pad_to_longest=True)
    assert {u: r.valid.shape[1] for u, r in short.items()} == {"box": 2, "mask": 1, "depth": 1}
    for unit in fixed:
        length = short[unit].valid.shape[1]
        assert torch.equal(fixed[unit].valid[:, :length], short[unit].valid)
        assert not fixed[unit].valid[:, length:].any()
        assert torch.equal(fixed[unit].embeddings[:, :length], short[unit].embeddings)
        assert torch.equal(fixed[unit].ordinals[:, :length], short[unit].ordinals)
