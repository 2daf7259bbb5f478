"""The prompt-prefix KV cache (prefix_cache.py) on the tiny preset: a second query reuses
the keys and values of the prompt's constant start, and answers as without the cache."""
from __future__ import annotations

import torch

from model_samples import forced_answer_hook
from refvlm_core import trp
from refvlm_core.prefix_cache import PromptPrefixCache
from test_constrained_decoding import IMAGE, structure_bias

torch.set_num_threads(1)


def _fresh_cache(predictor):
    return PromptPrefixCache((predictor.model.llm.image_id, predictor.model.llm.region_id))


def test_second_query_reuses_the_prefix_and_answers_alike():
    from refvlm_core.predictor import Predictor

    predictor = Predictor.from_preset("tiny")
    tokenizer = predictor.model.llm.tokenizer
    answer = trp.format_phrase("the blue cube", ("box",), 1)
    runs = {}
    for cached in (False, True):
        predictor.prefix_cache = _fresh_cache(predictor) if cached else None
        first = predictor.predict(IMAGE, "Find the red cube.", logits_hook=structure_bias(tokenizer, 1))
        second = predictor.predict(IMAGE, "Find the blue cube.", logits_hook=forced_answer_hook(tokenizer, answer))
        other = predictor.predict(IMAGE, "Find the blue cube.", system="Answer briefly.",
                                  logits_hook=structure_bias(tokenizer, 2))
        runs[cached] = (first, second, other)
    plain, cached = runs[False], runs[True]
    assert [r.diagnostics["prefix_reused"] for r in plain] == [0, 0, 0]
    first, second, other = cached
    ids = predictor.processor.prompt_ids("Find the blue cube.", 0)[0].tolist()
    assert first.diagnostics["prefix_reused"] == 0
    assert second.diagnostics["prefix_reused"] == ids.index(predictor.model.llm.image_id)
    assert 0 < other.diagnostics["prefix_reused"] < second.diagnostics["prefix_reused"]  # another system prompt
    assert [r.trp_text for r in plain] == [r.trp_text for r in cached]
    assert second.trp_text == answer
    assert torch.allclose(torch.tensor(plain[1].objects[0].box_xyxy), torch.tensor(second.objects[0].box_xyxy),
                          atol=1e-3)
