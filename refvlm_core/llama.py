"""The Llama decoder of the GGUF base (SmolLM2) for inference, in plain torch.

transformers' ``LlamaForCausalLM`` with the parts inference uses: the same modules and
parameter names (``model.embed_tokens``, ``model.layers[i].self_attn.q_proj``, ...,
``lm_head`` tied to the embedding), so its weights, our LoRA fold, the TRP rows, int8
layers and the base fingerprint apply unchanged, and the same arithmetic (RMSNorm in
float32, default RoPE, grouped-query SDPA attention), so the answers are those of
transformers' model (tests/test_llama.py). Importing transformers' model code costs ~4
s of a node's start (it pulls torchvision, torch's compiler stack and scipy); the
tokenizer still comes from transformers. Training keeps transformers' model (peft, FSDP,
gradient checkpointing); a base config with any other field value is also left to it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# Config values this module implements; anything else is built by transformers.
PLAIN_VALUES = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "pretraining_tp": 1, "rope_scaling": None}


@dataclass
class LlamaArch:
    """The fields of a Llama config.json that the forward pass reads."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_json(cls, config: dict) -> "LlamaArch":
        rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
        heads = config["num_attention_heads"]
        return cls(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], heads,
                   config.get("num_key_value_heads", heads), config.get("head_dim", config["hidden_size"] // heads),
                   config["rms_norm_eps"], float(rope["rope_theta"]), config["vocab_size"],
                   config.get("tie_word_embeddings", True), config.get("bos_token_id"),
                   config.get("eos_token_id"), config.get("pad_token_id"))

    def get_text_config(self) -> "LlamaArch":
        """transformers' config interface (refvlm_core.llm.add_token_rows grows vocab_size)."""
        return self


def is_plain(config: dict) -> bool:
    """True when this module computes what transformers' model of ``config`` computes."""
    rope = config.get("rope_parameters") or {}
    return (all(config.get(key, value) == value for key, value in PLAIN_VALUES.items())
            and rope.get("rope_type", "default") == "default" and not config.get("sliding_window"))


class KVCache:
    """Keys and values of every position so far, per layer: [B, kv_heads, T, head_dim]
    (the interface of transformers' DynamicCache that refvlm_core uses)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (negative: drop that many from the end)."""
        keep = self.get_seq_length() + length if length < 0 else length
        self.keys = [k[:, :, :keep] for k in self.keys]
        self.values = [v[:, :, :keep] for v in self.values]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], keys], dim=2)
            self.values[layer] = torch.cat([self.values[layer], values], dim=2)
        return self.keys[layer], self.values[layer]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(arch: LlamaArch) -> torch.Tensor:
    """[head_dim / 2] float32: the default RoPE's inverse frequencies (on the CPU, also
    while a model is built on the meta device: meta arithmetic imports torch's compiler)."""
    steps = torch.arange(0, arch.head_dim, 2, dtype=torch.float, device="cpu")
    return 1.0 / arch.rope_theta ** (steps / arch.head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: LlamaArch, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = (
            layer, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)
        self.q_proj = nn.Linear(arch.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(arch.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(arch.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        """x [B, T, D], cos/sin [B, T, head_dim], mask [B, 1, T, P+T] bool or None (causal)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)      # [B, H, T, d]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)   # [B, Hkv, T, d]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                       # [B, Hkv, P+T, d]
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                             scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, arch: LlamaArch):
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch, layer: int):
        super().__init__()
        self.self_attn = Attention(arch, layer)
        self.mlp = MLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack (transformers' ``causal_lm.model``): embeddings, layers, final norm."""

    def __init__(self, arch: LlamaArch):
        super().__init__()
        self.arch = arch
        # No random init (the weights are loaded): on the meta device normal_ imports torch's
        # compiler stack, ~2 s of a start.
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size,
                                         _weight=torch.empty(arch.vocab_size, arch.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.register_buffer("inv_freq", rope_frequencies(arch), persistent=False)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False) -> SimpleNamespace:
        """inputs_embeds [B, T, D] (or input_ids [B, T]); attention_mask [B, P+T] 1 = real
        token; past_key_values: a KVCache extended in place -> .last_hidden_state [B, T, D]."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        b, t, _ = x.shape
        positions = torch.arange(past, past + t, device=x.device, dtype=torch.float)
        freqs = positions[:, None] * self.inv_freq[None, :]                            # [T, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)[None].expand(b, -1, -1)             # [B, T, d]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = self._mask(attention_mask, b, t, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return SimpleNamespace(last_hidden_state=self.norm(x), past_key_values=cache)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, b: int, t: int, past: int, device) -> torch.Tensor | None:
        """[B, 1, T, P+T] True where a query may attend; None when plain causal SDPA does."""
        if attention_mask is None and (past == 0 or t == 1):
            return None
        keys = torch.arange(past + t, device=device)
        allowed = keys[None, :] <= (past + torch.arange(t, device=device))[:, None]  # [T, P+T]
        allowed = allowed[None, None].expand(b, 1, t, past + t)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        return allowed


class LlamaForCausalLM(nn.Module):
    """Decoder stack + lm_head (tied to the embedding when the config says so)."""

    def __init__(self, arch: LlamaArch):
        super().__init__()
        self.config = arch
        self.model = LlamaModel(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False) -> SimpleNamespace:
        out = self.model(input_ids, inputs_embeds, attention_mask, past_key_values, use_cache)
        return SimpleNamespace(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)


def load(folder: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The model saved by transformers in ``folder`` (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    arch = LlamaArch.from_json(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        causal_lm = LlamaForCausalLM(arch)
    state = load_file(str(folder / "model.safetensors"))
    if arch.tie_word_embeddings:  # one tensor saved under either name
        shared = state.pop("lm_head.weight", None)
        if shared is not None:
            state.setdefault("model.embed_tokens.weight", shared)
    missing, unexpected = causal_lm.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{folder}: weights do not fit a Llama of its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if arch.tie_word_embeddings:
        causal_lm.lm_head.weight = causal_lm.model.embed_tokens.weight
    return causal_lm.to(dtype)
