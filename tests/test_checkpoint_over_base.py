"""The over_base checkpoint (issue 5): non-LLM parts, unmerged LoRA adapters and the TRP
token rows only; round trips through load_model / Predictor; LoRA training moves only
adapters, TRP rows and non-LLM parts; broken files give CheckpointError. Tiny preset."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_samples import forced_answer_hook, mixed_samples
from refvlm_core import trp
from refvlm_core.config import preset
from refvlm_core.errors import CheckpointError, ConfigError

torch.set_num_threads(1)
SEED = 0


def _lora_config(data: str = "unused", **fields):
    from refvlm_training.engine.config import config_from_dict

    base = {"stage": 2, "steps": 1, "data": {"train": data}, "model": {"preset": "tiny"},
            "lora": {"enabled": True, "r": 4, "alpha": 8,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
    base.update(fields)
    return config_from_dict(base)


@pytest.fixture(scope="module")
def lora_model():
    """Tiny model with LoRA whose adapters and TRP rows moved away from their init
    (lora_B starts at zero: untouched adapters would make any round trip pass)."""
    from refvlm_core.model import RefVLM
    from refvlm_training.engine.stages import configure_stage

    torch.manual_seed(SEED)
    model = RefVLM.from_config(preset("tiny"))
    configure_stage(model, _lora_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        embed = model.llm.causal_lm.get_input_embeddings().weight
        ids = sorted(model.llm.token_ids.values())
        embed[ids] += torch.randn(len(ids), embed.shape[1], generator=generator) * 0.5
    model.eval()
    return model


def _losses(model) -> dict[str, torch.Tensor]:
    processor = model.processor
    batch = processor.collate([processor.encode_sample(s) for s in mixed_samples()[:2]])
    with torch.no_grad():
        return model(batch)


def _load(folder: Path, seed: int = SEED):
    from refvlm_core.checkpoint import load_model

    torch.manual_seed(seed)  # tiny's "base LLM" is its seeded random init
    return load_model(folder).eval()


def test_float32_round_trip_is_exact(lora_model, tmp_path):
    from refvlm_core.checkpoint import save_model

    save_model(lora_model, tmp_path, mode="over_base", dtype="float32")
    loaded = _load(tmp_path)
    expected, got = _losses(lora_model), _losses(loaded)
    assert all(torch.equal(expected[k], got[k]) for k in expected), (expected, got)
    from refvlm_core.model import RefVLM

    torch.manual_seed(SEED)  # the same base without adapters and trained rows: other losses
    assert not torch.equal(_losses(RefVLM.from_config(preset("tiny")).eval())["loss_lm"], expected["loss_lm"])


def test_float16_predictions_match(lora_model, tmp_path):
    from refvlm_core.checkpoint import save_model
    from refvlm_core.predictor import Predictor

    save_model(lora_model, tmp_path, mode="over_base")  # float16 by default
    torch.manual_seed(SEED)
    loaded = Predictor.from_pretrained(tmp_path, quantize="none")  # float LLM weights: storage alone differs
    answer = f"{trp.format_phrase('cups', ('box',), 2)} and {trp.format_phrase('a bowl', ('mask',), 1)}"
    image = mixed_samples()[0].image
    results = [p.predict(image, "Find things.", max_new_tokens=40,
                         logits_hook=forced_answer_hook(lora_model.llm.tokenizer, answer))
               for p in (Predictor(lora_model), loaded)]
    a, b = results
    assert a.trp_text == b.trp_text == answer
    for x, y in zip(a.objects, b.objects):
        if x.box_xyxy is not None:  # pixels of an 80x60 image: float16 storage moves them < 0.1 px
            assert abs(x.box_xyxy - y.box_xyxy).max() < 0.1, (x.box_xyxy, y.box_xyxy)
        if x.mask is not None:
            assert (x.mask != y.mask).mean() < 0.01
    expected, got = _losses(lora_model), _losses(loaded.model)
    assert all(torch.allclose(expected[k], got[k], rtol=1e-2, atol=1e-3) for k in expected), (expected, got)


def test_file_holds_no_base_llm_matrix(lora_model, tmp_path):
    from refvlm_core.checkpoint import save_model
    save_model(lora_model, tmp_path / "over", mode="over_base")
    with safe_open(str(tmp_path / "over" / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        rows = handle.get_slice("llm.token_rows.embed").get_shape()
    llm_keys = [k for k in keys if k.startswith("llm.")]
    assert llm_keys and all(k.startswith("llm.lora.") and "lora_" in k or k.startswith("llm.token_rows.")
                            for k in llm_keys), llm_keys
    assert rows == [len(trp.SPECIAL_TOKENS), 64]
    with pytest.raises(CheckpointError, match="LoRA adapters"):
        save_model(lora_model, tmp_path / "full")  # a full file of a peft model would not load
    from refvlm_core.model import RefVLM

    torch.manual_seed(SEED)
    plain = RefVLM.from_config(preset("tiny"))
    save_model(plain, tmp_path / "full")
    over, full = (tmp_path / d / "model.safetensors" for d in ("over", "full"))
    assert over.stat().st_size < full.stat().st_size / 5, (over.stat().st_size, full.stat().st_size)


def test_lora_training_moves_only_adapters_rows_and_non_llm(tmp_path):
    from refvlm_training.engine.trainer import Trainer
    from refvlm_simworld import SimWorldConfig
    from refvlm_training.data.simworld import write_split

    data = tmp_path / "data"
    write_split("train", 1, data, SimWorldConfig(seed=3, width=64, height=48), progress=False, max_per_task=1)
    trainer = Trainer(_lora_config(str(data), out=str(tmp_path / "run"), steps=2, batch_size=2,
                                   optim={"lr": 1e-2, "warmup_steps": 0}), progress=False)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.fit()
    ids = sorted(model.llm.token_ids.values())
    embed_name = next(n for n, p in model.named_parameters() if p is model.llm.causal_lm.get_input_embeddings().weight)
    keep = torch.ones(before[embed_name].shape[0], dtype=torch.bool)
    keep[ids] = False
    after = dict(model.named_parameters())
    assert torch.equal(after[embed_name][keep], before[embed_name][keep])  # original vocabulary untouched
    assert not torch.equal(after[embed_name][ids], before[embed_name][ids])  # TRP rows trained
    for name, param in after.items():
        moved = not torch.equal(param, before[name])
        if name.startswith("llm.") and "lora_" not in name and name != embed_name:
            assert not moved, name  # frozen base LLM
    assert any(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n)
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("decoders."))
    # the run's model folder is over_base and loads back to the trained model
    with safe_open(str(result.model_dir / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["mode"] == "over_base"
    loaded = _load(result.model_dir)
    assert torch.allclose(loaded.llm.causal_lm.get_input_embeddings().weight[ids],
                          after[embed_name][ids].detach(), atol=1e-2)
    with pytest.raises(ConfigError, match="weight_decay"):  # decay would shrink the frozen rows
        Trainer(_lora_config(str(data), out=str(tmp_path / "wd"), optim={"weight_decay": 0.1}), progress=False)


def test_broken_over_base_files(lora_model, tmp_path):
    from refvlm_core.checkpoint import save_model

    save_model(lora_model, tmp_path, mode="over_base")
    weights = tmp_path / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(weights))
    with pytest.raises(CheckpointError, match="another base LLM"):
        _load(tmp_path, seed=SEED + 1)  # a different base than the one saved over
    for drop, message in (("llm.token_rows.embed", "TRP token rows"),
                          (next(k for k in tensors if "lora_A" in k), "LoRA tensors do not match"),
                          ("projector.net.0.weight", "lacks 1 weights")):
        save_file({k: v for k, v in tensors.items() if k != drop}, str(weights), metadata=metadata)
        with pytest.raises(CheckpointError, match=message):
            _load(tmp_path)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        _load(tmp_path)
