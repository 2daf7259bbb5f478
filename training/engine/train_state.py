"""Resumable training checkpoints, written atomically.

One file ``<out>/checkpoints/last.pt`` holds the trainable model state, the optimizer,
the scheduler, every process's RNG states (python, numpy, torch, cuda) and data-loader
position, and the step. It is written with ``refvlm_core.atomic.atomic_write`` (temp
file in the same folder, fsync, ``os.replace``, folder fsync): a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from refvlm_core.atomic import atomic_write
from refvlm_core.errors import CheckpointError

CHECKPOINT_NAME = "last.pt"
FORMAT = "refvlm-train-checkpoint-1"


def checkpoint_path(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints" / CHECKPOINT_NAME


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def model_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trainable model tensors, optimizer state) gathered in full on CPU; works for plain,
    DDP and FSDP2 models (a collective under FSDP: call it on every process)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options())


def load_model_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_options())


def save_checkpoint(path: Path, *, step: int, model_sd: dict, optim_sd: dict, scheduler_sd: dict,
                    rng_states: list[dict], loader_states: list[dict], extra: dict | None = None) -> Path:
    state = {"format": FORMAT, "step": step, "model": model_sd, "optimizer": optim_sd, "scheduler": scheduler_sd,
             "rng": rng_states, "loader": loader_states, "extra": extra or {}}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: run without --resume to start fresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are pickles
    except Exception as error:
        raise CheckpointError(f"{path} cannot be read ({error}): delete it to start over") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this version: delete it to start over")
    return state
