"""Shared set-up of the training-engine tests: a tiny SimWorld shard and a tiny-preset
stage-2 config that checkpoints every 2 of its 4 steps."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from refvlm_training.engine.config import config_from_dict


def write_tiny_train_data(tmp_path_factory) -> Path:
    from refvlm_simworld import SimWorldConfig
    from refvlm_training.data.simworld import write_split

    out = tmp_path_factory.mktemp("simworld") / "train"
    write_split("train", 2, out, SimWorldConfig(seed=3, width=64, height=48), progress=False, max_per_task=1)
    return out


def tiny_train_config(data_dir: Path, out: Path, lr: float = 1e-3, **fields):
    base = {"stage": 2, "out": str(out), "steps": 4, "batch_size": 1, "checkpoint_every": 2,
            "data": {"train": str(data_dir)}, "model": {"preset": "tiny"},
            "optim": {"lr": lr, "warmup_steps": 1}}
    base.update(fields)
    return config_from_dict(base)


TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def train_command(stage: int, config_path: Path) -> list[str]:
    """`refvlm train` as torchrun would start it, in a fresh interpreter."""
    return [sys.executable, "-m", "refvlm_training.engine", "--stage", str(stage), "--config", str(config_path),
            "--no-progress"]


def kill_after_checkpoint(command: list[str], step: int) -> int:
    """Run a training command, SIGKILL it as soon as it reports checkpoint ``step``; its return code."""
    process = subprocess.Popen(command, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith(f"checkpoint step {step}"):
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=30)
    return process.returncode


def resume(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command + ["--resume"], env=TRAIN_ENV, capture_output=True, text=True, timeout=150)
