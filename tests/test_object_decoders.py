"""Decoders of kind "objects" (refvlm_core/decoders/objects.py): proposals from the towers'
object maps, a choice among them per <REF>, and the unit's outputs from the chosen object."""
from __future__ import annotations

import pytest
import torch

from refvlm_core.decoders.base import build_decoder
from refvlm_core.decoders.objects import box_prior, keypoint_extent, mask_extent, proposals
from refvlm_core.geometry import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh
from refvlm_core.router import RoutedRefs
from refvlm_core.targets import UnitTargets

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE, COLOURS, FORM = 16, 4, 6      # level-0 cells, colour channels, form channels of level 0
LLM_DIM = 12


def synthetic_scene(generator: torch.Generator, objects: int = 3):
    """A level-0 map of ``objects`` boxes: exact object maps (centre logits and log edge
    distances), a one-hot colour per object in the colour channels. Returns the pyramid
    (level 0, plus a coarser level), the boxes [N, 4] xyxy and the colours [N]."""
    level = torch.zeros(FORM + COLOURS + 5, SIDE, SIDE)
    level[FORM + COLOURS] = -8.0                                         # centre logit: nothing here
    level[FORM + COLOURS + 1:] = -4.0
    colours = torch.randperm(COLOURS, generator=generator)[:objects]
    boxes = []
    cells = torch.randperm(9, generator=generator)[:objects]             # one object per 3x3 block of the map
    for colour, cell in zip(colours.tolist(), cells.tolist()):
        row, col = divmod(cell, 3)
        y0, x0 = 1 + row * 5, 1 + col * 5
        h, w = int(torch.randint(2, 5, (1,), generator=generator)), int(torch.randint(2, 5, (1,), generator=generator))
        level[FORM + colour, y0:y0 + h, x0:x0 + w] = 1.0
        level[:FORM, y0:y0 + h, x0:x0 + w] += 0.5
        cy, cx = y0 + h // 2, x0 + w // 2
        box = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32) / SIDE
        level[FORM + COLOURS, cy, cx] = 8.0
        centre = torch.tensor([(cx + 0.5) / SIDE, (cy + 0.5) / SIDE])
        distances = torch.stack([centre[0] - box[0], centre[1] - box[1], box[2] - centre[0], box[3] - centre[1]])
        level[FORM + COLOURS + 1:, cy, cx] = distances.log()
        boxes.append(box)
    coarse = torch.nn.functional.avg_pool2d(level[None, :FORM + COLOURS], 2)[0]
    return [level, coarse], torch.stack(boxes), colours


def batch(generator: torch.Generator, size: int, codes: torch.Tensor):
    """Images with one <REF> each, asking for the object of one colour (its code as the state)."""
    levels, targets, refs = [[], []], [], []
    for _ in range(size):
        pyramid, boxes, colours = synthetic_scene(generator)
        pick = int(torch.randint(len(colours), (1,), generator=generator))
        for i, level in enumerate(pyramid):
            levels[i].append(level)
        refs.append(codes[colours[pick]])
        targets.append(UnitTargets(group_ids=torch.zeros(1, dtype=torch.long),
                                   value=xyxy_to_cxcywh(boxes[pick:pick + 1])))
    routed = RoutedRefs(embeddings=torch.stack(refs)[:, None], valid=torch.ones(size, 1, dtype=torch.bool),
                        ordinals=torch.zeros(size, 1, dtype=torch.long),
                        group_ids=torch.zeros(size, 1, dtype=torch.long))
    return [torch.stack(level) for level in levels], routed, targets


def diagonal_keypoints(boxes: torch.Tensor) -> torch.Tensor:
    """[M, 4] xyxy -> [M, 17, 3] keypoints spread along each box's diagonal, all labelled."""
    along = torch.linspace(0, 1, 17)[None, :, None]
    xy = boxes[:, None, :2] + along * (boxes[:, None, 2:] - boxes[:, None, :2])
    return torch.cat([xy, torch.full((len(boxes), 17, 1), 2.0)], -1)


def test_proposals_are_the_peaks_of_the_centre_map_with_their_boxes():
    generator = torch.Generator().manual_seed(0)
    pyramid, boxes, _ = synthetic_scene(generator)
    found, objectness = proposals(pyramid[0][None, -5:], 5)
    assert found.shape == (1, 5, 4) and objectness.shape == (1, 5)
    assert (objectness[0, :3] > 0.99).all() and (objectness[0, 3:] < 0.01).all()
    iou = box_iou(boxes, found[0, :3])
    assert torch.allclose(iou.max(dim=1).values, torch.ones(3), atol=1e-4)


