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

Quantising costs about a second of a load; the quantised weights are kept in a cache
file (``cache_file``: the loaders put it beside the dequantised base LLM, keyed by the
model's files), so later loads only pack them for the kernels.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from refvlm_core.atomic import atomic_write
from refvlm_core.config import QUANT_KINDS
from refvlm_core.errors import ConfigError

WEIGHT_LEVEL = 64  # |quantised weight| <= this: no int16 saturation with 8-bit activations
CACHE_FORMAT = f"int8-per-channel-{WEIGHT_LEVEL}-v1"  # in cache keys: a new scheme misses old files
KEPT_CACHE_FILES = 4  # quantised models kept beside a base; older ones are removed


def resolve(kind: str, device: str | torch.device) -> str:
    """The kind ``kind`` means on ``device``: ``auto`` is int8 on a CPU, none elsewhere."""
    if kind not in QUANT_KINDS:
        raise ConfigError(f"quantize={kind!r}: use one of {QUANT_KINDS}")
    if kind == "auto":
        return "int8" if torch.device(device).type == "cpu" else "none"
    return kind


def quantize_llm(llm, kind: str, cache_file: str | Path | None = None) -> None:
    """Replace the linear layers of ``llm.causal_lm`` (a RefLLM's) by Int8Linear ones, in
    place (``auto``: when the LLM is on a CPU). ``cache_file``: the quantised weights of
    exactly this LLM (the caller keys the name by what the weights come from): read when
    it holds every layer, else written."""
    kind = resolve(kind, next(llm.parameters()).device)
    if kind == "none":
        return
    if any("lora_" in name for name, _ in llm.named_parameters()):
        raise ConfigError("quantize the LLM after merging its LoRA adapters (load_model(..., merge_lora=True))")
    if any(p.device.type != "cpu" for p in llm.parameters()):
        raise ConfigError("int8 quantization runs on CPU only: keep float weights on a GPU")
    modules = dict(llm.causal_lm.named_modules())
    linears = {name: module for name, module in modules.items() if type(module) is nn.Linear}
    weights = _read_cache(cache_file, linears) if cache_file else None
    if weights is None:
        weights = {name: quantize_weight(linear.weight) for name, linear in linears.items()}
        if cache_file:
            _write_cache(Path(cache_file), weights)
    for name, linear in linears.items():
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else llm.causal_lm, attr, Int8Linear(linear, weights[name]))


def cache_file(cfg, model_folder: str | Path) -> Path | None:
    """Where the int8 weights of the model saved in ``model_folder`` are cached: beside its
    dequantised base LLM (GGUF bases only; None for others), named by the model's config
    and weights files and CACHE_FORMAT, so a retrained model or a new scheme misses."""
    from refvlm_core.base_llm import base_cache_file
    from refvlm_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update((Path(model_folder) / name).read_bytes())
    return base_cache_file(cfg, f"int8-{digest.hexdigest()[:32]}.safetensors")


def _read_cache(path: str | Path, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor] | None:
    """The cached quantised weights, or None when the file is missing, unreadable or holds
    other layers (then it is rewritten)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError, ValueError):
        return None
    weights = {}
    for name, linear in linears.items():
        values, scales = tensors.get(f"{name}.int8"), tensors.get(f"{name}.scale")
        if values is None or scales is None or values.shape != linear.weight.shape or values.dtype != torch.int8:
            return None
        with _quantized_tensor_api():
            weights[name] = torch._make_per_channel_quantized_tensor(
                values, scales, torch.zeros(len(scales), dtype=torch.long), 0)
    Path(path).touch()  # recently used: kept when older files are removed
    return weights


def _write_cache(path: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, weight in weights.items():
        tensors[f"{name}.int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.scale"] = weight.q_per_channel_scales().contiguous()
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": CACHE_FORMAT}))
    except OSError as error:  # a read-only or full cache only costs the next load a second
        warnings.warn(f"could not cache the int8 weights in {path} ({error}); the next load quantises again")
        return
    older = sorted(path.parent.glob("int8-*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    for stale in older[KEPT_CACHE_FILES:]:
        stale.unlink(missing_ok=True)


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float -> per-output-channel symmetric qint8, |values| <= WEIGHT_LEVEL."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / WEIGHT_LEVEL).clamp_min(1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with _quantized_tensor_api():
        return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)


@contextlib.contextmanager
def _quantized_tensor_api():
    """torch warns that eager quantized tensors are deprecated (pointing to torchao): the
    kernels this module uses are still torch's own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*are deprecated")
        yield


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for inference with int8 weights (quantize_weight) and activations
    quantised to 8 bits per call (per tensor, from their min and max)."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor | None = None):
        """``weight``: ``quantize_weight(linear.weight)`` when already made (a cache)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        weight = quantize_weight(linear.weight) if weight is None else weight
        self._packed = torch.ops.quantized.linear_prepack(weight, bias)

    def weight(self) -> torch.Tensor:
        """The quantised weight, [out, in] qint8."""
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] float -> [..., out] float."""
        return torch.ops.quantized.linear_dynamic(x, self._packed, reduce_range=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"
