"""The plain-torch ConvNeXt (refvlm_core.convnext) is timm's ConvNeXt for the presets'
trunk configs: same modules, parameter names and shapes, same seeded initial weights,
same outputs; the shipped nano weights load into it strictly and give timm's pyramid;
building and loading models/nano no longer imports timm."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refvlm_core import convnext
from refvlm_core.config import preset

torch.set_num_threads(1)
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "nano"
OTHER_PLAIN = {"depths": [1, 2, 1, 1], "dims": [8, 16, 24, 32], "kernel_sizes": [3, 5, 7, 9],
               "ls_init_value": None, "drop_path_rate": 0.3}


def _timm(cfg: dict):
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(num_classes=0, **cfg)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # float32 bit patterns: tells -0.0 from 0.0


@pytest.mark.parametrize("cfg", [preset("tiny").vision.convnext_custom, preset("nano").vision.convnext_custom,
                                 OTHER_PLAIN], ids=["tiny", "nano", "other"])
def test_same_trunk_as_timm(cfg):
    assert convnext.is_plain(cfg)
    torch.manual_seed(3)
    theirs = _timm(cfg)
    torch.manual_seed(3)
    ours = convnext.build(cfg)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)  # the same draws in the same order
    assert [n for n, _ in theirs.named_modules()] == [n for n, _ in ours.named_modules()]
    assert ours.feature_info == theirs.feature_info and ours.num_features == theirs.num_features
    images = torch.randn(2, 3, 64, 64)
    for train in (False, True):  # train: the same drop-path draws
        theirs.train(train), ours.train(train)
        torch.manual_seed(4)
        expected = (theirs(images), theirs.forward_features(images))
        torch.manual_seed(4)
        got = (ours(images), ours.forward_features(images))
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected))


def test_other_timm_fields_still_use_timm():
    from refvlm_core.encoders import build_convnext

    cfg = preset("tiny").vision
    for extra in ({"conv_mlp": True}, {"kernel_sizes": 4}, {"depths": [1, 1, 1]}, {"dims": 8}):
        custom = {**cfg.convnext_custom, **extra}
        assert not convnext.is_plain(custom)
    cfg.convnext_custom = {**cfg.convnext_custom, "conv_mlp": True}
    trunk = build_convnext(cfg)
    assert type(trunk).__module__ == "timm.models.convnext" and trunk.stages[0].blocks[0].use_conv_mlp


def _nano_encoder():
    from safetensors.torch import load_file

    from refvlm_core.checkpoint import load_config
    from refvlm_core.encoders import DualImageEncoder

    vision = load_config(MODEL_DIR).vision
    prefix = "encoder.convnext."
    state = {k[len(prefix):]: v.float() for k, v in load_file(str(MODEL_DIR / "model.safetensors")).items()
             if k.startswith(prefix)}
    return vision, DualImageEncoder(vision), state


def test_shipped_weights_load_strictly_and_give_timms_pyramid():
    vision, encoder, state = _nano_encoder()
    assert type(encoder.convnext) is convnext.ConvNeXt
    encoder.convnext.load_state_dict(state, strict=True)
    theirs = _timm(vision.convnext_custom).eval()
    theirs.load_state_dict(state, strict=True)
    images = torch.rand(2, 3, vision.image_size, vision.image_size)
    with torch.no_grad():
        ours = encoder.convnext_pyramid(images)
        encoder.convnext = theirs
        expected = encoder.convnext_pyramid(images)
    assert [p.shape for p in ours] == [p.shape for p in expected]
    assert all(torch.allclose(o, e, atol=1e-6) for o, e in zip(ours, expected))


def test_tower_file_of_a_timm_trunk_loads(tmp_path):
    from safetensors.torch import save_file

    from refvlm_core.encoders import load_tower_weights

    cfg = preset("tiny").vision.convnext_custom
    torch.manual_seed(5)
    theirs = _timm(cfg)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "convnext.safetensors"))
    ours = convnext.build(cfg)
    load_tower_weights(ours, str(tmp_path / "convnext.safetensors"), ("visual.trunk.", "trunk.", "convnext."))
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())


def test_nano_does_not_import_timm():
    # the whole load is checked in tests/test_llama.py (no timm, torchvision, open_clip, ...)
    code = ("import sys; from refvlm_core.checkpoint import load_config; "
            "from refvlm_core.encoders import DualImageEncoder; "
            f"DualImageEncoder(load_config({str(MODEL_DIR)!r}).vision); "
            "print(sorted(m for m in ('timm', 'torchvision', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["[]"], out.stdout