def test_box_prior_is_zero_inside_the_box_and_very_negative_far_outside():
    prior = box_prior(torch.tensor([[[0.25, 0.25, 0.5, 0.5]]]), 16, 16)[0, 0]
    assert prior[6, 6] > -0.1 and prior[15, 15] < -10 and prior[0, 6] < -2


def test_extents_of_masks_and_keypoints():
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:4, 1:6] = 1
    assert torch.allclose(mask_extent(masks)[0], torch.tensor([1 / 8, 2 / 8, 6 / 8, 4 / 8]))
    assert torch.equal(mask_extent(masks)[1], torch.zeros(4))
    points = torch.zeros(1, 17, 3)
    points[0, :2] = torch.tensor([[0.2, 0.3, 2.0], [0.4, 0.7, 2.0]])
    box = keypoint_extent(points, grow=0.0)[0]
    assert torch.allclose(box, torch.tensor([0.2, 0.3, 0.4, 0.7]))


@pytest.mark.parametrize("unit", ["box", "mask", "keypoint"])
def test_objects_kind_builds_for_its_unit_and_refuses_towers_without_object_maps(unit):
    decoder = build_decoder(unit, LLM_DIM, [FORM + COLOURS + 5, FORM + COLOURS], kind="objects", hidden_dim=16,
                            num_heads=2, num_layers=1, num_objects=6)
    refs, valid = torch.randn(2, 3, LLM_DIM), torch.ones(2, 3, dtype=torch.bool)
    pyramid, _, _ = synthetic_scene(torch.Generator().manual_seed(1))
    outputs = decoder.eval()(refs, valid, [torch.stack([p, p]) for p in pyramid])
    assert all(torch.isfinite(v).all() for v in outputs.values())
    # a training step: the unit's losses plus the choice's, finite, and the choice gets a gradient
    generator = torch.Generator().manual_seed(2)
    pyramid, routed, box_targets = batch(generator, 2, torch.randn(COLOURS, LLM_DIM))
    values = {"box": lambda t: t.value,
              "mask": lambda t: (box_prior(cxcywh_to_xyxy(t.value)[None], SIDE * 2, SIDE * 2)[0] > -1).float(),
              "keypoint": lambda t: diagonal_keypoints(cxcywh_to_xyxy(t.value))}
    targets = [UnitTargets(group_ids=t.group_ids, value=values[unit](t)) for t in box_targets]
    decoder.train()
    losses = decoder.loss(decoder(routed.embeddings, routed.valid, pyramid), routed, targets)
    assert f"loss_{unit}_select" in losses and all(torch.isfinite(v) for v in losses.values())
    losses[f"loss_{unit}_select"].backward()
    assert decoder.trunk.select_query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="object_maps"):
        build_decoder(unit, LLM_DIM, [4, 8], kind="objects", hidden_dim=16, num_heads=2, num_layers=1)


