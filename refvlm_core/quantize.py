"""Int8 LLM weights for CPU inference.

Decode on CPU is memory-bandwidth bound (every weight is read once per token), so smaller
weights are faster tokens. ``int8`` replaces every ``nn.Linear`` of the LLM by an
``Int8Linear``: weights quantised once per output channel, activations quantised per
call, multiplied by torch's own quantized kernels (fbgemm on x86, qnnpack on ARM), so
nothing more is installed on the robot. The embedding stays float (a lookup reads one row
per token). LoRA must be merged first (Predictor.from_pretrained does it).

Why not torch's ``quantize_dynamic`` as it is: its layers quantise the activations to 7
bits (``reduce_range``) and the weights per tensor, and on the shipped model that flipped
the unit of a third of the node's short questions (a mask asked for, a box answered).
fbgemm's x86 kernel without VNNI adds pairs of uint8 x int8 products in int16, which
saturates above 32767; 7-bit activations are torch's guard. Here the guard is on the
weights instead: each row is scaled to at most ``WEIGHT_LEVEL`` (64) in magnitude, so a
pair is at most 2 * 255 * 64 = 32640 and the activations keep all 8 bits. Per channel, 64
levels of each row's own range are finer than 127 levels of the whole tensor's (whose
largest weight sits in a few rows).

``none``: float weights; ``auto``: int8 on a CPU, float weights on a GPU.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from refvlm_core.errors import ConfigError

QUANT_KINDS = ("auto", "none", "int8")
WEIGHT_LEVEL = 64  # |quantised weight| <= this: no int16 saturation with 8-bit activations


def resolve(kind: str, device: str | torch.device) -> str:
    """The kind ``kind`` means on ``device``: ``auto`` is int8 on a CPU, none elsewhere."""
    if kind not in QUANT_KINDS:
        raise ConfigError(f"quantize={kind!r}: use one of {QUANT_KINDS}")
    if kind == "auto":
        return "int8" if torch.device(device).type == "cpu" else "none"
    return kind


def quantize_llm(llm, kind: str) -> None:
    """Replace the linear layers of ``llm.causal_lm`` (a RefLLM's) by Int8Linear ones, in
    place (``auto``: when the LLM is on a CPU)."""
    kind = resolve(kind, next(llm.parameters()).device)
    if kind == "none":
        return
    if any("lora_" in name for name, _ in llm.named_parameters()):
        raise ConfigError("quantize the LLM after merging its LoRA adapters (load_model(..., merge_lora=True))")
    if any(p.device.type != "cpu" for p in llm.parameters()):
        raise ConfigError("int8 quantization runs on CPU only: keep float weights on a GPU")
    modules = dict(llm.causal_lm.named_modules())
    for name, module in list(modules.items()):
        if type(module) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else llm.causal_lm, attr, Int8Linear(module))


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float -> per-output-channel symmetric qint8, |values| <= WEIGHT_LEVEL."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / WEIGHT_LEVEL).clamp_min(1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch points eager quantization users to torchao
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*are deprecated")
        return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for inference with int8 weights (quantize_weight) and activations
    quantised to 8 bits per call (per tensor, from their min and max)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(quantize_weight(linear.weight), bias)

    def weight(self) -> torch.Tensor:
        """The quantised weight, [out, in] qint8."""
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] float -> [..., out] float."""
        return torch.ops.quantized.linear_dynamic(x, self._packed, reduce_range=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"
