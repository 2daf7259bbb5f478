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
        if cfg.model.overrides:
            model = rebuild_parts(model, with_overrides(model.config, cfg.model.overrides))
    else:
        config = with_overrides(preset(cfg.model.preset), cfg.model.overrides)
        model = RefVLM.from_config(config)
    for path, source in cfg.model.load_parts.items():
        load_part(model, path, source)
    apply_loss_weights(model, cfg.loss_weights)
    return model


def load_part(model: nn.Module, path: str, source: str) -> None:
    """Load ``source`` ("file.safetensors" or "file.safetensors:prefix.", the tensors under
    that prefix with it removed) into the sub-module at ``path`` (e.g.
    ``decoders.box.trunk.attribute_heads``); every tensor of the module must be there."""
    from pathlib import Path

    from safetensors.torch import load_file

    file, _, prefix = source.partition(":")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"model.load_parts: the model has no module {path!r} (check the decoder's settings)") from None
    if not Path(file).is_file():
        raise ConfigError(f"model.load_parts[{path!r}]: {file} does not exist")
    tensors = {k[len(prefix):]: v for k, v in load_file(file).items() if k.startswith(prefix)}
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"model.load_parts[{path!r}]: {file}{':' + prefix if prefix else ''} does not fit it: "
                          f"{str(error).splitlines()[0]}") from None


def take_decoder(model, donor, unit: str) -> None:
    """Replace ``model``'s decoder of ``unit`` by ``donor``'s, settings and weights: a unit
    retrained in a decoder-only phase joins a model whose other units stay as they were.
    Refused unless every part before the decoders (towers, projector, LLM) holds the same
    weights in both: the decoder learnt on those parts' pyramid and <REF> states."""
    if unit not in donor.decoders:
        raise ConfigError(f"the donor model has no {unit!r} decoder; its units are {list(donor.decoders)}")
    ours, theirs = model.state_dict(), donor.state_dict()
    upstream = sorted(k for k in ours.keys() | theirs.keys() if not k.startswith("decoders."))
    differ = [k for k in upstream if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape
              or not torch.allclose(ours[k].float(), theirs[k].float(), rtol=1e-3, atol=1e-5)]
    if differ:
        raise ConfigError(f"the donor's weights before the decoders differ from this model's ({len(differ)} "
                          f"tensors, e.g. {differ[:2]}): its {unit} decoder learnt on other features; take "
                          "it only from a decoder-only phase started from this model")
    model.decoders[unit] = donor.decoders[unit]
    model.config.decoders[unit] = dict(donor.config.decoders[unit])


# What each tower's weights depend on: when these fields are unchanged and no weight file is
# named, a rebuilt encoder keeps the trained model's weights of that tower.
VIT_FIELDS = ("image_size", "vit_model", "vit_custom", "vit_layer", "mean", "std")
CONVNEXT_FIELDS = ("image_size", "convnext_model", "convnext_custom", "convnext_stages", "pyramid_input",
                   "colour_channels", "object_maps", "mean", "std")


def rebuild_parts(model, config: ModelConfig):
    """``model`` (a trained RefVLM) with the parts whose config differs in ``config`` built
    afresh, the others kept with their weights: the LLM (with its adapters and TRP rows)
    always; the projector unless the ViT's width changes; each tower unless its config
    changes or ``config`` names a weight file for it; each decoder unless its settings or
    the pyramid's channels change (new towers, new decoders: a decoder phase over a trained
    LLM)."""
    from refvlm_core.encoders import DualImageEncoder
    from refvlm_core.model import RefVLM

    old = model.config.vision
    encoder = model.encoder
    if config.vision != old:
        encoder = DualImageEncoder(config.vision)
        for name, fields, weights in (("vit", VIT_FIELDS, config.vision.vit_weights),
                                      ("convnext", CONVNEXT_FIELDS, config.vision.convnext_weights)):
            if not weights and all(getattr(config.vision, f) == getattr(old, f) for f in fields):
                getattr(encoder, name).load_state_dict(getattr(model.encoder, name).state_dict())
    rebuilt = RefVLM(config.validate(), encoder, model.llm)
    if rebuilt.projector.net[0].in_features == model.projector.net[0].in_features:
        rebuilt.projector.load_state_dict(model.projector.state_dict())
    same_pyramid = encoder.pyramid_channels == model.encoder.pyramid_channels
    for unit, decoder in rebuilt.decoders.items():
        if same_pyramid and unit in model.decoders and config.decoders.get(unit) == model.config.decoders.get(unit):
            decoder.load_state_dict(model.decoders[unit].state_dict())
    return rebuilt


