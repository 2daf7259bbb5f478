"""Int8 LLM weights for CPU inference.

Decode on CPU is memory-bandwidth bound (every weight is read once per token), so smaller
weights are faster tokens. ``int8``: torch's dynamic quantization of every ``nn.Linear``
of the LLM (int8 weights per tensor, activations quantised per call, fbgemm kernels on
x86 and qnnpack on ARM); it ships with torch itself, so nothing more is installed on the
robot. The embedding stays float (a lookup reads one row per token). LoRA must be merged
first (Predictor.from_pretrained does it). ``none`` (the loaders' default): float
weights; ``auto``: int8 on a CPU, float weights on a GPU. Not the default because on the
node's short questions int8 answers differ too often (the README gives the parity).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from refvlm_core.errors import ConfigError

QUANT_KINDS = ("auto", "none", "int8")


def resolve(kind: str, device: str | torch.device) -> str:
    """The kind ``kind`` means on ``device``: ``auto`` is int8 on a CPU, none elsewhere."""
    if kind not in QUANT_KINDS:
        raise ConfigError(f"quantize={kind!r}: use one of {QUANT_KINDS}")
    if kind == "auto":
        return "int8" if torch.device(device).type == "cpu" else "none"
    return kind


def quantize_llm(llm, kind: str) -> None:
    """Replace the linear layers of ``llm.causal_lm`` (a RefLLM's) by int8 ones, in place
    (``auto``: when the LLM is on a CPU)."""
    kind = resolve(kind, next(llm.parameters()).device)
    if kind == "none":
        return
    if any("lora_" in name for name, _ in llm.named_parameters()):
        raise ConfigError("quantize the LLM after merging its LoRA adapters (load_model(..., merge_lora=True))")
    if any(p.device.type != "cpu" for p in llm.parameters()):
        raise ConfigError("int8 dynamic quantization runs on CPU only: keep float weights on a GPU")
    modules = dict(llm.causal_lm.named_modules())
    for name, module in list(modules.items()):
        if type(module) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else llm.causal_lm, attr, int8_linear(module))


def int8_linear(linear: nn.Linear) -> nn.Module:
    """The int8 dynamic Linear that ``torch.ao.quantization.quantize_dynamic`` makes of
    ``linear`` (its default weight observer: per-tensor symmetric int8), with the weight
    packed once: torch's own conversion also packs a placeholder of the full size first,
    which doubled the quantization part of a load."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.nn.quantized.modules.utils import _quantize_weight
    from torch.ao.quantization.qconfig import default_dynamic_qconfig

    observer = default_dynamic_qconfig.weight()
    observer(linear.weight)
    with warnings.catch_warnings():  # torch points eager quantization users to torchao
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*are deprecated")
        quantized = DynamicLinear(1, 1, dtype=torch.qint8)  # a 1x1 placeholder: cheap to pack
        quantized.in_features, quantized.out_features = linear.in_features, linear.out_features
        quantized.set_weight_bias(_quantize_weight(linear.weight.float(), observer), linear.bias)
    return quantized
