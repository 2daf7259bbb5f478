"""Shared set-up of the training-engine tests: a tiny SimWorld shard and a tiny-preset
stage-2 config that checkpoints every 2 of its 4 steps."""
from __future__ import annotations

from pathlib import Path

from refvlm_training.engine.config import config_from_dict


def write_tiny_train_data(tmp_path_factory) -> Path:
    from refvlm_training.simworld import SimWorldConfig, write_split

    out = tmp_path_factory.mktemp("simworld") / "train"
    write_split("train", 2, out, SimWorldConfig(seed=3, width=64, height=48), progress=False, max_per_task=1)
    return out


def tiny_train_config(data_dir: Path, out: Path, lr: float = 1e-3, **fields):
    base = {"stage": 2, "out": str(out), "steps": 4, "batch_size": 1, "checkpoint_every": 2,
            "data": {"train": str(data_dir)}, "model": {"preset": "tiny"},
            "optim": {"lr": lr, "warmup_steps": 1}}
    base.update(fields)
    return config_from_dict(base)
