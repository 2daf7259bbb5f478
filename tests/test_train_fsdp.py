"""FSDP2 (fully_shard) training on 2 CPU processes over gloo, tiny preset, SimWorld data:
the sharded run equals one process with the same global batch, its final model folder
(gathered on rank 0) loads, its last.pt holds the full trainable state, and a run
SIGKILLed after a checkpoint resumes onto the same weights. LoRA under FSDP is refused."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from refvlm_core.errors import ConfigError
from train_helpers import tiny_train_config, write_tiny_train_data

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
# fp32 CPU: sharded and replicated runs differ only in rounding, which AdamW amplifies where a
# gradient is small against it (measured 1.6e-5, 1.6% of one lr step, on a pixel-decoder conv
# under a GroupNorm; a wrong gradient would differ by whole steps of ~lr)
TOLERANCE = 5e-5
LR = 1e-3
# Parameters whose gradient is zero in exact arithmetic (conv biases under a GroupNorm, attention
# key biases under the softmax): AdamW turns their rounding-level gradients into steps of up to
# ~lr whose sign is noise, so on them the two runs agree only to a few optimizer steps' size.
ZERO_GRADIENT = re.compile(r"(memory\.proj\.\d+\.0\.bias|smooth\.\d+\.0\.bias|\.k\.bias)$")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_train_data(tmp_path_factory)



def _torchrun(cfg_path: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "refvlm_training.engine", "--stage", "2", "--config", str(cfg_path), "--no-progress", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest difference over the parameters with a real gradient; the zero-gradient ones
    are checked against the optimizer's step size here."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    noise = [k for k in a if ZERO_GRADIENT.search(k)]
    assert len(noise) < 0.1 * len(a), noise  # the pattern names a few biases, not the model
    for k in noise:
        assert float((a[k] - b[k]).abs().max()) < 4 * LR, k  # 4 steps of at most ~lr each
    return max((float((a[k].float() - b[k].float()).abs().max()), k) for k in a if k not in noise)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """One process, accumulation 2: the reference for 2 FSDP processes with accumulation 1."""
    from refvlm_training.engine.trainer import train

    out = tmp_path_factory.mktemp("single")
    # like for like: FSDP runs without the frozen-output cache (rounding differences of the
    # cached features, ~1e-7, grow to ~2e-4 through AdamW in 4 steps)
    return train(tiny_train_config(data_dir, out, lr=LR, grad_accum=2, cache_frozen=False), progress=False)


def test_two_process_fsdp_equals_one_process(tmp_path, data_dir, single):
    from refvlm_core.checkpoint import load_model
    from refvlm_training.engine.train_state import checkpoint_path, load_checkpoint

    cfg_path = tmp_path / "fsdp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_train_config(data_dir, tmp_path / "fsdp", lr=LR, grad_accum=1, strategy="fsdp").to_dict()))
    run = subprocess.run(_torchrun(cfg_path, 29581), env=ENV, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]

    one, two = _weights(single.model_dir), _weights(tmp_path / "fsdp" / "model")
    worst, where = _worst(one, two)
    assert worst < TOLERANCE, (worst, where)
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(single.out), rel=TOLERANCE)

    # The gathered folder loads as a plain model with exactly the saved tensors.
    loaded = load_model(tmp_path / "fsdp" / "model").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in two.items())
    # last.pt: full (unsharded) trainable tensors and their AdamW moments, step 4.
    state = load_checkpoint(checkpoint_path(tmp_path / "fsdp"))
    assert state["step"] == 4 and len(state["rng"]) == 2
    assert state["model"] and all(torch.equal(v, loaded[k]) for k, v in state["model"].items())
    moments = state["optimizer"]["state"]
    assert set(moments) <= set(state["model"])
    assert set(state["model"]) - set(moments) <= {"llm.lm.lm_head.weight"}  # tied: one state, embeddings'
    assert all(moments[k]["exp_avg"].shape == state["model"][k].shape for k in moments)
    print(f"fsdp vs single process: worst weight difference {worst:.2e}")


def test_fsdp_sigkill_then_resume_ends_on_the_same_weights(tmp_path, data_dir, single):
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_train_config(data_dir, tmp_path / "kill", lr=LR, grad_accum=1, strategy="fsdp").to_dict()))
    process = subprocess.Popen(_torchrun(cfg_path, 29582), env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if "checkpoint step 2" in line:
                os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
                break
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not (tmp_path / "kill" / "model").exists()  # it really died before the end
    resumed = subprocess.run(_torchrun(cfg_path, 29583, "--resume"), env=ENV, capture_output=True,
                             text=True, timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "kill") == pytest.approx(_losses(single.out), rel=TOLERANCE)
    worst, where = _worst(_weights(single.model_dir), _weights(tmp_path / "kill" / "model"))
    assert worst < TOLERANCE, (worst, where)


def test_fsdp_with_lora_is_refused(tmp_path, data_dir):
    from refvlm_training.engine.distributed import DistInfo
    from refvlm_training.engine.trainer import Trainer

    cfg = tiny_train_config(data_dir, tmp_path / "lora", lr=LR, strategy="fsdp", lora={"enabled": True},
                  optim={"lr": 1e-3, "weight_decay": 0.0})
    with pytest.raises(ConfigError, match="use strategy: ddp"):
        Trainer(cfg, info=DistInfo(rank=0, world_size=2), progress=False)
