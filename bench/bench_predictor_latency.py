"""What a query costs on CPU, today's path against each improvement, side by side in one run.

Real SimWorld questions (evaluation prompts of rec, res, keypoint and depth), one query
per item and variant, the variants interleaved item by item so that machine noise hits
them alike. Variants, each adding one change to the one before:

    today        LoRA adapters unmerged, free decoding, every decoder runs
    +merged      LoRA folded into the base weights at load, and the Predictor's own Llama
                 (refvlm_core.llama) for a GGUF base instead of transformers'
    +named       only the decoders the answer names run
    +grammar     TRP-constrained decoding, one forward pass per token
    +jump        jump-forward: forced tokens (and the </Unit>[0]<REF> draft) in one pass
    +prefix      the prompt's constant start (chat template, system prompt) prefilled once:
                 the Predictor's float path (quantize="none")
    +int8        int8 LLM weights (refvlm_core.quantize): what the node and `refvlm infer`
                 run on a CPU by default (quantize="auto")

and ``generate``: plain transformers ``generate`` of the same merged LLM (transformers'
Llama) on the same prompt, as many tokens, greedy. ``--answers model`` (default) lets the model answer;
``--answers reference`` forces each item's reference answer through the logits hook (for
an untrained model: every variant then writes the same typical TRP answer).

    python bench/bench_predictor_latency.py [--model models/nano] [--items 6] [--threads 1]
    python bench/bench_predictor_latency.py --model nano --answers reference   # preset + LoRA

Prints per variant: ms per generated token (decode), forward passes per answer and per
token, decoder time and end-to-end query time, each also as a ratio to ``today``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from refvlm_core import trp
from refvlm_core.router import RoutedRefs
from refvlm_core.runtime import TorchRuntime

TASKS = ("rec", "res", "keypoint", "depth")
VARIANTS = ("today", "+merged", "+named", "+grammar", "+jump", "+prefix", "+int8")
CONSTRAINED = ("+grammar", "+jump", "+prefix", "+int8")  # [1:]: with jump-forward
PREFIX_CACHES: dict[int, object] = {}  # id(predictor) -> its prompt-prefix cache


class EveryDecoder(TorchRuntime):
    """Today's routing: every registered decoder runs, also those with no <REF>."""

    def run_decoders(self, routed, pyramid):
        full = dict(routed)
        for unit in self.model.decoders:
            if unit not in full:
                some = next(iter(routed.values()))
                full[unit] = RoutedRefs(torch.zeros_like(some.embeddings), torch.zeros_like(some.valid),
                                        torch.full_like(some.ordinals, -1), torch.full_like(some.group_ids, -1))
        outputs = self.model.run_decoders(full, pyramid)
        return {unit: outputs[unit] for unit in routed}


def load_predictors(name: str):
    """(unmerged, merged, int8, generate's) Predictors: a checkpoint folder loaded each way
    (generate's: merged, with transformers' Llama), or a preset with random LoRA adapters
    (r=16 on every linear layer, as the nano recipe trains)."""
    from refvlm_core.checkpoint import load_model
    from refvlm_core.config import PRESET_NAMES
    from refvlm_core.predictor import Predictor
    from refvlm_core.quantize import quantize_llm

    if name not in PRESET_NAMES:
        return (Predictor.from_pretrained(name, merge_lora=False, quantize="none"),
                Predictor.from_pretrained(name, quantize="none"), Predictor.from_pretrained(name, quantize="int8"),
                Predictor(load_model(name, merge_lora=True)))
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    predictor = Predictor.from_preset(name)
    llm = predictor.model.llm
    llm.lm = get_peft_model(llm.lm, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for param_name, param in llm.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 1e-3)
    merged = Predictor(copy.deepcopy(predictor.model))
    merged.model.llm.lm = merged.model.llm.lm.merge_and_unload()
    int8 = Predictor(copy.deepcopy(merged.model))
    quantize_llm(int8.model.llm, "int8")
    return predictor, merged, int8, merged


