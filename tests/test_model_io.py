"""Checkpoint save/load, overlay drawing and the `refvlm infer` command on the tiny preset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_samples import mixed_samples
from refvlm_core.config import preset
from refvlm_core.errors import CheckpointError
from refvlm_core.results import ReferredObject, Result
from refvlm_training.engine.stages import set_stage_trainable

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    from refvlm_core.model import RefVLM

    torch.manual_seed(0)
    return RefVLM.from_config(preset("tiny"))


def _same_outputs(a, b) -> bool:
    processor = a.processor
    batch = processor.collate([processor.encode_sample(s) for s in mixed_samples()[:2]])
    with torch.no_grad():
        la, lb = a(batch), b(batch)
    return all(torch.allclose(la[k], lb[k]) for k in la)


def test_full_checkpoint_round_trip(model, tmp_path):
    from refvlm_core.checkpoint import load_model, save_model

    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    torch.manual_seed(5)  # a different random init, overwritten by the load
    loaded = load_model(tmp_path)
    assert _same_outputs(model, loaded)


def test_trainable_only_checkpoint(model, tmp_path):
    from refvlm_core.checkpoint import load_model, save_model
    from safetensors import safe_open

    set_stage_trainable(model, 1)
    save_model(model, tmp_path, mode="trainable")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert all(k.startswith("projector.") for k in handle.keys())
    torch.manual_seed(0)  # same base init: tiny's "base LLM" is its seeded random init
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.projector.net[0].weight, model.projector.net[0].weight)
    set_stage_trainable(model, 2)


def test_corrupt_and_missing_checkpoints(model, tmp_path):
    from refvlm_core.checkpoint import load_model, save_model

    with pytest.raises(CheckpointError, match="model folder .*absent does not exist.*tools/train_nano.sh"):
        load_model(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)
    save_model(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid model config"):
        load_model(tmp_path)


def test_overlay_draws_each_kind():
    from refvlm_core.overlay import draw_result

    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[5:15, 5:15] = True
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[:, 0], keypoints[:, 1], keypoints[:, 2] = np.linspace(30, 55, 17), np.linspace(20, 38, 17), 0.9
    depth = np.tile(np.linspace(1, 4, 60, dtype=np.float32), (40, 1))
    depth[0, 0] = np.nan
    result = Result("p", "a", "t", (40, 60), objects=[
        ReferredObject("box", ("box",), 0, 0, (0, 5), 0.9, box_xyxy=np.array([20, 2, 50, 30], np.float32)),
        ReferredObject("mask", ("mask",), 0, 1, (5, 9), mask=mask),
        ReferredObject("man", ("keypoint",), 0, 2, (9, 13), keypoints=keypoints)])
    out = draw_result(image, result)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[10, 10].any() and out[2, 35].any() and not out[35, 2].any()
    with_depth = draw_result(image, Result("p", "a", "t", (40, 60), objects=[
        ReferredObject("depth", ("depth",), 0, 0, (0, 5), depth=depth)]))
    assert with_depth[20, 5].any() and not with_depth[0, 0].any()


def test_infer_cli(tmp_path, capsys):
    import cv2

    from refvlm_cli.main import main

    image_path, out_path = tmp_path / "in.png", tmp_path / "overlay.png"
    cv2.imwrite(str(image_path), mixed_samples()[0].image[..., ::-1])
    code = main(["infer", str(image_path), "What is <region>?", "--point", "20,20", "--preset", "tiny",
                 "--json", "--max-new-tokens", "4", "--out", str(out_path)])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["image_size"] == [60, 80] and set(payload["timings"]) >= {"encode", "prefill", "decode"}
    assert cv2.imread(str(out_path)).shape == (60, 80, 3)
    assert main(["infer", str(image_path), "hi", "--point", "500,5", "--preset", "tiny"]) == 2
    assert "outside" in capsys.readouterr().err
