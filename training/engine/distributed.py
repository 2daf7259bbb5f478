"""torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): gloo on CPU, nccl on GPU; the model wrapped in DDP or FSDP2.

Without those variables the run is one process and nothing is initialised, so the
same command works alone and under ``torchrun --nproc_per_node N``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from refvlm_core.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (or none when WORLD_SIZE is unset / 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, find_unused: bool = False) -> nn.Module:
    """DDP (replicated parameters, averaged gradients) or FSDP2 (sharded parameters).
    ``find_unused``: some trainable parameters get no gradient (e.g. SAM's unused mask tokens)."""
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from refvlm_core.checkpoint import has_lora

        if has_lora(model):  # the TRP-row gradient mask indexes full vocabulary rows, not shards
            raise ConfigError("strategy fsdp does not support lora.enabled (its token-row gradient hooks need "
                              "unsharded weights): use strategy: ddp, or disable lora")

        # Shard each LLM block and each decoder (each runs exactly once per forward on every
        # process), then the rest at the root. The projector stays in the root group: it runs
        # once or twice depending on whether a sample has region prompts, and a separate group
        # would then issue a different number of all-gathers per process (gloo aborts).
        layers = getattr(getattr(_base_llm(model), "model", None), "layers", [])
        for block in [*layers, *model.decoders.values()]:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"strategy={strategy!r}: use ddp or fsdp")


def _base_llm(model: nn.Module) -> nn.Module:
    llm = model.llm.lm
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged scalars over processes (the loss a single process would log)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                          device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.tolist())}


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj`` (rank order) on every process."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
