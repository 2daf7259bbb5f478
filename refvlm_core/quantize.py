"""Int8 LLM weights for CPU inference.

Decode on CPU is memory-bandwidth bound (every weight is read once per token), so smaller
weights are faster tokens. ``int8``: torch's dynamic quantization of every ``nn.Linear``
of the LLM (int8 weights per tensor, activations quantised per call, fbgemm kernels on
x86 and qnnpack on ARM); it ships with torch itself, so nothing more is installed on the
robot. The embedding stays float (a lookup reads one row per token). LoRA must be merged
first (Predictor.from_pretrained does it).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from refvlm_core.errors import ConfigError

QUANT_KINDS = ("none", "int8")


def quantize_llm(llm, kind: str) -> None:
    """Replace the linear layers of ``llm.causal_lm`` (a RefLLM's) by int8 ones, in place."""
    if kind not in QUANT_KINDS:
        raise ConfigError(f"quantize={kind!r}: use one of {QUANT_KINDS}")
    if kind == "none":
        return
    if any("lora_" in name for name, _ in llm.named_parameters()):
        raise ConfigError("quantize the LLM after merging its LoRA adapters (load_model(..., merge_lora=True))")
    if any(p.device.type != "cpu" for p in llm.parameters()):
        raise ConfigError("int8 dynamic quantization runs on CPU only: keep float weights on a GPU")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch points eager quantization users to torchao
        quantize_dynamic(llm.causal_lm, {nn.Linear}, dtype=torch.qint8, inplace=True)
