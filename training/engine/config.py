"""TrainConfig: everything one training run needs, loaded from a YAML or JSON file.

Values come in three layers: the dataclass defaults, the stage preset (``STAGE_PRESETS``),
then the file. ``--stage`` on the command line picks the preset and overrides the
file's ``stage``. Relative paths are taken from the working directory.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refvlm_core.errors import ConfigError
from refvlm_core.from_dict import dataclass_from_dict

STAGES = (0, 1, 2, 3)
MODEL_PARTS = ("encoder", "projector", "llm", "decoders")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "no")


@dataclass
class DataConfig:
    train: str = ""                       # folder of VT-Instruct shards (or one shard)
    num_workers: int = 0                  # DataLoader worker processes reading shards
    stage1_decimals: int = 2              # digits of the boxes written as text in stage 1
    max_samples: int | None = None        # use only the first N samples (e.g. a decoder phase over cached REFs)


@dataclass
class ModelSource:
    preset: str | None = "tiny"           # refvlm_core.config preset, when not init_from
    init_from: str | None = None          # model folder (config.json + model.safetensors), e.g. stage 1's output
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields replaced on the preset, or on
                                                            # init_from's config (changed parts rebuilt: stages.rebuild_parts)
    # weights loaded into sub-modules after the model is built: {module path: "file.safetensors" or
    # "file.safetensors:prefix."} (e.g. stage 0's object heads into an objects decoder's attribute heads)
    load_parts: dict[str, str] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0                 # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio at the last step


@dataclass
class LoraConfig:
    enabled: bool = False                 # stage 2: LoRA adapters on the LLM instead of full fine-tuning
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ExternalDecoderConfig:
    unit: str = "mask"                    # the unit whose decoder is replaced: mask or box
    kind: str = "sam"                     # sam (mask) or grounding_dino (box)
    settings: dict[str, Any] = field(default_factory=dict)  # sizes of the external decoder's config
    weights: str | None = None            # local safetensors of the external decoder, loaded when given


@dataclass
class VisionPretrainConfig:
    """Stage 0: the towers learn SimWorld's dense ground truth (refvlm_training.engine.stage0)."""
    scenes: int = 2000                    # train-split scenes rendered on the fly (0..scenes-1)
    width: int = 256                      # render size
    height: int = 192
    head_dim: int = 64                    # width of the FPN under the dense heads
    brightness_jitter: float = 0.0        # each image's gain drawn from [1 - j, 1 + j] (0: none)
    loss_weights: dict[str, float] = field(default_factory=dict)  # e.g. {depth: 0.5, token_color: 1.0}


# Fields stage 0 (engine/stage0.py) never reads: set away from their defaults in a stage-0
# config they would do nothing, so validate refuses them.
STAGE0_UNUSED = ("grad_accum", "strategy", "mixed_precision", "gradient_checkpointing", "train_encoders",
                 "trainable", "cache_frozen", "save_trainable_only", "loss_weights", "lora", "external_decoder",
                 "data.train", "data.stage1_decimals", "data.max_samples", "model.init_from", "model.load_parts")
# Sections one stage alone reads (stage 0's are above): refused in another stage's config.
STAGE_ONLY = {"vision_pretrain": 0, "data.stage1_decimals": 1, "external_decoder": 3}


