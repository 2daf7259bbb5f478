"""TRP-constrained decoding (constrained.py) on the tiny preset: whatever the logits say,
answers parse with the registered units; jump-forward writes the same text as
token-by-token constrained decoding in fewer forward passes; a cut answer still parses;
the switch off gives the raw model; on_token streams every answer token and the logits
hook sees every position;
only the decoders an answer names run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model_samples import forced_answer_hook
from refvlm_core import trp
from refvlm_core.constrained import TrpGrammar

torch.set_num_threads(1)
IMAGE = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
# tokens that build structure: a hook raises them so that random models write TRP
STRUCTURE = ("<Phrase>", "</Phrase>", "Ġ(", ")", "box", "mask", "key", "depth", "[", "<|im_end|>")


@pytest.fixture(scope="module")
def predictor():
    from refvlm_core.predictor import Predictor

    return Predictor.from_preset("tiny")


def structure_bias(tokenizer, seed: int, scale: float = 4.0):
    """A hook that adds seeded noise and a bonus for structural tokens to the model's own
    logits: the model still decides, pushed towards tags, units and brackets."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in STRUCTURE]
    closers = [tokenizer.convert_tokens_to_ids(t) for t in ("</Phrase>", "Ġ(")]
    generator = torch.Generator().manual_seed(seed)

    def hook(step, logits):
        bias = torch.randn(logits.shape, generator=generator)
        bias[0, ids] += scale + 2 * torch.randn(len(ids), generator=generator)
        bias[0, closers] += 2.0  # phrases that close and open a unit group
        return logits + bias.to(logits.device)
    return hook


def test_every_answer_parses_with_registered_units(predictor):
    units = list(predictor.model.decoders)
    tokenizer = predictor.model.llm.tokenizer
    named = []
    for seed in range(12):
        result = predictor.predict(IMAGE, "Find the red cube.", max_new_tokens=48,
                                   logits_hook=structure_bias(tokenizer, seed))
        parse = trp.parse(result.trp_text, units=units)
        assert parse.ok, (result.trp_text, parse.errors)
        assert len(result.objects) == len(parse.refs)
        named += [u for obj in result.objects for u in obj.units]
    assert named and set(named) <= set(units)  # structure was written, not only free text


def test_unconstrained_random_model_writes_invalid_trp(predictor):
    """The same pushes without the grammar: the check above can fail."""
    units = list(predictor.model.decoders)
    tokenizer = predictor.model.llm.tokenizer
    bad = [not trp.parse(predictor.predict(IMAGE, "Find the red cube.", max_new_tokens=48, constrained=False,
                                           logits_hook=structure_bias(tokenizer, seed)).trp_text, units=units).ok
           for seed in range(4)]
    assert any(bad)


def test_only_registered_units_are_written(predictor):
    llm = predictor.model.llm
    grammar = TrpGrammar(llm.tokenizer, ["box"], llm.stop_ids())
    embeds = llm.causal_lm.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    written = []
    for seed in range(20):
        generation = llm.generate(embeds, 40, grammar=grammar, logits_hook=structure_bias(llm.tokenizer, seed, 6.0))
        parse = trp.parse(generation.text, units=["box"])
        assert parse.ok, (generation.text, parse.errors)
        assert generation.ref_states.shape[0] == len(parse.refs)
        written += [u for site in parse.refs for u in site.units]
    assert written and set(written) == {"box"}


def test_jump_forward_gives_the_same_text_in_fewer_passes(predictor):
    tokenizer = predictor.model.llm.tokenizer
    saved = 0
    for seed in range(8):
        runs = [predictor.predict(IMAGE, "Find the red cube.", max_new_tokens=48, jump_forward=jump,
                                  logits_hook=structure_bias(tokenizer, seed)) for jump in (False, True)]
        step, jump = runs
        assert jump.trp_text == step.trp_text
        assert jump.diagnostics["tokens"] == step.diagnostics["tokens"]
        assert [o.ref_ordinal for o in jump.objects] == [o.ref_ordinal for o in step.objects]
        for a, b in zip(step.objects, jump.objects):
            if a.box_xyxy is not None:
                assert np.allclose(a.box_xyxy, b.box_xyxy, atol=1e-3)
        saved += step.diagnostics["forward_passes"] - jump.diagnostics["forward_passes"]
        assert jump.diagnostics["forward_passes"] <= step.diagnostics["forward_passes"]
    assert saved > 0


def test_forced_unit_block_is_one_pass(predictor):
    """``<Phrase>cube</Phrase> (<Unit>box</Unit>[0]<REF>)``: after " (" the tokens up to the
    box name, and after it up to <REF>, are the grammar's only continuation."""
    tokenizer = predictor.model.llm.tokenizer
    answer = trp.format_phrase("cube", ("box",), 1)
    result = predictor.predict(IMAGE, "Find the cube.", logits_hook=forced_answer_hook(tokenizer, answer))
    assert result.trp_text == answer and not result.errors
    tokens = result.diagnostics["tokens"]  # 12 tokens + the stop
    # passes: prefill, <Phrase>, cube, </Phrase>, " (" + <Unit>, box + </Unit>[0]<REF>, ")"
    assert result.diagnostics["forward_passes"] == 7 < 0.6 * tokens, result.diagnostics


def test_cut_answers_still_parse(predictor):
    units = list(predictor.model.decoders)
    tokenizer = predictor.model.llm.tokenizer
    answer = trp.format_phrase("a red cube", ("keypoint",), 3)
    for budget in range(1, 24):
        result = predictor.predict(IMAGE, "Find the cube.", max_new_tokens=budget,
                                   logits_hook=forced_answer_hook(tokenizer, answer))
        assert result.diagnostics["tokens"] <= budget
        assert trp.parse(result.trp_text, units=units).ok, (budget, result.trp_text)


