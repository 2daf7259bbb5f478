"""The step of stages 1-3: data stream -> processor -> model losses -> AdamW step, with gradient
accumulation, clipping, bf16 autocast on GPU, and its atomic resumable checkpoints (model,
optimizer, scheduler, RNG and data position of every process). ``loop.fit`` runs it, as it
runs stage 0's step: logs, progress and checkpoint cadence are the loop's.

The objective of one optimizer step is the mean of the losses of its
``world_size * grad_accum`` micro-batches, so a run on N processes takes the same steps
as one process with N times the accumulation over the same samples.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from refvlm_core.errors import InputError
from refvlm_core.sample import Sample

from refvlm_training.engine import train_state as ckpt
from refvlm_training.engine.config import TrainConfig
from refvlm_training.engine.distributed import (DistInfo, all_reduce_mean, barrier, gather_objects,
                                                init_distributed, unwrap, wrap_model)
from refvlm_training.engine.loop import MODEL_DIR, TrainResult, fit, resume_metrics
from refvlm_training.engine.optim import build_optimizer, build_scheduler
from refvlm_training.engine.stages import build_model, configure_stage, count_trainable

log = logging.getLogger(__name__)


class SampleStream:
    """Endless micro-batches of Samples for this process, epoch after epoch; stage 1 gets
    the boxes-as-text variant. Its state is the shard loader's (position, epoch)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        from refvlm_training.data.loader import VTInstructDataset

        self.dataset = VTInstructDataset(cfg.data.train, seed=cfg.seed, shuffle=True, rank=info.rank,
                                         world_size=info.world_size, max_samples=cfg.data.max_samples)
        if len(self.dataset) == 0:
            raise InputError(f"{cfg.data.train} holds no samples for rank {info.rank} of {info.world_size}: "
                             "write more data (refvlm data simworld --n ...)")
        self.stage, self.decimals, self.workers = cfg.stage, cfg.data.stage1_decimals, cfg.data.num_workers
        self._iter = None

    def _next_sample(self) -> Sample:
        for _ in range(2):  # at most one epoch boundary per sample
            if self._iter is None:
                self._iter = iter(self.dataset) if self.workers == 0 else self._worker_iter()
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.dataset.set_epoch(self.dataset.epoch + 1)
        raise InputError("the training data yielded no readable sample in a whole epoch: check the shards")

    def _worker_iter(self):
        for batch in self.dataset.batches(1, num_workers=self.workers):
            yield from batch

    def next_batch(self, size: int) -> list[Sample]:
        samples = [self._next_sample() for _ in range(size)]
        if self.stage == 1:
            from refvlm_training.data.templates import to_stage1

            samples = [to_stage1(s, self.decimals) for s in samples]
        return samples

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._iter = None


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors anywhere inside dicts, lists and dataclasses (UnitTargets) onto ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    return value


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on GPU ('auto' or 'bf16'); fp32 on CPU unless 'bf16' is asked for."""
    use = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_process(seed: int, rank: int) -> None:
    """Distinct, reproducible RNG streams per process (after the shared model init)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None, progress: bool = True) -> None:
        self.cfg, self.info = cfg, info or init_distributed()
        self.out = Path(cfg.out)
        self.progress = progress
        self.model = self._prepare_model()
        self.processor = unwrap(self.model).processor
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.stream = SampleStream(cfg, self.info)
        self.cache = self._frozen_cache()
        self.step = 0
        self.skipped: Counter[str] = Counter()
        seed_process(cfg.seed, self.info.rank)

    # ---- setup ------------------------------------------------------------------------
    def _prepare_model(self) -> nn.Module:
        model = build_model(self.cfg)
        if self.cfg.stage == 3:
            from refvlm_training.engine.stage3 import swap_decoder

            swap_decoder(model, self.cfg.external_decoder)
        self.params = configure_stage(model, self.cfg)
        if self.cfg.gradient_checkpointing:
            llm = model.llm.lm
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.info.device)
        model.train()
        trainable, total = count_trainable(model)
        if self.info.is_main:
            log.info("stage %d: %d of %d parameters train", self.cfg.stage, trainable, total)
        wrapped = wrap_model(model, self.info, self.cfg.strategy, find_unused=self.cfg.stage == 3)
        # FSDP2 swaps each parameter for a sharded DTensor one: the optimizer must hold those.
        self.params = [p for p in wrapped.parameters() if p.requires_grad]
        return wrapped

    def _frozen_cache(self):
        """A cache of frozen parts' outputs (towers; and REF states when only decoders train)."""
        from refvlm_training.engine.frozen_cache import FrozenOutputsCache

        model = unwrap(self.model)
        if not self.cfg.cache_frozen or model.encoder.trainable:
            return None
        if self.cfg.strategy == "fsdp" and self.info.distributed:
            # sharded parameters gather only inside the wrapped forward: no calls from outside
            log.info("cache_frozen is off under FSDP (frozen parts run inside the sharded forward)")
            return None
        upstream_frozen = not any(p.requires_grad for part in (model.projector, model.llm) for p in part.parameters())
        return FrozenOutputsCache(cache_refs=upstream_frozen)

    def _frozen_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.cache is None:
            return {}
        model, keys = unwrap(self.model), self.cache.image_keys(batch)
        features = self.cache.features(model, batch, keys)
        if not self.cache.cache_refs:
            return {"features": features}
        return {"features": features, "ref_embeddings": self.cache.ref_embeddings(model, batch, features, keys)}

    # ---- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        model_sd, optim_sd = ckpt.model_state(self.model, self.optimizer)
        rngs = gather_objects(ckpt.rng_state(), self.info)
        loaders = gather_objects(self.stream.state_dict(), self.info)
        if self.info.is_main:
            ckpt.save_checkpoint(ckpt.checkpoint_path(self.out), step=self.step, model_sd=model_sd,
                                 optim_sd=optim_sd, scheduler_sd=self.scheduler.state_dict(),
                                 rng_states=rngs, loader_states=loaders,
                                 extra={"config": self.cfg.to_dict(), "skipped": dict(self.skipped)})
            print(f"checkpoint step {self.step}", flush=True)
        barrier(self.info)

    def resume(self) -> int:
        state = ckpt.load_checkpoint(ckpt.checkpoint_path(self.out))
        if len(state["rng"]) != self.info.world_size:
            raise InputError(f"the checkpoint was written by {len(state['rng'])} processes; resume with "
                             f"the same number (got {self.info.world_size})")
        ckpt.load_model_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["loader"][self.info.rank])
        ckpt.set_rng_state(state["rng"][self.info.rank])
        self.skipped = Counter(state["extra"].get("skipped", {}))
        self.step = int(state["step"])
        if self.info.is_main:
            resume_metrics(self.out, self.step)
        return self.step

    # ---- one optimizer step -----------------------------------------------------------
    def _encode(self, samples: list[Sample]) -> dict[str, Any] | None:
        encoded = []
        for sample in samples:
            try:
                encoded.append(self.processor.encode_sample(sample))
            except InputError as error:  # a sample the model cannot take (too long, bad targets)
                log.warning("skipping sample %s: %s", sample.id, error)
                self.skipped["encode_error"] += 1
        return to_device(self.processor.collate(encoded), self.info.device) if encoded else None

    def _sync_context(self, sync: bool):
        model = self.model
        if sync or not self.info.distributed:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):  # DDP: skip the all-reduce until the last micro-batch
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(False)
            return _restore_gradient_sync(model)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        accum = self.cfg.grad_accum
        sums: dict[str, float] = defaultdict(float)
        for micro in range(accum):
            batch = self._encode(self.stream.next_batch(self.cfg.batch_size))
            with self._sync_context(micro == accum - 1):
                if batch is None:  # keep every process in the same collectives: a zero loss
                    loss = sum(p.sum() * 0.0 for p in self.params)
                    losses = {"loss": loss}
                else:
                    with autocast_context(self.cfg, self.info.device):
                        losses = self.model(batch, **self._frozen_inputs(batch))
                    loss = losses["loss"]
                (loss / accum).backward()
            for name, value in losses.items():
                sums[name] += float(value.detach()) / accum
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = all_reduce_mean(dict(sums), self.info)
        metrics.update(grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0])
        return metrics

    def _clip(self) -> float:
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            grads = [p.grad.detach().norm() for p in self.params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
            norm = norm.full_tensor()
        return float(norm)

    # ---- the loop ---------------------------------------------------------------------
    def fit(self) -> TrainResult:
        return fit(self, self.cfg, is_main=self.info.is_main, progress=self.progress)

    def save_model(self) -> Path | None:
        """The trained model as a model folder (config.json + model.safetensors)."""
        from refvlm_core.checkpoint import has_lora, save_model

        folder = self.out / MODEL_DIR
        if self.cfg.strategy == "fsdp" and self.info.distributed:
            return _save_fsdp_model(self.model, folder, self.info, self.cfg.save_trainable_only)
        if self.info.is_main:
            model = unwrap(self.model)
            if self.cfg.lora.enabled or has_lora(model):  # adapters unmerged + TRP rows over the base LLM
                save_model(model, folder, mode="over_base")
            else:
                save_model(model, folder, mode="trainable" if self.cfg.save_trainable_only else "full")
        barrier(self.info)
        return folder if self.info.is_main else None


@contextlib.contextmanager
def _restore_gradient_sync(model: nn.Module):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _save_fsdp_model(model: nn.Module, folder: Path, info: DistInfo, trainable_only: bool) -> Path | None:
    """Gather the sharded parameters in full on rank 0 (a collective: every process calls
    it) and write the same model folder as the unsharded path, with the same writer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from refvlm_core.checkpoint import write_model_folder

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    full = get_model_state_dict(model, options=options)  # on rank 0 only; {} elsewhere
    if info.is_main:
        dropped = _tied_aliases(model)
        unique = {name: tensor.contiguous().clone() for name, tensor in full.items() if name not in dropped}
        write_model_folder(folder, unique, model, "trainable" if trainable_only else "full")
    barrier(info)
    return folder if info.is_main else None


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of tied parameters (lm_head = embeddings) to leave out: all but the first
    in sorted order, the one safetensors keeps on the unsharded path."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return {name for group in names.values() for name in sorted(group)[1:]}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run (or resume) one stage as configured; returns where the model was written."""
    trainer = Trainer(cfg, progress=progress)
    if resume:
        trainer.resume()
    return trainer.fit()
