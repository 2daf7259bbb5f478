"""Vision towers in training: they move when asked and only then; stage 0 (dense
pretraining on SimWorld) lowers its loss, resumes, and its towers load into stage 1; the
frozen-output caches give the same losses as recomputing; a decoder-only phase moves
the decoders alone and keeps the LoRA adapters (over_base)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from refvlm_training.engine.config import config_from_dict
from train_helpers import kill_after_checkpoint, resume, tiny_train_config, train_command, write_tiny_train_data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_train_data(tmp_path_factory)


def _tower_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.encoder.named_parameters()}


@pytest.mark.parametrize("train_encoders", [True, False])
def test_a_training_step_moves_the_towers_only_when_asked(tmp_path, data_dir, train_encoders):
    from refvlm_training.engine.trainer import Trainer

    trainer = Trainer(tiny_train_config(data_dir, tmp_path, steps=1, train_encoders=train_encoders), progress=False)
    model = trainer.model
    before = _tower_snapshot(model)
    trainer.train_step()
    moved = {n for n, p in model.encoder.named_parameters() if not torch.equal(before[n], p)}
    if train_encoders:
        # every tower tensor the forward uses moves (blocks past vit_layer and unused ConvNeXt
        # stages get no gradient), in both towers
        features = model.encoder(torch.rand(1, 3, 64, 64))
        (features.patch_tokens.sum() + sum(level.sum() for level in features.pyramid)).backward()
        used = {n for n, p in model.encoder.named_parameters() if p.grad is not None}
        assert model.encoder.training and moved == used
        assert any(n.startswith("vit.") for n in moved) and any(n.startswith("convnext.") for n in moved)
        assert len(moved) >= 40, f"only {len(moved)} tower tensors moved"
    else:
        assert not model.encoder.training and not moved


def stage0_config(out: Path, steps: int = 12, **fields):
    base = {"stage": 0, "out": str(out), "steps": steps, "batch_size": 4, "checkpoint_every": 4,
            "model": {"preset": "tiny"}, "optim": {"lr": 3e-3, "warmup_steps": 1},
            "vision_pretrain": {"scenes": 8, "width": 96, "height": 64, "head_dim": 16}}
    base.update(fields)
    return config_from_dict(base)


def _metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_stage0_lowers_its_loss_and_its_towers_load_in_stage1(tmp_path):
    from refvlm_core.config import preset
    from refvlm_core.encoders import DualImageEncoder
    from refvlm_training.engine.stage0 import pretrain_towers

    result = pretrain_towers(stage0_config(tmp_path / "s0", steps=40), progress=False)
    lines = _metric_lines(tmp_path / "s0")
    first, last = lines[0]["loss"], sum(m["loss"] for m in lines[-5:]) / 5
    print(f"stage 0 loss {first:.3f} -> {last:.3f}")
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert last < 0.8 * first, (first, last)
    vision = preset("tiny").vision
    vision.vit_weights = str(result.model_dir / "vit.safetensors")
    vision.convnext_weights = str(result.model_dir / "convnext.safetensors")
    loaded = DualImageEncoder(vision)
    fresh = DualImageEncoder(preset("tiny").vision)
    saved = dict(loaded.named_parameters())
    assert not all(torch.equal(p, saved[n]) for n, p in fresh.named_parameters())
    assert not loaded.trainable  # loaded towers start frozen


def test_stage0_resumes_after_a_kill_on_the_same_curve(tmp_path):
    """The same loop as stage 2 (loop.fit): the same metrics file, brightness jitter included
    (a resumed run draws the same gains as an unbroken one)."""
    from refvlm_training.engine.stage0 import pretrain_towers

    def config(out):
        return stage0_config(out, steps=8, vision_pretrain={"scenes": 8, "width": 96, "height": 64, "head_dim": 16,
                                                            "brightness_jitter": 0.5})

    pretrain_towers(config(tmp_path / "ref"), progress=False)
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path / "kill").to_dict()))
    command = train_command(0, cfg_path)
    assert kill_after_checkpoint(command, 4) == -signal.SIGKILL and not (tmp_path / "kill" / "model").exists()
    resumed = resume(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, kill = _metric_lines(tmp_path / "ref"), _metric_lines(tmp_path / "kill")
    assert [m["step"] for m in kill] == list(range(1, 9))
    assert [m["loss"] for m in kill] == pytest.approx([m["loss"] for m in ref], rel=1e-4)


def test_cached_features_and_ref_states_equal_recomputed_ones(tmp_path, data_dir):
    from refvlm_training.engine.trainer import Trainer

    cached = Trainer(tiny_train_config(data_dir, tmp_path / "a", trainable=["decoders"]), progress=False)
    plain = Trainer(tiny_train_config(data_dir, tmp_path / "b", trainable=["decoders"], cache_frozen=False),
                    progress=False)
    assert cached.cache is not None and cached.cache.cache_refs and plain.cache is None
    samples = cached.stream.next_batch(2)
    batch = cached._encode(samples)
    with torch.no_grad():
        for _ in range(2):  # the second call is served from the cache
            with_cache = cached.model(batch, **cached._frozen_inputs(batch))
        recomputed = plain.model(batch)
    assert cached.cache.hits > 0
    for name, value in recomputed.items():
        if name not in ("loss_lm", "loss"):  # no LLM loss when the LLM's outputs come from the cache
            assert float(with_cache[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name


def test_decoder_phase_moves_only_the_decoders(tmp_path, data_dir):
    from refvlm_training.engine.trainer import Trainer

    trainer = Trainer(tiny_train_config(data_dir, tmp_path, steps=2, trainable=["decoders"]), progress=False)
    parts = {n.split(".")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert parts == {"decoders"}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    moved = {n.split(".")[0] for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert moved == {"decoders"}


def test_stage0_loss_weights_scale_their_terms(tmp_path):
    from refvlm_training.engine.stage0 import pretrain_towers

    pretrain_towers(stage0_config(tmp_path / "plain", steps=1), progress=False)
    pretrain_towers(stage0_config(tmp_path / "weighted", steps=1, vision_pretrain={
        "scenes": 8, "width": 96, "height": 64, "head_dim": 16, "loss_weights": {"depth": 0.0, "color": 3.0}}),
        progress=False)
    plain, weighted = _metric_lines(tmp_path / "plain")[0], _metric_lines(tmp_path / "weighted")[0]
    expected = plain["loss"] - plain["loss_depth"] + 2.0 * plain["loss_color"]  # same first batch, same init
    assert weighted["loss"] == pytest.approx(expected, rel=1e-5)