def eval_items(count: int):
    from refvlm_training.evaluation.runner import eval_items as items_of, load_samples

    per_task = max(1, count // len(TASKS))
    items = []
    for task in TASKS:
        items += items_of(load_samples(f"simworld:test:{4 * per_task}:7"), task, limit=per_task)
    return items[:count]


def forced(tokenizer, text: str):
    script = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def hook(step, logits):
        out = torch.full_like(logits, -float("inf"))
        out[0, script[min(step, len(script) - 1)]] = 0.0
        return out
    return hook


def run_variant(variant: str, predictors, item, answers: str):
    unmerged, merged, int8, _ = predictors
    predictor = {"today": unmerged, "+int8": int8}.get(variant, merged)
    PREFIX_CACHES.setdefault(id(predictor), predictor.prefix_cache)
    predictor.prefix_cache = PREFIX_CACHES[id(predictor)] if variant in ("+prefix", "+int8") else None
    old_routing = variant in ("today", "+merged")
    predictor.set_runtime(EveryDecoder(predictor.model) if old_routing else None)
    hook = forced(predictor.model.llm.tokenizer, item.answer.text) if answers == "reference" else None
    start = time.perf_counter()
    result = predictor.predict(item.sample.image, item.prompt, item.visual_prompts, logits_hook=hook,
                               system=item.sample.system, constrained=variant in CONSTRAINED,
                               jump_forward=variant in CONSTRAINED[1:])
    result.timings["total"] = time.perf_counter() - start
    predictor.set_runtime(None)
    return result


def plain_generate_ms(merged, item, tokens: int) -> float:
    """ms per decoded token of transformers ``generate`` on the same prompt embeddings."""
    model = merged.model
    pixels, letterbox = merged.processor.image_tensor(item.sample.image)
    masks = merged.processor.region_masks(item.visual_prompts, letterbox)
    ids = merged.processor.prompt_ids(item.prompt, len(item.visual_prompts), item.sample.system)
    with torch.no_grad():
        features = model.encode_images(pixels[None])
        embeds = model.llm.embed_multimodal(ids, model.image_tokens(features),
                                            model.region_tokens(features, masks, [len(masks)]))
        lm = model.llm.causal_lm
        times = []
        for n in (1, tokens):
            start = time.perf_counter()
            lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=model.llm.tokenizer.eos_token_id)
            times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / max(tokens - 1, 1) * 1000


def summarise(rows: dict[str, list]) -> dict[str, dict[str, float]]:
    out = {}
    for variant, results in rows.items():
        tokens = [r.diagnostics["tokens"] for r in results]
        passes = [r.diagnostics["forward_passes"] for r in results]
        out[variant] = {
            "ms/token": sum(r.timings["decode"] for r in results) / max(sum(tokens) - len(tokens), 1) * 1000,
            "ms/pass": sum(r.timings["decode"] for r in results) / max(sum(passes) - len(passes), 1) * 1000,
            "passes": statistics.mean(passes), "passes/token": sum(passes) / sum(tokens),
            "tokens": statistics.mean(tokens),
            "encode ms": statistics.mean(r.timings["encode"] for r in results) * 1000,
            "prefill ms": statistics.mean(r.timings["prefill"] for r in results) * 1000,
            "decoders ms": statistics.mean(r.timings["decoders"] for r in results) * 1000,
            "total ms": statistics.mean(r.timings["total"] for r in results) * 1000,
            "valid TRP": statistics.mean(trp.parse(r.trp_text).ok for r in results),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/nano", help="checkpoint folder or preset name")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--answers", choices=("model", "reference"), default="model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    predictors = load_predictors(args.model)
    print(f"{args.model}: loaded in {time.perf_counter() - start:.1f} s; {args.threads} thread(s); "
          f"answers: {args.answers}")
    items = eval_items(args.items)
    for variant in VARIANTS:  # warm-up (also builds the grammar once)
        run_variant(variant, predictors, items[0], args.answers)
    rows: dict[str, list] = {v: [] for v in VARIANTS}
    generate_ms = []
    for item in items:
        for variant in VARIANTS:
            rows[variant].append(run_variant(variant, predictors, item, args.answers))
        generate_ms.append(plain_generate_ms(predictors[3], item, max(rows["+jump"][-1].diagnostics["tokens"], 2)))
    print_table(summarise(rows), statistics.mean(generate_ms), items, rows)


def print_table(summary, generate_ms: float, items, rows) -> None:
    keys = ("ms/token", "ms/pass", "passes", "passes/token", "tokens", "encode ms", "prefill ms", "decoders ms", "total ms",
            "valid TRP")
    print(f"{len(items)} questions ({', '.join(sorted({i.sample.task for i in items}))}); "
          f"e.g. {items[0].prompt!r} -> {rows['+jump'][0].trp_text!r}")
    print(f"{'variant':>9} | " + " | ".join(f"{k:>12}" for k in keys) + " | total vs today | ms/token vs generate")
    base = summary["today"]
    for variant, values in summary.items():
        print(f"{variant:>9} | " + " | ".join(f"{values[k]:12.2f}" for k in keys)
              + f" | {base['total ms'] / values['total ms']:13.2f}x | {values['ms/token'] / generate_ms:10.2f}x")
    print(f" generate | {generate_ms:12.2f} ms/token (transformers generate, merged LLM, same prompt)")
    for variant in ("+jump", "+prefix", "+int8"):
        best = summary[variant]
        label = {"+prefix": " (float: quantize none)", "+int8": " (the node's default on a CPU)"}.get(variant, "")
        print(f"{variant}{label} vs today: {base['total ms'] / best['total ms']:.2f}x faster end to end, "
              f"{best['passes/token']:.2f} forward passes per token, {best['ms/token'] / generate_ms:.2f}x "
              f"generate's time per token")
    print(f"one decode pass vs one generate token: {summary['+merged']['ms/pass'] / generate_ms:.2f}x fp32 (+merged), "
          f"{summary['+int8']['ms/pass'] / generate_ms:.2f}x int8 (+int8)")


if __name__ == "__main__":
    main()