def with_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
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


def set_stage_trainable(model, stage: int) -> list[nn.Parameter]:
    """Stage 1: projector only. Stages 2 and 3: everything but the encoders (stage 3 after
    ``stage3.swap_decoder``). Sets ``requires_grad`` of the model's parts; the trainable list."""
    if stage not in (1, 2, 3):
        raise ConfigError(f"training stage {stage}: the model trains in stages 1, 2 and 3 "
                          "(stage 0 pretrains the vision towers alone)")
    trainable = {"projector"} if stage == 1 else {"projector", "llm", "decoders"}
    for name, module in model.named_children():
        module.requires_grad_(name in trainable)
    return [p for p in model.parameters() if p.requires_grad]


def configure_stage(model, cfg: TrainConfig) -> list[nn.Parameter]:
    """Set requires_grad for ``cfg.stage`` (adding LoRA adapters if asked); the trainable list."""
    if cfg.lora.enabled:
        if cfg.stage == 1:
            raise ConfigError("lora.enabled has no effect in stage 1 (the LLM is frozen): disable it")
        if cfg.optim.weight_decay > 0:
            raise ConfigError("lora.enabled trains the TRP token rows of the frozen vocabulary matrices, and "
                              "AdamW weight decay would shrink the frozen rows too: set optim.weight_decay: 0")
    elif cfg.trainable is None or "llm" in cfg.trainable:
        merge_lora(model)  # a model loaded with adapters (over_base) fine-tunes as a plain LLM
    # (a frozen LLM keeps its adapters, so the model saves over_base again)
    set_stage_trainable(model, cfg.stage)
    if cfg.trainable is not None:  # an explicit set replaces the stage's (e.g. a decoder-only phase)
        for name, module in model.named_children():
            module.requires_grad_(name in cfg.trainable)
    if cfg.lora.enabled:
        if cfg.trainable is not None and "llm" not in cfg.trainable:
            raise ConfigError("lora.enabled trains the LLM, but trainable leaves it out: disable lora or add llm")
        add_lora(model, cfg)
    if cfg.train_encoders:
        model.encoder.set_trainable(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"stage {cfg.stage} leaves no trainable parameter: check the model config")
    return params


def add_lora(model, cfg: TrainConfig) -> None:
    """Wrap the LLM's linear layers with LoRA adapters (or keep the adapters a loaded model
    already carries); in the LLM only the adapters and the TRP token rows train."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if not isinstance(model.llm.lm, PeftModel):
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), bias="none")
        model.llm.lm = get_peft_model(model.llm.lm, lora)
    for name, param in model.llm.named_parameters():
        param.requires_grad_("lora_" in name)
    train_token_rows_only(model)


def train_token_rows_only(model) -> None:
    """Let the TRP token rows of the (frozen) embedding and lm_head matrices train.

    A gradient hook zeroes every other row's gradient: simpler than splicing a separate
    row parameter into the embedding and lm_head (tied or not, generation, export and
    checkpoints keep the plain transformers modules). With zero gradients and no weight
    decay, AdamW leaves the original rows bit-for-bit unchanged.
    """
    from refvlm_core.checkpoint import token_row_ids

    lm = model.llm.causal_lm
    weights = {id(w): w for w in (lm.get_input_embeddings().weight,
                                  getattr(lm.get_output_embeddings(), "weight", None)) if w is not None}
    ids = torch.tensor(token_row_ids(model))
    for weight in weights.values():
        if getattr(weight, "_refvlm_row_hook", False):
            continue
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[ids] = 1.0                                                   # [V, 1]
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype))
        weight._refvlm_row_hook = True


def merge_lora(model) -> None:
    """Fold LoRA adapters into the LLM weights so the saved model loads without peft."""
    from peft import PeftModel

    if isinstance(model.llm.lm, PeftModel):
        model.llm.lm = model.llm.lm.merge_and_unload()


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
