"""Exports made on first use and reused: one folder per model under a cache folder.

    folder = cached_export("models/nano", cache_dir)   # exports once, then finds it again

The folder is ``<cache_dir>/<model name>-<key>``. The key hashes what the export is made
from: the model config as this code reads it and, for a saved model, the content of its
weight files (a preset's weights are the seeded random init of its config). A changed model has another key and is
exported again; an unchanged one is found again without loading it. An export is written
to a temporary folder and renamed into place when complete, so an interrupted export is
never taken for a finished one. The node still checks the manifest against the model it
loads (refvlm_export.manifest.check_export).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from refvlm_core.errors import ConfigError
from refvlm_export.manifest import FORMAT_VERSION, MANIFEST, config_hash, file_sha256
from refvlm_export.onnx_export import export_model, load_export_model

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
CACHE_ENV = "REFVLM_EXPORT_CACHE"


def default_cache_dir() -> Path:
    """``$REFVLM_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/refvlm/exports`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "refvlm" / "exports"


def model_key(model_arg: str) -> tuple[str, str]:
    """(model name, 16-hex key) of a preset name or a saved model folder: the model config as
    this code reads it (config_hash; a changed schema changes it too) and, for a folder, its
    weight files."""
    from refvlm_core.checkpoint import load_config
    from refvlm_core.config import PRESET_NAMES, preset

    digest = hashlib.sha256(f"format {FORMAT_VERSION}\n".encode())
    if model_arg in PRESET_NAMES:
        digest.update(f"preset {model_arg} seed 0 config {config_hash(preset(model_arg))}\n".encode())
        return model_arg, digest.hexdigest()[:16]
    folder = Path(model_arg)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{model_arg!r} is neither a preset {PRESET_NAMES} nor a saved model folder "
                          "(with config.json)")
    digest.update(f"config {config_hash(load_config(folder))}\n".encode())
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{path.name} {weights_digest(path)}\n".encode())
    return folder.resolve().name, digest.hexdigest()[:16]


def weights_digest(path: Path) -> str:
    """sha256 of a weight file's content: for safetensors, its metadata and every tensor by name
    (the same tensors saved twice can be laid out differently); other files byte for byte."""
    if path.suffix != ".safetensors":
        return file_sha256(path)
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as weights:
        digest.update(json.dumps(weights.metadata() or {}, sort_keys=True).encode())
        for name in sorted(weights.keys()):
            tensor = weights.get_tensor(name).contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cached_export(model_arg: str, cache_dir: str | Path | None = None,
                  say: Callable[[str], None] = log.info) -> Path:
    """The export folder of ``model_arg`` in ``cache_dir``, exported now if it is not there."""
    name, key = model_key(model_arg)
    folder = Path(cache_dir or default_cache_dir()) / f"{name}-{key}"
    if (folder / MANIFEST).is_file():
        say(f"export of {model_arg}: reusing {folder}")
        return folder
    say(f"export of {model_arg}: none in the cache yet, exporting to {folder} (once; minutes on a CPU)")
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    export_model(load_export_model(model_arg), partial)
    shutil.rmtree(folder, ignore_errors=True)  # a folder without a manifest: an older, unfinished one
    partial.rename(folder)
    return folder
