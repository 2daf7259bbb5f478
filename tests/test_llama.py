"""refvlm_core.llama, the inference Llama in plain torch: the parameter names and the
outputs of transformers' LlamaForCausalLM (full prompt, padded batch, decoding with a
cache, a cropped draft), the shipped model answers alike with either, and loading it
imports neither transformers' model code nor torchvision nor torch's compiler."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refvlm_core import llama

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "nano"
ARCH = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 101, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "max_position_embeddings": 256, "rope_theta": 50000.0}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers' model, ours loaded from its saved folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**ARCH)).eval()
    folder = tmp_path_factory.mktemp("llama")
    reference.save_pretrained(str(folder))
    return reference, llama.load(folder).eval()


def test_same_parameter_names_and_values(pair):
    reference, ours = pair
    theirs, mine = dict(reference.named_parameters()), dict(ours.named_parameters())
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied, as the config says


def test_same_outputs_full_padded_and_cached(pair):
    from transformers import DynamicCache

    reference, ours = pair
    ids = torch.randint(0, ARCH["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-5)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # right padding, as training batches have
        a = ours.model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)
        # prefill 5, then a 3-token chunk whose last 2 are a rejected draft, then 1 token
        mine, theirs = llama.KVCache(), DynamicCache(config=reference.config)
        outputs = []
        for model, cache in ((ours, mine), (reference, theirs)):
            run = lambda part: model.model(input_ids=part, past_key_values=cache, use_cache=True).last_hidden_state  # noqa: E731
            first, chunk = run(ids[:1, :5]), run(ids[:1, 5:8])
            cache.crop(-2)
            outputs.append(torch.cat([first, chunk[:, :1], run(ids[:1, 6:7])], dim=1))
        assert mine.get_seq_length() == theirs.get_seq_length() == 7
        assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
        assert torch.allclose(outputs[0][0], ours.model(input_ids=ids[:1, :7]).last_hidden_state[0], atol=1e-5)


def test_other_configs_are_left_to_transformers():
    base = {"model_type": "llama", "hidden_act": "silu"}
    assert llama.is_plain(base)
    assert not llama.is_plain({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert not llama.is_plain({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}})
    assert not llama.is_plain({**base, "attention_bias": True})
    assert not llama.is_plain({**base, "model_type": "mistral"})


shipped = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="models/nano is not shipped here")


@shipped
def test_shipped_model_answers_alike_with_either_llama():
    """Float weights: ours (Predictor.from_pretrained) against transformers' (the loader
    without ``inference``) on evaluation prompts and the node's questions: the same text."""
    from refvlm_core.checkpoint import load_model
    from refvlm_core.predictor import Predictor
    from refvlm_training.evaluation.runner import eval_items, load_samples

    ours = Predictor.from_pretrained(SHIPPED, quantize="none")
    theirs = Predictor(load_model(SHIPPED, merge_lora=True))
    assert isinstance(ours.model.llm.causal_lm, llama.LlamaForCausalLM)
    assert not isinstance(theirs.model.llm.causal_lm, llama.LlamaForCausalLM)
    samples = list(load_samples("simworld:test:8:11"))
    asked = [(item.sample.image, item.prompt, item.visual_prompts, item.sample.system)
             for task in ("rec", "keypoint") for item in eval_items(samples, task, limit=2)]
    asked += [(samples[0].image, question, (), None) for question in ("Locate the red cube.", "Segment the person.")]
    for image, prompt, visual_prompts, system in asked:
        a, b = (p.predict(image, prompt, visual_prompts, system=system) for p in (ours, theirs))
        assert a.trp_text == b.trp_text, prompt
        for x, y in zip(a.objects, b.objects):
            if x.box_xyxy is not None:
                assert abs(x.box_xyxy - y.box_xyxy).max() < 1e-2


@shipped
def test_loading_the_shipped_model_skips_heavy_imports():
    """Once the base is converted (the first load of a fresh machine uses transformers to
    read the GGUF) and the int8 weights are cached, as on a robot after its first start."""
    from refvlm_core.predictor import Predictor

    Predictor.from_pretrained(SHIPPED, quantize="auto")
    code = ("import sys; from refvlm_core.predictor import Predictor; Predictor.from_pretrained('models/nano'); "
            "heavy = ['transformers.models.llama.modeling_llama', 'torchvision', 'torch._dynamo', 'timm', "
            "'open_clip']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
