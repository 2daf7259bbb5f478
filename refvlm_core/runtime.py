"""Runtimes: what runs the image encoders, the projector and the unit decoders for the
Predictor (``Predictor.set_runtime``). The LLM always runs in torch.

A ``Runtime`` has ``name``, ``encode_images(images [B, 3, S, S] in [0, 1]) -> ImageFeatures``,
``project(features [B, N, Dv]) -> [B, N, D]``, ``run_decoders(routed, pyramid)`` (only the
units the answer names are routed) and ``describe() -> {str: str}`` (what runs, for logs and
diagnostics). ``TorchRuntime`` is the model's own modules; the exported runtimes (ONNX
Runtime, TensorRT) and the choice among the kinds (``config.RUNTIME_KINDS``) are in
``refvlm_export.runtime``.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from refvlm_core.features import ImageFeatures


class Runtime(Protocol):
    name: str

    def encode_images(self, images: torch.Tensor) -> ImageFeatures: ...

    def project(self, features: torch.Tensor) -> torch.Tensor: ...

    def run_decoders(self, routed: dict[str, Any], pyramid: list[torch.Tensor]
                     ) -> dict[str, dict[str, torch.Tensor]]: ...

    def describe(self) -> dict[str, str]: ...


class TorchRuntime:
    """The model's encoder, projector and decoder modules, on the model's device."""

    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model

    def encode_images(self, images: torch.Tensor) -> ImageFeatures:
        return self.model.encode_images(images)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.projector(features)

    def run_decoders(self, routed: dict[str, Any], pyramid: list[torch.Tensor]
                     ) -> dict[str, dict[str, torch.Tensor]]:
        return self.model.run_decoders(routed, pyramid)

    def describe(self) -> dict[str, str]:
        device = next(self.model.parameters()).device
        return {"runtime": "torch", "device": str(device)}
