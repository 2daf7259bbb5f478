"""Int8 LLM weights (refvlm_core.quantize) on the tiny preset: the LLM's linear layers
become int8 (close to float, no int16 saturation), the <REF> states stay close to
float ones, forced answers decode alike, constrained answers still parse; LoRA must be
merged first; the default keeps float weights, ``auto`` is int8 on a CPU. On the shipped
nano model int8 keeps the TRP structure of evaluation answers."""
from __future__ import annotations

import copy
from pathlib import Path

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
    from refvlm_core.quantize import Int8Linear

    assert not any(type(m) is torch.nn.Linear for m in lm.modules())
    assert isinstance(lm.lm_head, Int8Linear) and isinstance(lm.model.layers[0].mlp.down_proj, Int8Linear)


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
    weights = {}
    for flags in (["--quantize", "int8"], [], ["--quantize", "none"]):
        assert main(["infer", str(image_path), "Find the cup.", "--model", str(tmp_path / "model"),
                     *flags, "--json", "--max-new-tokens", "12"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert trp.parse(payload["trp_text"], units=list(float_.model.decoders)).ok
        assert payload["diagnostics"]["constrained"] is True and payload["diagnostics"]["load_s"] > 0
        weights[" ".join(flags)] = payload["diagnostics"]["quantize"]
    assert weights == {"--quantize int8": "int8", "": "int8", "--quantize none": "none"}  # default auto: int8 on a CPU


def test_int8_linear_is_close_to_float_and_does_not_saturate():
    """Int8Linear follows its float layer on ordinary inputs, and on an input built to
    overflow fbgemm's int16 pair sums (every activation at the top of its range, every
    weight at the top of its row). Whether fbgemm sums pairs in int16 depends on the CPU
    (without VNNI it does and saturates above 32767; with VNNI it sums in int32), so the
    test asserts what holds on every CPU: the layer's answer, and the bound that keeps a
    pair sum of 8-bit activations and WEIGHT_LEVEL weights inside int16."""
    from refvlm_core.quantize import WEIGHT_LEVEL, Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 16)
    x = torch.randn(3, 7, 256)
    reference, int8 = linear(x), Int8Linear(linear)
    assert int8(x).shape == reference.shape
    assert (int8(x) - reference).norm() / reference.norm() < 0.02
    assert int8.weight().int_repr().abs().max() <= WEIGHT_LEVEL

    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.weight[:, 0] = -0.5  # keeps the rows' scale at 0.5 / level
        linear.bias.zero_()
    x = torch.full((1, 256), 4.0)
    x[0, 1] = -0.01  # the activation range starts just below zero: 4.0 is level 255
    reference = linear(x)
    int8 = Int8Linear(linear)
    assert torch.allclose(int8(x), reference, rtol=0.01)
    int16_max, activation_max = 32767, 255
    assert 2 * activation_max * 127 > int16_max  # weights at 127 would saturate without VNNI
    assert 2 * activation_max * WEIGHT_LEVEL <= int16_max  # WEIGHT_LEVEL never does


def test_default_keeps_float_and_auto_is_int8_on_cpu(pair, tmp_path):
    from refvlm_core.checkpoint import save_model
    from refvlm_core.predictor import Predictor
    from refvlm_core.quantize import Int8Linear, resolve

    assert resolve("auto", "cpu") == "int8" and resolve("auto", "cuda") == "none" and resolve("none", "cpu") == "none"
    float_, _ = pair
    save_model(float_.model, tmp_path / "model")
    auto, default = Predictor.from_pretrained(tmp_path / "model", quantize="auto"), Predictor.from_pretrained(tmp_path / "model")
    assert auto.quantize == "int8" and isinstance(auto.model.llm.causal_lm.lm_head, Int8Linear)
    assert default.quantize == "none" and type(default.model.llm.causal_lm.lm_head) is torch.nn.Linear
    assert "quantize" in auto.load_phases and auto.load_s >= sum(
        v for k, v in auto.load_phases.items() if k in ("read_weights", "quantize"))


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "nano"
NODE_QUESTIONS = ("Locate the red cube.", "Segment the person.", "Estimate the pose of the person.")


def _structure(text: str) -> tuple:
    parse = trp.parse(text)
    return parse.ok, tuple((block.units, len(block.refs)) for _, block in parse.blocks())


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="models/nano is not shipped here")
def test_int8_keeps_the_shipped_models_answers():
    """Parity on evaluation prompts and the node's questions of the shipped model
    (tools/int8_parity.py measures it on 140, see the README): the same TRP structure and
    units, depth close. Boxes are not compared one by one: the shipped box decoder chooses
    among the towers' object proposals, and int8's small change of a <REF> state can flip a
    near-tied choice to another object (README: its measured cost in REC accuracy)."""
    from refvlm_core.predictor import Predictor
    from refvlm_training.evaluation.runner import eval_items, load_samples

    float_, int8 = (Predictor.from_pretrained(SHIPPED, quantize=kind) for kind in ("none", "int8"))
    samples = list(load_samples("simworld:test:12:11"))
    for task in ("rec", "res", "keypoint", "depth"):
        for item in eval_items(samples, task, limit=2):
            a, b = (p.predict(item.sample.image, item.prompt, item.visual_prompts, system=item.sample.system)
                    for p in (float_, int8))
            assert _structure(a.trp_text) == _structure(b.trp_text), (task, a.trp_text, b.trp_text)
            for x, y in zip(a.objects, b.objects):
                assert (x.box_xyxy is None) == (y.box_xyxy is None), (task, a.trp_text)
                if x.depth is not None:
                    assert np.nanmean(np.abs(x.depth - y.depth) / np.maximum(x.depth, 1e-3)) < 0.1
    # The node's short questions under the default system prompt, where 7-bit activations
    # answered "" for the red cube and a box for the person's mask and pose on this scene.
    for question in NODE_QUESTIONS:
        a, b = (p.predict(samples[0].image, question) for p in (float_, int8))
        assert _structure(a.trp_text) == _structure(b.trp_text), (question, a.trp_text, b.trp_text)


