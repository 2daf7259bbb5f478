"""Which parameters train in each stage, and how the model of a run is built.

Stage 1: the projector only (LLM, encoders and decoders frozen; boxes as text).
Stage 2: projector + LLM (full, or LoRA adapters) + every visual-unit decoder; encoders frozen.
Stage 3: as stage 2 after an external decoder replaced the box or mask decoder (stage3.py).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refvlm_core.config import ModelConfig, preset
from refvlm_core.errors import ConfigError
from refvlm_core.losses import LossWeights

from refvlm_training.engine.config import TrainConfig


def build_model(cfg: TrainConfig):
    """A RefVLM built under ``cfg.seed``: every process (and a resumed run) gets the same
    random-initialised parts without sharing any file."""
    from refvlm_core.checkpoint import load_model
    from refvlm_core.model import RefVLM

    torch.manual_seed(cfg.seed)
    if cfg.model.init_from:
        model = load_model(cfg.model.init_from)
    else:
        config = _with_overrides(preset(cfg.model.preset), cfg.model.overrides)
        model = RefVLM.from_config(config)
    apply_loss_weights(model, cfg.loss_weights)
    return model


def _with_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    if not overrides:
        return config
    merged = config.to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return ModelConfig.from_dict(merged).validate()


def apply_loss_weights(model, weights: dict[str, float]) -> None:
    """Per-loss weights from the training config, pushed into the model and every decoder."""
    if not weights:
        return
    model.config.loss_weights = {**model.config.loss_weights, **weights}
    coerced = LossWeights.coerce(model.config.loss_weights)
    model.loss_weights = coerced
    for decoder in model.decoders.values():
        decoder.weights = coerced


def configure_stage(model, cfg: TrainConfig) -> list[nn.Parameter]:
    """Set requires_grad for ``cfg.stage`` (adding LoRA adapters if asked); the trainable list."""
    model.trainable_parameters(cfg.stage)
    if cfg.lora.enabled:
        if cfg.stage == 1:
            raise ConfigError("lora.enabled has no effect in stage 1 (the LLM is frozen): disable it")
        add_lora(model, cfg)
    if cfg.train_encoders:
        model.encoder.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"stage {cfg.stage} leaves no trainable parameter: check the model config")
    return params


def add_lora(model, cfg: TrainConfig) -> None:
    """Wrap the LLM's linear layers with LoRA adapters; only adapters (and the new token rows
    would need full embeddings, so embeddings stay frozen) train in the LLM."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none")
    model.llm.model = get_peft_model(model.llm.model, lora)


def merge_lora(model) -> None:
    """Fold LoRA adapters into the LLM weights so the saved model loads without peft."""
    from peft import PeftModel

    if isinstance(model.llm.model, PeftModel):
        model.llm.model = model.llm.model.merge_and_unload()


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
