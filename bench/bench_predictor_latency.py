"""Predictor latency per stage on CPU (encode, prefill, decode, decoders, postprocess)
for the tiny and nano presets; decoding is forced to a fixed-length TRP answer so every
decoder runs and every run decodes the same number of tokens.

    python bench/bench_predictor_latency.py [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from refvlm_core import trp
from refvlm_core.predictor import Predictor

STAGES = ("encode", "prefill", "decode", "decoders", "postprocess")
ANSWER = (f"{trp.format_phrase('cups', ('box',), 2)}, {trp.format_phrase('a bowl', ('mask',), 1)}, "
          f"{trp.format_phrase('a man', ('box', 'keypoint'), 1)}, {trp.format_phrase('depth', ('depth',), 1)}")


def forced(tokenizer):
    script = tokenizer(ANSWER, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def hook(step, logits):
        out = torch.full_like(logits, -float("inf"))
        out[0, script[min(step, len(script) - 1)]] = 0.0
        return out
    return hook, len(script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from skimage import data

    image = np.ascontiguousarray(data.astronaut())  # 512 x 512 RGB
    print(f"image {image.shape[1]}x{image.shape[0]}, {args.threads} thread(s), median of {args.repeats} (ms)")
    print(f"{'preset':>6} | " + " | ".join(f"{s:>11}" for s in STAGES) + " |  total | tokens")
    for name in ("tiny", "nano"):
        predictor = Predictor.from_preset(name)
        hook, tokens = forced(predictor.model.llm.tokenizer)
        runs = []
        for _ in range(args.repeats + 1):
            result = predictor.predict(image, "What is <region>?", [predictor_prompt()], logits_hook=hook,
                                       max_new_tokens=tokens)
            assert len(result.objects) == 5 and not result.errors, result.errors
            runs.append(result.timings)
        runs = runs[1:]  # first run warms up
        median = {s: statistics.median(r[s] for r in runs) * 1000 for s in STAGES}
        print(f"{name:>6} | " + " | ".join(f"{median[s]:11.1f}" for s in STAGES)
              + f" | {sum(median.values()):6.0f} | {tokens}")


def predictor_prompt():
    from refvlm_core.visual_prompts import VisualPrompt

    return VisualPrompt.box(150, 40, 350, 250)


if __name__ == "__main__":
    main()
