"""Int8 LLM weights (refvlm_core.quantize) on the tiny preset: the LLM's linear layers
become int8, the <REF> states stay close to float ones, forced answers decode alike,
constrained answers still parse; LoRA must be merged first."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model_samples import forced_answer_hook, mixed_samples
from refvlm_core import trp
from refvlm_core.errors import ConfigError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    from refvlm_core.predictor import Predictor
    from refvlm_core.quantize import quantize_llm

    float_ = Predictor.from_preset("tiny")
    int8 = Predictor(copy.deepcopy(float_.model))
    quantize_llm(int8.model.llm, "int8")
    return float_, int8


def test_linear_layers_are_int8(pair):
    _, int8 = pair
    lm = int8.model.llm.causal_lm
    assert not any(type(m) is torch.nn.Linear for m in lm.modules())
    assert "quantized" in type(lm.lm_head).__module__


def test_ref_states_and_boxes_stay_close(pair):
    answer = f"{trp.format_phrase('cups', ('box',), 2)} and {trp.format_phrase('a bowl', ('mask',), 1)}"
    image = mixed_samples()[0].image
    states, results = [], []
    for predictor in pair:
        llm = predictor.model.llm
        embeds = llm.causal_lm.get_input_embeddings()(torch.tensor([[5, 6, 7, llm.ref_id]]))
        states.append(llm.hidden_states(embeds)[0, -1])
        results.append(predictor.predict(image, "Find things.", max_new_tokens=40,
                                         logits_hook=forced_answer_hook(llm.tokenizer, answer)))
    assert torch.cosine_similarity(states[0], states[1], dim=0) > 0.99
    assert not torch.equal(states[0], states[1])  # the weights did change
    a, b = results
    assert a.trp_text == b.trp_text == answer
    for x, y in zip(a.objects, b.objects):
        if x.box_xyxy is not None:  # pixels of an 80x60 image
            assert np.abs(x.box_xyxy - y.box_xyxy).max() < 2.0


def test_constrained_answers_parse(pair):
    _, int8 = pair
    units = list(int8.model.decoders)
    image = mixed_samples()[0].image
    for budget in (8, 24, 40):
        result = int8.predict(image, "Find the cup.", max_new_tokens=budget)
        assert trp.parse(result.trp_text, units=units).ok


def test_refuses_unknown_kind_and_unmerged_lora(pair):
    from refvlm_core.quantize import quantize_llm

    float_, _ = pair
    with pytest.raises(ConfigError, match="int8"):
        quantize_llm(float_.model.llm, "int3")
    from peft import LoraConfig, get_peft_model

    llm = copy.deepcopy(float_.model.llm)
    llm.lm = get_peft_model(llm.lm, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="merging"):
        quantize_llm(llm, "int8")


def test_infer_cli_int8(pair, tmp_path, capsys):
    import json

    import cv2

    from refvlm_cli.main import main
    from refvlm_core.checkpoint import save_model

    float_, _ = pair
    save_model(float_.model, tmp_path / "model")
    image_path = tmp_path / "in.png"
    cv2.imwrite(str(image_path), mixed_samples()[0].image[..., ::-1])
    assert main(["infer", str(image_path), "Find the cup.", "--model", str(tmp_path / "model"),
                 "--quantize", "int8", "--json", "--max-new-tokens", "12"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert trp.parse(payload["trp_text"], units=list(float_.model.decoders)).ok
    assert payload["diagnostics"]["constrained"] is True and payload["diagnostics"]["load_s"] > 0
