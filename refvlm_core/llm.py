"""The language model that speaks TRP: the base causal LM (base_llm.py) with the TRP
special tokens, the one place where image and region features enter the sequence, and
generation that returns the last-layer hidden state of every generated ``<REF>``.

Names, from the outside in: ``RefVLM`` (the model) holds ``llm``, a ``RefLLM``; its
``lm`` is the transformers causal LM as trained (a peft LoRA wrapper around it while
adapters are attached); ``causal_lm`` is the causal LM under any wrapper, and
``backbone`` its decoder stack (``causal_lm.model`` in transformers: layers and final
norm, no ``lm_head``).

REF capture (docs/architecture.md, "The REF contract"): the latent embedding of a
``<REF>`` is the final-norm output at the position of the ``<REF>`` token itself. During
generation that is the step that *consumes* the generated ``<REF>``; the greedy loop here
calls the base model and ``lm_head`` itself with a KV cache, so it reads that one vector
per step for free instead of asking for the hidden states of all layers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from refvlm_core import llama, trp
from refvlm_core.base_llm import load_causal_lm, load_tokenizer
from refvlm_core.config import ModelConfig
from refvlm_core.constrained import TrpDecodingState, TrpGrammar, constrain
from refvlm_core.load_timing import phase
from refvlm_core.prefix_cache import PromptPrefixCache
from refvlm_core.processor import IGNORE

NEW_ROW_NOISE = 0.02  # std of the noise on new embedding rows, relative to the rows' std
OnToken = Callable[[int, str], None]  # (token id, the answer so far) after each answer token


def init_new_rows(weight: torch.Tensor, num_new: int, generator: torch.Generator) -> None:
    """New token rows = mean of the old rows + small noise (keeps their logits unremarkable)."""
    if num_new <= 0 or weight.device.type == "meta":
        return
    old = weight[:-num_new].float()                                   # [V_old, D]
    mean = old.mean(0)
    # torch's column-wise std(0) takes seconds on a 49k x 576 table (one thread): two passes instead
    std = ((old - mean).square().sum(0) / max(old.shape[0] - 1, 1)).sqrt()
    noise = torch.randn(num_new, weight.shape[1], generator=generator) * std * NEW_ROW_NOISE
    weight[-num_new:] = (mean + noise).to(weight.dtype)


def add_token_rows(causal_lm: nn.Module, vocab_size: int) -> None:
    """Grow the embedding (and an untied lm_head) to ``vocab_size`` rows, the new rows
    initialised from the old ones (seeded: the same rows on every load). Done here rather
    than by transformers' resize_token_embeddings, which first draws a random table of the
    new size (a second of a load) that the new rows then overwrite."""
    embed, output = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    tied = output is not None and output.weight is embed.weight
    generator = torch.Generator().manual_seed(0)
    embed.weight = _grown(embed.weight, vocab_size, generator)
    embed.num_embeddings = vocab_size
    if output is not None:
        output.weight = embed.weight if tied else _grown(output.weight, vocab_size, generator)
        output.out_features = vocab_size
    causal_lm.config.get_text_config().vocab_size = vocab_size
    if hasattr(causal_lm, "vocab_size"):
        causal_lm.vocab_size = vocab_size


def _grown(weight: nn.Parameter, rows: int, generator: torch.Generator) -> nn.Parameter:
    """weight [V, D] -> a new [rows, D] parameter: the old rows, then init_new_rows."""
    grown = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        grown[: weight.shape[0]] = weight
        init_new_rows(grown, rows - weight.shape[0], generator)
    return nn.Parameter(grown, requires_grad=weight.requires_grad)


@dataclass
class Generation:
    token_ids: list[int]                   # generated tokens, stop token included if produced
    text: str                              # decoded, special tokens kept (TRP)
    ref_states: torch.Tensor               # [K, D] final-norm state at each generated <REF>
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped: bool = False                  # ended on a stop token (not on max_new_tokens)
    forward_passes: int = 0                # LLM passes, prefill included
    constrained: bool = False              # decoded under the TRP grammar
    prefix_reused: int = 0                 # prompt tokens whose keys and values came from the prefix cache


class RefLLM(nn.Module):
    """Causal LM + tokenizer with TRP tokens; ``tokenizer`` may be None on the meta device."""

    def __init__(self, lm: nn.Module, tokenizer=None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.token_ids: dict[str, int] = {}
        if tokenizer is not None:
            self.token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in trp.SPECIAL_TOKENS}

    @classmethod
    def from_config(cls, cfg: ModelConfig, inference: bool = False) -> "RefLLM":
        """``inference``: the base LLM may be refvlm_core.llama's (answering only)."""
        on_meta = torch.empty(0).device.type == "meta"
        if on_meta:  # architecture only: vocab grows by the TRP tokens
            vocab = int(cfg.llm.arch.get("vocab_size", 32000)) + len(trp.SPECIAL_TOKENS)
            return cls(load_causal_lm(cfg, vocab_size=vocab))
        with phase("tokenizer"):
            tokenizer = load_tokenizer(cfg)
            tokenizer.add_special_tokens({"additional_special_tokens": list(trp.SPECIAL_TOKENS)},
                                         replace_extra_special_tokens=False)
        if cfg.llm.kind == "llama-random":
            causal_lm = load_causal_lm(cfg, vocab_size=len(tokenizer))
            causal_lm.config.bos_token_id = tokenizer.bos_token_id
            causal_lm.config.eos_token_id = tokenizer.eos_token_id
        else:
            causal_lm = load_causal_lm(cfg, inference=inference)
            with phase("trp_token_rows"):
                add_token_rows(causal_lm, len(tokenizer))
        return cls(causal_lm, tokenizer)

    # ---- properties --------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The transformers causal LM, also when ``lm`` is a peft LoRA wrapper around it."""
        get_base = getattr(self.lm, "get_base_model", None)
        return get_base() if callable(get_base) else self.lm

    def new_cache(self):
        """An empty key/value cache of the kind the causal LM extends."""
        if isinstance(self.causal_lm, llama.LlamaForCausalLM):
            return llama.KVCache()
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.config)

    @property
    def backbone(self) -> nn.Module:
        """The causal LM's decoder stack: embeddings, layers, final norm (no lm_head)."""
        return self.causal_lm.model

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def ref_id(self) -> int:
        return self.token_ids[trp.REF]

    @property
    def image_id(self) -> int:
        return self.token_ids[trp.IMAGE]

    @property
    def region_id(self) -> int:
        return self.token_ids[trp.REGION]

    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return {i for i in ids if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id}

    # ---- the one splice -------------------------------------------------------------
    def embed_multimodal(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None = None,
                         region_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every ``<image>`` / ``<region>`` slot replaced by features.

        input_ids [B, T]: the processor expands ``<image>`` to one slot per image token, so
        the sequence length never changes here. image_tokens [B, Ni, D] fill the image
        slots of each row in order; region_tokens [R_total, D] fill the region slots in
        reading order (row by row). Returns inputs_embeds [B, T, D].
        """
        embeds = self.causal_lm.get_input_embeddings()(input_ids)
        for token_id, features, name in ((self.image_id, image_tokens, "image"),
                                         (self.region_id, region_tokens, "region")):
            slots = input_ids == token_id                                  # [B, T]
            count = int(slots.sum())
            given = 0 if features is None else features.reshape(-1, embeds.shape[-1]).shape[0]
            if count != given:
                raise ValueError(f"{count} <{name}> slots in the tokens but {given} {name} features")
            if count:
                flat = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
                embeds = embeds.masked_scatter(slots[..., None], flat)
        return embeds

    # ---- teacher forcing ------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds [B, T, D] -> (logits [B, T, V], final-norm hidden states [B, T, D])."""
        hidden = self.hidden_states(inputs_embeds, attention_mask)
        return self.causal_lm.lm_head(hidden), hidden

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """inputs_embeds [B, T, D] -> final-norm hidden states [B, T, D] (no logits: training
        needs them only at the answer tokens, see ``lm_loss``)."""
        return self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over labelled (answer) tokens: hidden [B, T, D], labels [B, T].
        Logits are computed at those positions only: over a 49k vocabulary the full [B, T, V]
        would cost a third of the forward pass for the ~6% of tokens that are answers."""
        targets = labels[:, 1:]
        supervised = targets != IGNORE                                     # [B, T-1]
        if not bool(supervised.any()):
            return hidden.sum() * 0.0
        logits = self.causal_lm.lm_head(hidden[:, :-1][supervised])        # [N, V]
        return F.cross_entropy(logits.float(), targets[supervised])

    # ---- generation -----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int, capture_refs: bool = True,
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 logits_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 grammar: TrpGrammar | None = None, jump_forward: bool = True,
                 input_ids: torch.Tensor | None = None, prefix: PromptPrefixCache | None = None,
                 on_token: OnToken | None = None) -> Generation:
        """Greedy (or sampled) decoding of one sequence [1, T, D] with REF capture.

        ``on_token(token_id, answer_so_far)`` is called for each answer token as soon as it
        is chosen (stop tokens excepted), with the text so far decoded as in
        ``Generation.text``: streaming; an exception it raises ends generation (cancel).
        ``logits_hook(step, logits [1, V]) -> logits`` may steer decoding (forced
        answers); ``step`` is the position of the token being chosen. ``grammar``: decode
        under the TRP constraint (constrained.py): the hook sees logits already constrained
        and what it returns is constrained again; with ``jump_forward`` the tokens that are
        the only continuation are appended in the same forward pass, and the hook is still
        called once for each of them (with logits that allow only that token); a grammar
        draft (``</Unit>[0]<REF>`` after a unit name) rides along in the same pass and is
        kept only when the model picks it, so the greedy text is that of token-by-token
        decoding (sampling draws no number for a forced token, so its draws shift).
        ``Generation.forward_passes`` counts the LLM passes, prefill included.
        ``prefix`` (with the prompt's ``input_ids`` [1, T]): reuse the keys and values of the
        prompt's constant start (prefix_cache.py); ``Generation.prefix_reused`` says how many.
        """
        if inputs_embeds.shape[0] != 1:
            raise ValueError("generate decodes one sequence at a time")
        backbone, embed = self.backbone, self.causal_lm.get_input_embeddings()
        stop, ref_id = self.stop_ids(), self.ref_id
        state = grammar.start() if grammar is not None else None
        start = time.perf_counter()
        if prefix is not None and input_ids is not None:
            cache, reused = prefix.start(input_ids, self.new_cache)
        else:
            cache, reused = self.new_cache(), 0
        hidden = backbone(inputs_embeds=inputs_embeds[:, reused:], past_key_values=cache,
                          use_cache=True).last_hidden_state
        if prefix is not None and input_ids is not None:
            prefix.remember(input_ids, cache)
        prefill_s, passes = time.perf_counter() - start, 1
        tokens: list[int] = []
        states: list[torch.Tensor] = []
        stopped, chosen = False, None                  # chosen: picked while verifying a draft
        while len(tokens) < max_new_tokens:
            budget = max_new_tokens - len(tokens)
            next_id = chosen if chosen is not None else self._choose(
                hidden[:, -1], len(tokens), budget, state, logits_hook, temperature, generator)
            chosen, chunk = None, [next_id]
            if state is not None:
                state.advance(next_id)
                if jump_forward and next_id not in stop:
                    chunk += self._forced(state, budget - 1, len(tokens) + 1, logits_hook)
            self._append(tokens, chunk, stop, on_token)
            if next_id in stop:
                stopped = True
                break
            if len(tokens) >= max_new_tokens and not (capture_refs and ref_id in chunk):
                break  # nothing left to read from the pass that would consume the chunk
            draft = state.draft(max_new_tokens - len(tokens)) if state is not None and jump_forward else []
            step_ids = torch.tensor([chunk + draft], device=inputs_embeds.device)
            hidden = backbone(inputs_embeds=embed(step_ids), past_key_values=cache,
                              use_cache=True).last_hidden_state          # [1, len(chunk + draft), D]
            passes += 1
            if draft:
                chosen = self._choose(hidden[:, len(chunk) - 1], len(tokens), max_new_tokens - len(tokens),
                                      state, logits_hook, temperature, generator)
                if chosen == draft[0]:  # the model agrees: keep the whole draft
                    state.advance(chosen)
                    self._notify(state, draft[1:], len(tokens) + 1, logits_hook)
                    chunk, chosen = chunk + draft, None
                    self._append(tokens, draft, stop, on_token)
                else:                   # keep its own pick; forget the draft's cache entries
                    cache.crop(-len(draft))
                    hidden = hidden[:, :len(chunk)]
            if capture_refs:
                states.extend(hidden[0, j] for j, token in enumerate(chunk) if token == ref_id)
        decode_s = time.perf_counter() - start - prefill_s
        ref_states = (torch.stack(states) if states
                      else inputs_embeds.new_zeros((0, self.hidden_size)))
        return Generation(tokens, self._answer_text(tokens, stop), ref_states, prefill_s, decode_s, stopped,
                          forward_passes=passes, constrained=state is not None, prefix_reused=reused)

    def _answer_text(self, tokens: list[int], stop: set[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=False)

    def _append(self, tokens: list[int], new: list[int], stop: set[int], on_token: OnToken | None) -> None:
        """Extend the answer by ``new`` tokens, telling ``on_token`` about each one."""
        for token in new:
            tokens.append(token)
            if on_token is not None and token not in stop:
                on_token(token, self._answer_text(tokens, stop))

    def _choose(self, last_hidden: torch.Tensor, step: int, budget: int, state: TrpDecodingState | None,
                hook: Callable | None, temperature: float, generator: torch.Generator | None) -> int:
        """The next token from last_hidden [1, D], under the grammar state when given."""
        logits = self.causal_lm.lm_head(last_hidden).float()             # [1, V]
        allowed = state.allowed(budget) if state is not None else None
        if allowed is not None:
            logits = constrain(logits, allowed)
        if hook is not None:
            hooked = hook(step, logits)
            if allowed is not None:
                hooked = constrain(hooked, allowed)
            # a hook that rules out every allowed token cannot break the grammar
            logits = hooked if bool(torch.isfinite(hooked).any()) else logits
        return int(_pick(logits, temperature, generator))

    def _forced(self, state: TrpDecodingState, budget: int, step: int, hook: Callable | None) -> list[int]:
        """The grammar's only continuation (advancing ``state``); the hook sees each token."""
        forced = state.forced(budget)
        self._notify(state, forced, step, hook)
        return forced

    def _notify(self, state: TrpDecodingState, tokens: list[int], step: int, hook: Callable | None) -> None:
        """Advance ``state`` through tokens the grammar forced; the hook is called for each
        with logits that allow only that token (a streaming hook sees every position)."""
        device = self.causal_lm.get_input_embeddings().weight.device
        for offset, token in enumerate(tokens):
            if hook is not None:
                one = torch.full((1, state.grammar.vocab_size), -float("inf"), device=device)
                one[0, token] = 0.0
                hook(step + offset, one)
            state.advance(token)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)[0]
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0, 0]