def train_to_choose(decoder, codes: torch.Tensor, steps: int = 150) -> tuple[float, float, float, float]:
    """Train ``decoder`` on synthetic scenes where the state names a colour: (accuracy before,
    after, first and last choice loss)."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)

    def accuracy() -> float:
        decoder.eval()
        pyramid, routed, targets = batch(torch.Generator().manual_seed(99), 64, codes)
        with torch.no_grad():
            boxes = decoder(routed.embeddings, routed.valid, pyramid)["boxes"][:, 0]
        truth = torch.cat([t.value for t in targets])
        iou = box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(truth)).diagonal()
        return float((iou > 0.5).float().mean())

    before, first = accuracy(), None
    for _ in range(steps):
        decoder.train()
        pyramid, routed, targets = batch(generator, 16, codes)
        losses = decoder.loss(decoder(routed.embeddings, routed.valid, pyramid), routed, targets)
        first = float(losses["loss_box_select"].detach()) if first is None else first
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return before, accuracy(), first, float(losses["loss_box_select"].detach())


def test_object_box_decoder_learns_to_choose_the_asked_object():
    """The state names a colour; after training, the box is the box of the object of that colour."""
    torch.manual_seed(0)
    codes = torch.randn(COLOURS, LLM_DIM) * 3
    decoder = build_decoder("box", LLM_DIM, [FORM + COLOURS + 5, FORM + COLOURS], kind="objects", hidden_dim=32,
                            num_heads=2, num_layers=1, num_objects=6, ref_norm="standard")
    before, after, first, last = train_to_choose(decoder, codes)
    assert last < first / 3
    assert before < 0.6 and after > 0.9


def test_attribute_described_objects_are_chosen_by_what_the_heads_read_and_the_heads_stay():
    """attributes: each proposal is described by its attribute heads' probabilities (colour from
    the colour channels). With a colour head that reads the colour channels (as stage 0's
    would), the chooser learns the asked colour; the heads themselves never change."""
    torch.manual_seed(0)
    codes = torch.randn(COLOURS, LLM_DIM) * 3
    decoder = build_decoder("box", LLM_DIM, [FORM + COLOURS + 5, FORM + COLOURS], kind="objects", hidden_dim=32,
                            num_heads=2, num_layers=1, num_objects=6, ref_norm="standard",
                            attributes={"color": COLOURS, "shape": 3}, colour_channels=COLOURS)
    heads = decoder.trunk.attribute_heads
    assert heads["color"].in_features == 2 * COLOURS * 9 and heads["shape"].in_features == 2 * FORM * 9
    with torch.no_grad():                    # roi_grid: per level, channels x 3 x 3 cells
        heads["color"].weight.zero_()
        heads["color"].bias.zero_()
        for level in range(2):
            for colour in range(COLOURS):
                start = level * COLOURS * 9 + colour * 9
                heads["color"].weight[colour, start:start + 9] = 2.0
    kept = {k: v.clone() for k, v in heads.state_dict().items()}
    described = decoder.trunk.describe(*_levels_and_boxes())
    assert described.shape[-1] == COLOURS + 3
    assert torch.allclose(described[..., :COLOURS].sum(-1), torch.ones(described.shape[:-1]))
    before, after, first, last = train_to_choose(decoder, codes)
    assert last < first / 3 and before < 0.6 and after > 0.9
    assert all(torch.equal(v, kept[k]) for k, v in heads.state_dict().items())
    assert all(p.grad is None for p in heads.parameters())


def _levels_and_boxes():
    pyramid, boxes, _ = synthetic_scene(torch.Generator().manual_seed(5))
    return [pyramid[0][None, :-5], pyramid[1][None]], boxes[None]


def test_select_weight_scales_the_choice_loss():
    generator = torch.Generator().manual_seed(3)
    pyramid, routed, targets = batch(generator, 4, torch.randn(COLOURS, LLM_DIM))
    losses = {}
    for weight in (1.0, 3.0):
        torch.manual_seed(0)
        decoder = build_decoder("box", LLM_DIM, [FORM + COLOURS + 5, FORM + COLOURS], kind="objects", hidden_dim=16,
                                num_heads=2, num_layers=1, num_objects=6, loss_weights={"select": weight}).train()
        losses[weight] = float(decoder.loss(decoder(routed.embeddings, routed.valid, pyramid), routed,
                                            targets)["loss_box_select"].detach())
    assert losses[1.0] > 0 and losses[3.0] == pytest.approx(3 * losses[1.0], rel=1e-5)


@pytest.mark.timeout(900)
def test_objects_model_exports_and_onnxruntime_matches_torch(tmp_path):
    """A tiny model with split towers, object maps and "objects" decoders: every part
    exports, and ONNX Runtime gives torch's outputs at shapes other than the export's."""
    from refvlm_export import parity
    from refvlm_export.runtime import OnnxRuntimeDecoders
    from refvlm_export.onnx_export import ConvNextGraph, export_model

    model = objects_tiny_model()
    export_model(model, tmp_path)
    backend = OnnxRuntimeDecoders(tmp_path, "cpu", model.config, threads=1)
    for unit in ("box", "mask", "keypoint"):
        for batch_size, length, num_valid, size in ((1, 7, 3, 64), (2, 2, 2, 96)):
            report = parity.decoder_parity(model, backend, unit, batch_size, length, num_valid, size)
            assert report.ok, str(report)
    report = parity.onnx_part_parity(tmp_path, "convnext", ConvNextGraph(model.encoder), (torch.rand(1, 3, 96, 96),))
    assert report.ok, str(report)


@pytest.mark.timeout(900)
def test_attribute_described_decoders_export_and_onnxruntime_matches_torch(tmp_path):
    from refvlm_export import parity
    from refvlm_export.onnx_export import export_model
    from refvlm_export.runtime import OnnxRuntimeDecoders

    model = objects_tiny_model(attributes=True)
    export_model(model, tmp_path, units=["box", "mask"], encoders=False)
    decoders = OnnxRuntimeDecoders(tmp_path, "cpu", model.config, threads=1)
    for unit in ("box", "mask"):
        report = parity.decoder_parity(model, decoders, unit, 2, 3, 2, 96)
        assert report.ok, str(report)


def objects_tiny_model(attributes: bool = False):
    """The tiny preset with split towers, object maps and "objects" box, mask and keypoint
    decoders (``attributes``: their objects described by attribute heads)."""
    from refvlm_core.config import preset
    from refvlm_core.model import RefVLM

    config = preset("tiny")
    config.vision.pyramid_input, config.vision.colour_channels, config.vision.object_maps = "luminance", 4, True
    for unit in ("box", "mask", "keypoint"):
        config.decoders[unit] = {**config.decoders[unit], "kind": "objects", "num_objects": 6, "ref_norm": "standard"}
        if attributes:
            config.decoders[unit].update(attributes={"color": 8, "shape": 5}, colour_channels=4)
    torch.manual_seed(0)
    return RefVLM.from_config(config).eval()


def test_predictor_answers_in_pixels_with_objects_decoders():
    """The Predictor routes a generated answer to the "objects" decoders and puts their
    outputs on the objects in original pixels, the mask inside the chosen box."""
    import numpy as np

    from refvlm_core import trp
    from refvlm_core.predictor import Predictor
    from tests.model_samples import forced_answer_hook

    model = objects_tiny_model()
    answer = (f"{trp.format_phrase('cups', ('box',), 2)}, {trp.format_phrase('a bowl', ('mask',), 1)}, "
              f"{trp.format_phrase('a man', ('keypoint',), 1)}")
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    result = Predictor(model).predict(image, "Find things.", max_new_tokens=80,
                                      logits_hook=forced_answer_hook(model.llm.tokenizer, answer))
    assert result.errors == []
    boxes = [o.box_xyxy for o in result.objects if o.box_xyxy is not None]
    masks = [o.mask for o in result.objects if o.mask is not None]
    points = [o.keypoints for o in result.objects if o.keypoints is not None]
    assert len(boxes) == 2 and len(masks) == 1 and len(points) == 1
    for box in boxes:
        assert np.isfinite(box).all() and box[0] <= box[2] and box[1] <= box[3]
    assert masks[0].shape == (60, 80) and points[0].shape == (17, 3)


def test_choice_probe_splits_answers_into_found_and_chosen(tmp_path):
    """`refvlm probe choice`: per target, whether a proposal covers it and whether the query
    chose that one; a chosen hit is always a covered target, and the best proposal is chosen
    exactly when its rank is 0. A model whose box decoder does not choose is refused."""
    import json
    import subprocess
    import sys

    from refvlm_core.checkpoint import save_model
    from refvlm_training.evaluation.probes import choice_probe
    from refvlm_training.evaluation.runner import load_samples

    model = objects_tiny_model()
    samples = [s for s in load_samples("simworld:test:4") if s.task == "rec"]
    report = choice_probe(model, samples, "box", batch=3)
    assert report["count"] == len(samples) > 0 and report["proposals"] == 6
    assert 0 <= report["chosen_hit"] <= report["covered"] <= 1
    assert 0 <= report["best_chosen"] <= 1 and report["best_rank"] >= 0
    assert (report["best_rank"] == 0) == (report["best_chosen"] == 1)
    assert sum(row["count"] for row in report["per_kind"].values()) == report["count"]

    save_model(model, tmp_path / "model")
    out = tmp_path / "choice.json"
    run = subprocess.run([sys.executable, "-m", "refvlm_cli.main", "probe", "choice", "--model",
                          str(tmp_path / "model"), "--data", "simworld:test:2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["count"] >= 1 and "a proposal covers" in run.stdout
    refused = subprocess.run([sys.executable, "-m", "refvlm_cli.main", "probe", "choice", "--model", "tiny",
                              "--data", "simworld:test:1", "--out", str(out)],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "needs kind 'objects'" in refused.stderr
