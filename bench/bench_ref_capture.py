"""REF capture cost: our KV-cache loop that reads each <REF>'s final-norm state vs plain
transformers ``generate`` vs ``generate(output_hidden_states=True)``, on the tiny LLM and
on SmolLM2-135M. Every method decodes the same tokens: stop tokens are banned and a
<REF> is forced every 8th step. Target: capture / plain <= 1.05.

    python bench/bench_ref_capture.py [--new-tokens 64] [--prompt-tokens 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from refvlm_core.config import preset
from refvlm_core.llm import RefLLM

REF_EVERY = 8


def make_hook(llm: RefLLM):
    banned = sorted(llm.stop_ids())

    def hook(step: int, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, banned] = -float("inf")
        if step % REF_EVERY == REF_EVERY - 1:
            logits[:, :] = -float("inf")
            logits[:, llm.ref_id] = 0.0
        return logits
    return hook


def hf_processor(llm: RefLLM):
    from transformers import LogitsProcessor, LogitsProcessorList

    hook = make_hook(llm)

    class Same(LogitsProcessor):
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores):
            self.start = input_ids.shape[1] if self.start is None else self.start
            return hook(input_ids.shape[1] - self.start, scores)
    return lambda: LogitsProcessorList([Same()])


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bench(name: str, llm: RefLLM, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (1, prompt_tokens))
    embeds = llm.embed_multimodal(ids)
    model, processors = llm.lm.eval(), hf_processor(llm)
    common = dict(inputs_embeds=embeds, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=llm.tokenizer.pad_token_id or 0)
    # same tokens from each path
    ours = llm.generate(embeds, new_tokens, logits_hook=make_hook(llm))
    with torch.no_grad():
        theirs = model.generate(**common, logits_processor=processors())
    assert ours.token_ids == theirs[0, -new_tokens:].tolist(), "paths decoded different tokens"
    assert ours.ref_states.shape[0] == ours.token_ids.count(llm.ref_id) >= new_tokens // REF_EVERY

    def plain():
        with torch.no_grad():
            model.generate(**common, logits_processor=processors())

    def all_hidden():
        with torch.no_grad():
            model.generate(**common, logits_processor=processors(), output_hidden_states=True,
                           return_dict_in_generate=True)

    def capture():
        llm.generate(embeds, new_tokens, logits_hook=make_hook(llm))

    def loop_no_capture():
        llm.generate(embeds, new_tokens, logits_hook=make_hook(llm), capture_refs=False)

    times = {"plain_generate": timed(plain, repeats), "output_hidden_states": timed(all_hidden, repeats),
             "capture": timed(capture, repeats), "our_loop_no_capture": timed(loop_no_capture, repeats)}
    print(f"{name:>14}: " + "  ".join(f"{k} {v * 1000:7.1f} ms" for k, v in times.items()))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for label, preset_name in (("tiny", "tiny"), ("SmolLM2-135M", "nano")):
        torch.manual_seed(0)
        results[label] = bench(label, RefLLM.from_config(preset(preset_name)), args.prompt_tokens,
                               args.new_tokens, args.repeats)
    print(f"\n{args.new_tokens} new tokens after {args.prompt_tokens} prompt tokens, "
          f"a <REF> every {REF_EVERY}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'model':>14} | capture/plain | hidden_states/plain | capture/own loop without capture")
    for label, t in results.items():
        print(f"{label:>14} | {t['capture'] / t['plain_generate']:13.3f} | "
              f"{t['output_hidden_states'] / t['plain_generate']:19.3f} | "
              f"{t['capture'] / t['our_loop_no_capture']:.3f}")


if __name__ == "__main__":
    main()
