"""Loading for inference: LoRA adapters of an over_base file are merged into the base
weights once (Predictor.from_pretrained), with the same answers as the unmerged model;
the file keeps its unmerged adapters; load time is reported. Tiny preset."""
from __future__ import annotations

import pytest
import torch

from model_samples import forced_answer_hook, mixed_samples
from refvlm_core import trp
from refvlm_core.config import preset

torch.set_num_threads(1)
SEED = 0


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    """An over_base folder of a tiny model whose LoRA adapters moved away from zero."""
    from refvlm_core.checkpoint import save_model
    from refvlm_core.model import RefVLM
    from refvlm_training.engine.config import config_from_dict
    from refvlm_training.engine.stages import configure_stage

    torch.manual_seed(SEED)
    model = RefVLM.from_config(preset("tiny"))
    configure_stage(model, config_from_dict({
        "stage": 2, "steps": 1, "data": {"train": "unused"}, "model": {"preset": "tiny"},
        "lora": {"enabled": True, "r": 4, "alpha": 8,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    folder = tmp_path_factory.mktemp("lora")
    save_model(model, folder, mode="over_base", dtype="float32")
    return folder


def _predictor(folder, merge: bool):
    from refvlm_core.predictor import Predictor

    torch.manual_seed(SEED)  # tiny's base LLM is its seeded random init
    return Predictor.from_pretrained(folder, merge_lora=merge, quantize="none")  # float: exact comparisons


def test_merged_lora_gives_the_same_answers(saved_lora):
    from refvlm_core.checkpoint import has_lora
    from safetensors import safe_open

    merged, unmerged = _predictor(saved_lora, True), _predictor(saved_lora, False)
    assert not has_lora(merged.model) and has_lora(unmerged.model)
    with safe_open(str(saved_lora / "model.safetensors"), framework="pt") as handle:
        assert any(k.startswith("llm.lora.") for k in handle.keys())  # stored format unchanged
    image = mixed_samples()[0].image
    answer = f"{trp.format_phrase('cups', ('box',), 2)} and {trp.format_phrase('a bowl', ('mask',), 1)}"
    for constrained in (True, False):
        free = [p.predict(image, "Describe the image.", max_new_tokens=24, constrained=constrained)
                for p in (merged, unmerged)]
        assert free[0].trp_text == free[1].trp_text
        forced = [p.predict(image, "Find things.", max_new_tokens=40, constrained=constrained,
                            logits_hook=forced_answer_hook(p.model.llm.tokenizer, answer)) for p in (merged, unmerged)]
        assert forced[0].trp_text == forced[1].trp_text == answer
        for a, b in zip(*(r.objects for r in forced)):
            if a.box_xyxy is not None:
                assert abs(a.box_xyxy - b.box_xyxy).max() < 1e-3
    assert merged.load_s is not None and free[0].diagnostics["load_s"] == merged.load_s


def test_merge_keeps_what_the_adapters_learned(saved_lora):
    """The merged REF states equal the unmerged ones and differ from the bare base's."""
    from refvlm_core.model import RefVLM

    merged, unmerged = _predictor(saved_lora, True), _predictor(saved_lora, False)
    torch.manual_seed(SEED)
    bare = RefVLM.from_config(preset("tiny")).eval()
    states = []
    for model in (merged.model, unmerged.model, bare):
        embeds = model.llm.causal_lm.get_input_embeddings()(torch.tensor([[5, 6, 7, model.llm.ref_id]]))
        states.append(model.llm.hidden_states(embeds)[0, -1])
    assert torch.allclose(states[0], states[1], atol=1e-5)
    assert not torch.allclose(states[0], states[2], atol=1e-3)


def test_folded_weights_equal_peft_merge(saved_lora):
    """The merge at load (no peft) gives exactly the weights of peft's merge_and_unload."""
    merged, unmerged = _predictor(saved_lora, True), _predictor(saved_lora, False)
    unmerged.model.llm.lm = unmerged.model.llm.lm.merge_and_unload()
    ours, peft_merged = merged.model.llm.causal_lm.state_dict(), unmerged.model.llm.causal_lm.state_dict()
    assert ours.keys() == peft_merged.keys()
    different = [k for k in ours if not torch.equal(ours[k], peft_merged[k])]
    assert not different, different[:5]