def _dotted(obj: Any, name: str) -> Any:
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class TrainConfig:
    stage: int = 1
    seed: int = 0
    out: str = "runs/train"
    steps: int = 100                      # optimizer steps
    batch_size: int = 1                   # samples per micro-batch per process
    grad_accum: int = 1                   # micro-batches per optimizer step
    grad_clip: float = 1.0                # max global grad norm (0: off)
    strategy: str = "ddp"                 # ddp or fsdp (FSDP2 fully_shard) when world size > 1
    mixed_precision: str = "auto"         # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # passed to the LLM
    train_encoders: bool = False          # unfreeze the vision towers (only where no pretrained towers exist)
    trainable: list[str] | None = None    # top-level parts that train, replacing the stage's set (e.g. [decoders])
    cache_frozen: bool = True             # reuse frozen towers' features (and REF states when only decoders train)
    checkpoint_every: int = 50            # steps between resumable checkpoints
    log_every: int = 1
    save_trainable_only: bool = False     # final model folder: only trained tensors (base loads from its path)
    loss_weights: dict[str, float] = field(default_factory=dict)  # override ModelConfig.loss_weights
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSource = field(default_factory=ModelSource)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    external_decoder: ExternalDecoderConfig | None = None
    vision_pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)

    def validate(self) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage}: use one of {STAGES}")
        if self.stage == 0:
            if self.vision_pretrain.scenes < 1:
                raise ConfigError("vision_pretrain.scenes must be >= 1")
            if not 0 <= self.vision_pretrain.brightness_jitter < 1:
                raise ConfigError(f"vision_pretrain.brightness_jitter={self.vision_pretrain.brightness_jitter}: "
                                  "use a value in [0, 1) (a gain of 1 +- j)")
            defaults = TrainConfig()
            unused = [name for name in STAGE0_UNUSED if _dotted(self, name) != _dotted(defaults, name)]
            if unused:
                raise ConfigError(f"stage 0 (tower pretraining) does not use {unused}: remove them from its "
                                  "config (they apply to stages 1-3; vision_pretrain configures stage 0)")
        elif not self.data.train:
            raise ConfigError("data.train is not set: point it at a folder of shards "
                              "(e.g. written by 'refvlm data simworld')")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.checkpoint_every < 1:
            raise ConfigError("steps, batch_size, grad_accum and checkpoint_every must all be >= 1")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}: use one of {STRATEGIES}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: use one of {PRECISIONS}")
        if self.model.preset is None and self.model.init_from is None:
            raise ConfigError("model: set preset (tiny, nano, paper) or init_from (a model folder)")
        if self.trainable is not None and (not self.trainable or set(self.trainable) - set(MODEL_PARTS)):
            raise ConfigError(f"trainable={self.trainable}: list parts among {MODEL_PARTS}")
        if self.stage == 3 and self.external_decoder is None:
            raise ConfigError("stage 3 needs external_decoder: {unit: mask, kind: sam} or "
                              "{unit: box, kind: grounding_dino}")
        for name, only in STAGE_ONLY.items():
            if self.stage not in (0, only) and _dotted(self, name) != _dotted(TrainConfig(), name):
                raise ConfigError(f"{name} is read by stage {only} only (stage {self.stage} would ignore it): "
                                  f"remove it from this config or run --stage {only}")
        if self.optim.lr <= 0 or self.optim.warmup_steps < 0 or not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError("optim: lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Defaults per stage (paper IV-D: a high rate for the projector alone, lower once the LLM trains).
STAGE_PRESETS: dict[int, dict[str, Any]] = {
    0: {"optim": {"lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.05}},
    1: {"optim": {"lr": 1e-3, "warmup_steps": 10}},
    2: {"optim": {"lr": 2e-4, "warmup_steps": 10, "weight_decay": 0.0}},
    3: {"optim": {"lr": 1e-4, "warmup_steps": 5}},
}

def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_dict(data: dict[str, Any], stage: int | None = None) -> TrainConfig:
    """Dataclass defaults <- stage preset <- ``data``; ``stage`` (e.g. from --stage) wins."""
    stage = int(stage if stage is not None else data.get("stage", 1))
    merged = _merge(STAGE_PRESETS.get(stage, {}), data)
    merged["stage"] = stage
    return dataclass_from_dict(TrainConfig, merged, "train config").validate()


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist: pass a YAML/JSON file such as "
                          "configs/train/tiny_stage1.yaml")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as error:  # yaml.YAMLError / JSONDecodeError: both mean a broken file
        raise ConfigError(f"{path} does not parse ({error}): fix its syntax") from error
    return data or {}


def load_config(path: str | os.PathLike, stage: int | None = None, **overrides: Any) -> TrainConfig:
    """TrainConfig from a file; ``overrides`` (e.g. out=...) replace top-level fields."""
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data, stage)
