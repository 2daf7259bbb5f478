"""Predictor: image + prompt (+ visual prompts) -> Result in original image pixels.

Stages timed in ``Result.timings`` (seconds): encode (encoders, projector, aggregation),
prefill, decode, decoders (router + unit decoders), postprocess (back to pixels).
Bad user input raises InputError; model output that is not valid TRP never raises: the
parser's problems go to ``Result.errors`` and every well-formed block is still decoded.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from refvlm_core import trp
from refvlm_core.config import ModelConfig, preset
from refvlm_core.constrained import TrpGrammar
from refvlm_core.errors import InputError
from refvlm_core.geometry import validate_image
from refvlm_core.geometry import Letterbox
from refvlm_core.load_timing import phase, recording
from refvlm_core.prefix_cache import PromptPrefixCache
from refvlm_core.model import RefVLM
from refvlm_core.results import ReferredObject, Result
from refvlm_core.router import routing_problems
from refvlm_core.runtime import Runtime, TorchRuntime
from refvlm_core.visual_prompts import VisualPrompt, validate


class Predictor:
    def __init__(self, model: RefVLM, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = model.processor
        self.config: ModelConfig = model.config
        self.runtime: Runtime = TorchRuntime(self.model)  # encoders, projector, decoders
        self.runtime_reason = "default"  # why this runtime (diagnostics)
        self._grammar: TrpGrammar | None = None
        self.load_s: float | None = None  # seconds from_pretrained took (diagnostics)
        self.load_phases: dict[str, float] = {}  # where they went (load_timing)
        self.quantize = "none"  # the LLM's weights: none (float) or int8
        llm = model.llm
        # KV of the prompt's constant start, reused by every query; None turns it off
        self.prefix_cache: PromptPrefixCache | None = (
            PromptPrefixCache((llm.image_id, llm.region_id)) if llm.tokenizer is not None else None)

    def set_runtime(self, runtime: Runtime | None, reason: str = "") -> None:
        """Run encoders, projector and decoders through ``runtime`` (e.g. an ONNX Runtime
        export: refvlm_export.runtime.select_runtime); None restores the model's modules."""
        self.runtime = runtime or TorchRuntime(self.model)
        self.runtime_reason = reason or ("set" if runtime else "default")

    @classmethod
    def from_preset(cls, name: str, device: str = "cpu", seed: int = 0) -> "Predictor":
        """A preset's model as built (random parts seeded): for tests and demos."""
        torch.manual_seed(seed)
        return cls(RefVLM.from_config(preset(name)), device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", merge_lora: bool = True,
                        quantize: str = "none") -> "Predictor":
        """``merge_lora``: LoRA folded into the base weights at load (same answers, faster).
        ``quantize``: LLM weights (refvlm_core.quantize): "none" (float), "int8" (CPU) or
        "auto" (int8 on a CPU, float on a GPU). ``load_s`` and ``load_phases`` say where the
        load went."""
        from refvlm_core.checkpoint import load_model
        from refvlm_core.quantize import cache_file, quantize_llm, resolve

        kind = resolve(quantize, device)
        start = time.perf_counter()
        with recording() as phases:
            merge = merge_lora or kind != "none"
            predictor = cls(load_model(path, merge_lora=merge, inference=merge), device)
            with phase("quantize"):
                cache = cache_file(predictor.config, path) if kind == "int8" else None
                quantize_llm(predictor.model.llm, kind, cache)
        predictor.load_s, predictor.load_phases = time.perf_counter() - start, phases
        predictor.quantize = kind
        return predictor

    def grammar(self) -> TrpGrammar:
        """The TRP grammar over this model's tokenizer and registered decoders (built once)."""
        if self._grammar is None:
            self._grammar = TrpGrammar(self.model.llm.tokenizer, tuple(self.model.decoders),
                                       self.model.llm.stop_ids())
        return self._grammar

    # ---- input checks -----------------------------------------------------------------
    def check_inputs(self, image: Any, prompt: Any, visual_prompts: Sequence[VisualPrompt],
                     max_prompt_chars: int = 0, limit_name: str = "max_prompt_chars") -> np.ndarray:
        """The rules every caller's input meets (the CLI's, the node's, the MCP server's);
        raises InputError saying what to change. ``max_prompt_chars``: a caller's own tighter
        limit, named ``limit_name`` in the error (0: the model's, ModelConfig.max_prompt_chars)."""
        image = validate_image(image)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty: ask a question, e.g. 'Find the red cup.'")
        limit, name = self.config.max_prompt_chars, "ModelConfig.max_prompt_chars"
        if 0 < max_prompt_chars < limit:
            limit, name = max_prompt_chars, limit_name
        if len(prompt) > limit:
            raise InputError(f"the prompt has {len(prompt)} characters; the limit is {limit} ({name}): shorten it")
        for prompt_ in visual_prompts:
            if not isinstance(prompt_, VisualPrompt):
                raise InputError(f"visual prompts must be VisualPrompt objects, got {type(prompt_).__name__}")
            validate(prompt_, image.shape[0], image.shape[1])
        return image

    # ---- prediction -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: np.ndarray, prompt: str, visual_prompts: Sequence[VisualPrompt] = (),
                max_new_tokens: int | None = None, logits_hook=None, system: str | None = None,
                constrained: bool | None = None, jump_forward: bool = True, on_token=None) -> Result:
        """``system``: the task's system instruction (the config's default when None).
        ``constrained``: decode under the TRP grammar (None: ``config.llm.constrained``).
        ``on_token(token_id, answer_so_far)``: streaming, called for each answer token as it
        is chosen (``RefLLM.generate``); what it raises ends the prediction (cancel).
        ``logits_hook``: steers decoding (forced answers in tests and benchmarks)."""
        image = self.check_inputs(image, prompt, visual_prompts)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        pixels, letterbox = self.processor.image_tensor(image)
        masks = self.processor.region_masks(visual_prompts, letterbox).to(self.device)
        ids = self.processor.prompt_ids(prompt, len(visual_prompts), system).to(self.device)
        features = self.runtime.encode_images(pixels[None].to(self.device))
        project = self.runtime.project  # the model's projector under TorchRuntime, an export's otherwise
        embeds = self.model.llm.embed_multimodal(
            ids, self.model.image_tokens(features, project),
            self.model.region_tokens(features, masks, [len(masks)], project))
        timings["encode"] = time.perf_counter() - start

        constrained = self.config.llm.constrained if constrained is None else constrained
        generation = self.model.llm.generate(embeds, max_new_tokens or self.config.llm.max_new_tokens,
                                             logits_hook=logits_hook, jump_forward=jump_forward,
                                             grammar=self.grammar() if constrained else None,
                                             input_ids=ids, prefix=self.prefix_cache, on_token=on_token)
        timings["prefill"], timings["decode"] = generation.prefill_s, generation.decode_s
        parse = trp.parse(generation.text)
        result = Result(prompt=prompt, answer=parse.plain_text, trp_text=generation.text,
                        image_size=(int(image.shape[0]), int(image.shape[1])), timings=timings,
                        errors=[f"{e.message} (at character {e.position})" for e in parse.errors],
                        diagnostics={"tokens": len(generation.token_ids),
                                     "forward_passes": generation.forward_passes,
                                     "prefix_reused": generation.prefix_reused,
                                     "constrained": constrained, "load_s": self.load_s,
                                     "quantize": self.quantize,
                                     "runtime": self.runtime.name})
        if not generation.stopped:
            result.errors.append(f"the answer was cut at max_new_tokens={max_new_tokens or self.config.llm.max_new_tokens}")

        start = time.perf_counter()
        decoded = self._decode_refs(parse, generation.ref_states, features.pyramid, result.errors)
        timings["decoders"] = time.perf_counter() - start
        start = time.perf_counter()
        result.objects = self._objects(parse, decoded, letterbox)
        timings["postprocess"] = time.perf_counter() - start
        return result

    def _decode_refs(self, parse: trp.TrpParse, states: torch.Tensor, pyramid: list[torch.Tensor],
                     errors: list[str]) -> dict[int, dict[str, dict[str, Any]]]:
        """ordinal -> unit -> that unit decoder's postprocessed output for the <REF>."""
        if states.shape[0] != len(parse.refs):
            errors.append(f"{states.shape[0]} <REF> tokens but {len(parse.refs)} <REF>s in the parsed text")
            return {}
        if not parse.refs:
            return {}
        block_of = {ref.ordinal: k for k, (_, block) in enumerate(parse.blocks()) for ref in block.refs}
        units = [[site.units for site in parse.refs]]
        groups = [[block_of.get(site.ordinal, -1) for site in parse.refs]]
        errors += routing_problems(units, tuple(self.model.decoders), self.config.router_length)
        routed = self.model.route_refs([states], units, groups)
        named = {unit: refs for unit, refs in routed.items() if refs.num_refs}  # only those the answer names
        outputs = self.runtime.run_decoders(named, pyramid)
        decoded: dict[int, dict[str, dict[str, Any]]] = {}
        for unit in named:
            for item in self.model.decoders[unit].postprocess(outputs[unit], named[unit])[0]:
                decoded.setdefault(item["ordinal"], {})[unit] = item
        return decoded

    def _objects(self, parse: trp.TrpParse, decoded: dict[int, dict[str, dict[str, Any]]],
                 letterbox: Letterbox) -> list[ReferredObject]:
        """One ReferredObject per <REF> with units; each unit's decoder fills in its output."""
        objects = []
        for site in parse.refs:
            if not site.units:
                continue
            obj = ReferredObject(phrase=site.phrase, units=site.units, instance_index=site.index
                                 if site.index is not None else -1, ref_ordinal=site.ordinal,
                                 ref_span=site.span)
            for unit, output in decoded.get(site.ordinal, {}).items():
                self.model.decoders[unit].fill_object(obj, output, letterbox)
            objects.append(obj)
        return objects
