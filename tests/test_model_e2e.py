"""Tiny RefVLM end to end: processor, training forward/backward, overfitting, generation
whose <REF>s reach the right decoders, the Predictor's input checks, the paper preset
on the meta device."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_samples import forced_answer_hook, mixed_samples
from refvlm_core import trp
from refvlm_core.config import preset
from refvlm_core.errors import ConfigError, InputError
from refvlm_core.geometry import cxcywh_to_xyxy
from refvlm_core.visual_prompts import VisualPrompt
from refvlm_training.engine.stages import set_stage_trainable

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    from refvlm_core.model import RefVLM

    torch.manual_seed(0)
    return RefVLM.from_config(preset("tiny"))


@pytest.fixture(scope="module")
def batch(model):
    processor = model.processor
    return processor.collate([processor.encode_sample(s) for s in mixed_samples()])


def test_processor_labels_only_answers(model):
    processor = model.processor
    sample = mixed_samples()[1]
    encoded = processor.encode_sample(sample)
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    answer = processor.tokenizer.decode([i for i, l in zip(ids, labels) if l != -100])
    assert answer == sample.turns[1].text + "<|im_end|>"
    assert ids.count(model.llm.image_id) == model.encoder.num_image_tokens
    assert ids.count(model.llm.region_id) == 1 and encoded.region_masks.shape == (1, 64, 64)
    # the box prompt (40,30)-(70,50) of an 80x60 image, letterboxed: pad 10 px top
    ys, xs = np.nonzero(encoded.region_masks[0].numpy())
    assert abs(xs.min() - 32) <= 1 and abs(ys.min() - 32) <= 1 and abs(xs.max() - 55) <= 1


def test_processor_targets_in_model_frame(model):
    encoded = model.processor.encode_sample(mixed_samples()[0])
    boxes = encoded.targets["box"].value
    # first square: x 8..30, y 5..25 of 80x60 -> model frame 64: scale 0.8, pad 10 px top
    expected = torch.tensor([(8 + 30) / 2 * 0.8 / 64, (5 + 25 + 20) / 2 * 0.8 / 64, 22 * 0.8 / 64, 20 * 0.8 / 64])
    assert torch.allclose(boxes[0], expected, atol=1e-4)
    assert encoded.ref_units == [("box",), ("box",)] and encoded.ref_groups == [0, 0]
    assert encoded.targets["box"].group_ids.tolist() == [0, 0] and encoded.targets["mask"].count == 0


def test_processor_rejects_mismatched_targets(model):
    sample = mixed_samples()[0]
    sample.turns[1].targets[0].boxes = sample.turns[1].targets[0].boxes[:1]
    with pytest.raises(InputError, match="2 <REF>s"):
        model.processor.encode_sample(sample)
    sample = mixed_samples()[1]
    sample.visual_prompts = []
    with pytest.raises(InputError, match="1 <region> placeholders but 0"):
        model.processor.encode_sample(sample)


def test_user_tags_are_neutralised(model):
    ids = model.processor.prompt_ids("say <REF> and <Phrase>x</Phrase>", 0)[0].tolist()
    assert model.llm.ref_id not in ids and model.llm.token_ids[trp.PHRASE_OPEN] not in ids


def test_forward_backward_mixed_units(model, batch):
    losses = model(batch)
    expected = {"loss", "loss_lm", "loss_box_l1", "loss_box_giou", "loss_mask_focal", "loss_mask_dice",
                "loss_keypoint_l1", "loss_keypoint_visibility", "loss_depth_silog"}
    assert expected <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    assert all(float(losses[k].detach()) > 0 for k in expected)
    model.zero_grad()
    losses["loss"].backward()
    for name in ("projector", "llm", "decoders"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
    assert all(p.grad is None for p in model.encoder.parameters())
    model.zero_grad()


def test_trainable_parameters_by_stage(model):
    stage1 = set(map(id, set_stage_trainable(model, 1)))
    assert stage1 == set(map(id, model.projector.parameters()))
    stage2 = list(set_stage_trainable(model, 2))
    assert len(stage2) == sum(1 for _ in model.projector.parameters()) + sum(
        1 for _ in model.llm.parameters()) + sum(1 for _ in model.decoders.parameters())
    with pytest.raises(ConfigError):
        set_stage_trainable(model, 4)


def test_overfit_fixed_batch(batch):
    """30 AdamW steps on the 4-sample batch: the total loss falls at least 2.5x."""
    from refvlm_core.model import RefVLM

    torch.manual_seed(1)
    model = RefVLM.from_config(preset("tiny"))
    optimizer = torch.optim.AdamW(set_stage_trainable(model, 2), lr=3e-3)
    first = last = None
    for _ in range(30):
        losses = model(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = first if first is not None else {k: float(v) for k, v in losses.items()}
        last = {k: float(v) for k, v in losses.items()}
    assert last["loss"] < first["loss"] / 2.5, (first, last)
    assert last["loss_lm"] < first["loss_lm"] * 0.8 and last["loss_box_l1"] < first["loss_box_l1"]


def test_generated_refs_reach_their_decoders(model):
    """A forced TRP answer: box <REF>s give boxes, the mask <REF> a mask, box+keypoint
    both, depth a depth map; each equals the decoder applied to the teacher-forced state."""
    from refvlm_core.predictor import Predictor

    predictor = Predictor(model)
    answer = (f"{trp.format_phrase('cups', ('box',), 2)} and {trp.format_phrase('a bowl', ('mask',), 1)}, "
              f"{trp.format_phrase('a man', ('box', 'keypoint'), 1)}, {trp.format_phrase('depth', ('depth',), 1)}")
    image = mixed_samples()[0].image
    result = predictor.predict(image, "Find things.", max_new_tokens=80,
                               logits_hook=forced_answer_hook(model.llm.tokenizer, answer))
    assert result.trp_text == answer and result.errors == []
    assert result.answer == "cups and a bowl, a man, depth"
    kinds = [(o.phrase, o.units, o.box_xyxy is not None, o.mask is not None, o.keypoints is not None,
              o.depth is not None) for o in result.objects]
    assert kinds == [("cups", ("box",), True, False, False, False)] * 2 + [
        ("a bowl", ("mask",), False, True, False, False), ("a man", ("box", "keypoint"), True, False, True, False),
        ("depth", ("depth",), False, False, False, True)]
    box = result.objects[0].box_xyxy
    assert box.shape == (4,) and 0 <= box[0] <= box[2] <= 80 and 0 <= box[1] <= box[3] <= 60
    assert result.objects[2].mask.shape == (60, 80) and result.objects[4].depth.shape == (60, 80)
    assert result.objects[3].keypoints.shape == (17, 3)
    # the box of <REF> 0 equals the box decoder on the teacher-forced hidden state
    pixels, letterbox = model.processor.image_tensor(image)
    ids = torch.cat([model.processor.prompt_ids("Find things.", 0),
                     torch.tensor([model.llm.tokenizer(answer, add_special_tokens=False).input_ids])], 1)
    with torch.no_grad():
        features = model.encode_images(pixels[None])
        _, hidden = model.llm(model.llm.embed_multimodal(ids, model.image_tokens(features)))
        states = hidden[0, (ids[0] == model.llm.ref_id).nonzero().flatten()]          # [5, D]
        units = [("box",), ("box",), ("mask",), ("box", "keypoint"), ("depth",)]
        routed = model.route_refs([states], [units], [[0, 0, 1, 2, 3]])
        out = model.decoders["box"](routed["box"].embeddings, routed["box"].valid, features.pyramid)
    xyxy = letterbox.boxes_to_image(cxcywh_to_xyxy(out["boxes"][0, :1].double().numpy()) * 64)[0]
    assert np.allclose(box, np.clip(xyxy, 0, [80, 60, 80, 60]), atol=1e-2)
    payload = json.loads(result.to_json())
    assert payload["objects"][2]["mask_rle"]["size"] == [60, 80]
    assert set(payload["timings"]) == {"encode", "prefill", "decode", "decoders", "postprocess"}


def test_malformed_output_goes_to_errors(model):
    from refvlm_core.predictor import Predictor

    predictor = Predictor(model)
    bad = "<Phrase>cup (<Unit>box</Unit>[0]<REF>"
    # unconstrained: under the TRP grammar (the default) this text cannot be written
    result = predictor.predict(mixed_samples()[0].image, "Find the cup.", max_new_tokens=30, constrained=False,
                               logits_hook=forced_answer_hook(model.llm.tokenizer, bad))
    assert result.errors and result.trp_text == bad


def test_predictor_bad_inputs(model):
    from refvlm_core.predictor import Predictor

    predictor = Predictor(model)
    image = mixed_samples()[0].image
    with pytest.raises(InputError, match="uint8"):
        predictor.predict(image.astype(np.float32), "hi")
    with pytest.raises(InputError, match="HxWx3"):
        predictor.predict(image[..., :2], "hi")
    with pytest.raises(InputError, match="empty"):
        predictor.predict(image, "   ")
    with pytest.raises(InputError, match="limit"):
        predictor.predict(image, "x" * 5000)
    with pytest.raises(InputError, match="outside"):
        predictor.predict(image, "what is this?", [VisualPrompt.point(500, 10)])
    with pytest.raises(InputError, match="2 <region> placeholders but 1"):
        predictor.predict(image, "<region> vs <region>", [VisualPrompt.point(5, 10)])


def test_paper_preset_on_meta_device():
    from refvlm_core.model import RefVLM, count_parameters

    with torch.device("meta"):
        model = RefVLM.from_config(preset("paper"))
    counts = {name: count_parameters(getattr(model, name)) for name in ("encoder", "projector", "llm", "decoders")}
    counts["vit"], counts["convnext"] = count_parameters(model.encoder.vit), count_parameters(model.encoder.convnext)
    print("paper preset parameters:", {k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    assert 300e6 < counts["vit"] < 310e6
    assert 190e6 < counts["convnext"] < 200e6
    assert counts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert counts["llm"] == 6_738_415_616 + 2 * 4096 * len(trp.SPECIAL_TOKENS)
    assert 5e6 < counts["decoders"] < 200e6
    assert all(p.device.type == "meta" for p in model.parameters())