def test_switch_off_gives_the_raw_model(predictor):
    tokenizer = predictor.model.llm.tokenizer
    invented = "<Phrase>cube</Phrase> (<Unit>keytonumber</Unit>[0]<REF>)"
    raw = predictor.predict(IMAGE, "Find the cube.", constrained=False,
                            logits_hook=forced_answer_hook(tokenizer, invented))
    assert raw.trp_text == invented and raw.diagnostics["constrained"] is False
    assert any("keytonumber" in e for e in raw.errors)
    fixed = predictor.predict(IMAGE, "Find the cube.", logits_hook=forced_answer_hook(tokenizer, invented))
    parse = trp.parse(fixed.trp_text, units=list(predictor.model.decoders))
    assert parse.ok and fixed.trp_text.startswith("<Phrase>cube</Phrase> (<Unit>key"), fixed.trp_text
    # where the hook allows nothing the grammar does, the model's own logits decide
    assert fixed.objects and fixed.objects[0].units[0] == "keypoint"


def test_hook_sees_every_position(predictor):
    """Forced answers rely on it: with jump-forward too, the logits hook is called at every
    position, in order, and the argmax of what it returns is the token generated."""
    tokenizer = predictor.model.llm.tokenizer
    bias = structure_bias(tokenizer, 3)
    seen: list[tuple[int, int]] = []

    def streaming(step, logits):
        out = bias(step, logits)
        seen.append((step, int(out.argmax(-1)[0])))
        return out

    result = predictor.predict(IMAGE, "Find the cube.", max_new_tokens=48, logits_hook=streaming)
    steps = [s for s, _ in seen]
    assert steps == list(range(len(steps)))
    streamed = tokenizer.decode([t for _, t in seen], skip_special_tokens=False).replace("<|im_end|>", "")
    assert streamed == result.trp_text


def test_on_token_streams_every_answer_token(predictor):
    """on_token gets each answer token in order with the text so far, also for the tokens
    jump-forward appends in one pass (the same stream as token by token); what it raises
    ends the prediction (the node cancels a goal that way)."""
    tokenizer = predictor.model.llm.tokenizer
    answer = f"{trp.format_phrase('cups', ('box',), 2)} and {trp.format_phrase('a bowl', ('mask',), 1)}"
    streams = []
    for jump in (True, False):
        seen: list[tuple[int, str]] = []
        result = predictor.predict(IMAGE, "Find the cups.", max_new_tokens=48, jump_forward=jump,
                                   logits_hook=forced_answer_hook(tokenizer, answer),
                                   on_token=lambda token, text: seen.append((token, text)))
        assert seen[-1][1] == result.trp_text == answer
        assert [text for _, text in seen] == [tokenizer.decode([t for t, _ in seen[:k + 1]], skip_special_tokens=False)
                                              for k in range(len(seen))]
        assert result.diagnostics["forward_passes"] < len(seen) or not jump
        streams.append(seen)
    assert streams[0] == streams[1]

    class Stop(Exception):
        pass

    def cancel(token, text):
        raise Stop()

    with pytest.raises(Stop):
        predictor.predict(IMAGE, "Find the cube.", max_new_tokens=48, on_token=cancel)


def test_only_named_decoders_run(predictor):
    calls: dict[str, int] = {}
    handles = [decoder.register_forward_hook(lambda m, i, o, unit=unit: calls.__setitem__(unit, calls.get(unit, 0) + 1))
               for unit, decoder in predictor.model.decoders.items()]
    try:
        answer = f"{trp.format_phrase('cups', ('box',), 2)} and {trp.format_phrase('a bowl', ('mask',), 1)}"
        result = predictor.predict(IMAGE, "Find things.", max_new_tokens=40,
                                   logits_hook=forced_answer_hook(predictor.model.llm.tokenizer, answer))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"box": 1, "mask": 1}  # two box REFs in one batch; no keypoint or depth pass
    assert [o.units for o in result.objects] == [("box",), ("box",), ("mask",)]
    assert all(o.box_xyxy is not None for o in result.objects[:2]) and result.objects[2].mask is not None


def test_runtimes_get_the_same_routing(predictor):
    """Every runtime (torch, ONNX Runtime, TensorRT: Predictor.set_runtime) is asked only
    for the units the answer names."""
    from refvlm_core.runtime import TorchRuntime

    class Recording(TorchRuntime):
        def run_decoders(self, routed, pyramid):
            self.asked += [(unit, int(refs.valid.sum())) for unit, refs in routed.items()]
            return super().run_decoders(routed, pyramid)

    runtime = Recording(predictor.model)
    runtime.asked = []
    predictor.set_runtime(runtime)
    try:
        answer = f"{trp.format_phrase('a man', ('keypoint',), 2)} and {trp.format_phrase('depth', ('depth',), 1)}"
        result = predictor.predict(IMAGE, "Find things.", max_new_tokens=40,
                                   logits_hook=forced_answer_hook(predictor.model.llm.tokenizer, answer))
    finally:
        predictor.set_runtime(None)
    assert sorted(runtime.asked) == [("depth", 1), ("keypoint", 2)]
    assert result.objects[0].keypoints is not None and result.objects[2].depth is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_constrained_decoding_on_cuda():
    from refvlm_core.predictor import Predictor

    gpu = Predictor.from_preset("tiny", device="cuda")
    tokenizer = gpu.model.llm.tokenizer
    for seed in range(3):
        result = gpu.predict(IMAGE, "Find the red cube.", max_new_tokens=48, logits_hook=structure_bias(tokenizer, seed))
        assert trp.parse(result.trp_text, units=list(gpu.model.decoders)).ok