def test_eval_quantize_flag_picks_the_llm_weights(pair, tmp_path, capsys):
    import json

    from refvlm_cli.main import main
    from refvlm_core.checkpoint import save_model

    float_, _ = pair
    save_model(float_.model, tmp_path / "model")
    weights = {}
    for flag in ("auto", "none"):
        out = tmp_path / f"{flag}.json"
        assert main(["eval", "--task", "depth", "--model", str(tmp_path / "model"), "--data", "simworld:test:2",
                     "--limit", "1", "--quantize", flag, "--out", str(out)]) == 0
        weights[flag] = json.loads(out.read_text())["llm_weights"]
    assert weights == {"auto": "int8", "none": "none"}


def test_cache_gives_the_same_layers_and_survives_corruption(pair, tmp_path):
    """The quantised weights are written on the first load and read on the next (the same
    packed layers, so the same logits); a corrupt or foreign cache file is rewritten."""
    from refvlm_core.quantize import quantize_llm

    float_, int8 = pair
    ids = torch.tensor([[5, 6, 7, int8.model.llm.ref_id]])
    expected = int8.model.llm.causal_lm(ids).logits
    cache = tmp_path / "int8-model.safetensors"
    for state in ("missing", "written", "corrupt", "foreign"):
        if state == "corrupt":
            cache.write_bytes(b"not safetensors")
        if state == "foreign":
            from safetensors.torch import save_file

            save_file({"model.layers.0.mlp.up_proj.int8": torch.zeros(2, 2, dtype=torch.int8)}, str(cache))
        llm = copy.deepcopy(float_.model.llm)
        quantize_llm(llm, "int8", cache)
        assert torch.equal(llm.causal_lm(ids).logits, expected), state
        assert cache.stat().st_size > 1000, state  # a complete cache again


def test_cache_file_follows_the_model_and_is_bounded(tmp_path, monkeypatch):
    """The cache is named by the model's config and weights: another model (one byte of
    its weights changed) gets another file; beside one base at most KEPT_CACHE_FILES stay."""
    import shutil

    from refvlm_core.checkpoint import load_config
    from refvlm_core.quantize import KEPT_CACHE_FILES, _write_cache, cache_file, quantize_weight

    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("models/nano is not shipped here")
    monkeypatch.setenv("REFVLM_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(SHIPPED)
    config.cache_dir = None
    other = tmp_path / "other"
    shutil.copytree(SHIPPED, other)
    with open(other / "model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    first, second = cache_file(config, SHIPPED), cache_file(config, other)
    assert first != second and first.parent == second.parent and str(first).startswith(str(tmp_path / "cache"))
    assert cache_file(config, SHIPPED) == first
    weights = {"layer": quantize_weight(torch.randn(4, 8))}
    for index in range(KEPT_CACHE_FILES + 2):
        _write_cache(first.parent / f"int8-{index}.safetensors", weights)
    kept = sorted(f.name for f in first.parent.glob("int8-*.safetensors"))
    assert len(kept) == KEPT_CACHE_FILES and f"int8-{KEPT_CACHE_FILES + 1}.safetensors" in kept
