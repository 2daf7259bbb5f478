"""Save and load a RefVLM as ``config.json`` + ``model.safetensors`` in one folder.

``trainable_only=True`` saves just the parameters that train (``requires_grad``), e.g.
the projector and decoders over a base LLM that the config loads from its own path.
Writes are atomic (temp file + rename): a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from refvlm_core.config import ModelConfig
from refvlm_core.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model, folder: str | os.PathLike, trainable_only: bool = False) -> Path:
    """Write config.json and model.safetensors into ``folder`` (created if needed)."""
    from safetensors.torch import save_file, save_model as save_all

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "refvlm", "trainable_only": str(bool(trainable_only)).lower()}
    if trainable_only:
        tensors = {name: p.detach().contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}
        if not tensors:
            raise CheckpointError("no trainable parameters to save: call model.trainable_parameters(stage) "
                                  "first, or save with trainable_only=False")
        _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_all(model, tmp, metadata=metadata))
    _atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(model.config.to_json()))
    return folder


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: pass a folder written by refvlm_core.checkpoint.save_model")
    try:
        return ModelConfig.from_json(path)
    except ConfigError as error:
        raise CheckpointError(f"{path} is not a valid model config ({error}): re-save the checkpoint") from error


def load_model(folder: str | os.PathLike):
    """Rebuild the model from config.json and load model.safetensors over it."""
    from safetensors import SafetensorError, safe_open

    from refvlm_core.model import RefVLM

    config = load_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: copy the weights next to {CONFIG_FILE} or re-save")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or not safetensors ({error}): re-save or re-copy it") from error
    model = RefVLM.from_config(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise CheckpointError(f"{path} holds {len(unexpected)} weights the model lacks (e.g. {unexpected[:3]}): "
                              "was it saved with another config?")
    if metadata.get("trainable_only") != "true":
        tied = {name for name in missing if _is_tied(model, name)}
        missing = [name for name in missing if name not in tied]
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} weights (e.g. {missing[:3]}): the file is "
                                  "incomplete; re-save it")
    return model


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """True for a parameter shared with another one (e.g. lm_head tied to embed_tokens)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(p is target and n != name for n, p in params.items())
