"""The plain-torch ViT (refvlm_core.vit) is open_clip's VisionTransformer for the presets'
tower configs: same parameter names and shapes, same seeded initial weights, same
outputs; building a preset's encoder no longer imports open_clip."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from refvlm_core import vit
from refvlm_core.config import preset

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["tiny", "nano"])
def test_same_tower_as_open_clip(name):
    from open_clip.model import _build_vision_tower

    cfg = preset(name).vision.vit_custom
    assert vit.is_plain(cfg)
    torch.manual_seed(3)
    theirs = _build_vision_tower(embed_dim=cfg["width"], vision_cfg=dict(cfg)).eval()
    torch.manual_seed(3)
    ours = vit.build(cfg).eval()
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same draws in the same order
    images = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        x = theirs._embeds(images)
        assert torch.allclose(ours._embeds(images), x, atol=1e-6)
        assert torch.allclose(ours.transformer.resblocks[0](x), theirs.transformer.resblocks[0](x), atol=1e-5)
    assert ours.grid_size == theirs.grid_size and ours.transformer.width == theirs.transformer.width


def test_other_open_clip_fields_still_use_open_clip():
    from refvlm_core.encoders import build_vit

    cfg = preset("tiny").vision
    cfg.vit_custom = {**cfg.vit_custom, "ls_init_value": 0.1}
    assert not vit.is_plain(cfg.vit_custom)
    tower = build_vit(cfg)
    assert "open_clip" in type(tower).__module__ and "transformer.resblocks.0.ls_1.gamma" in tower.state_dict()


def test_preset_encoder_does_not_import_open_clip():
    code = ("import sys; from refvlm_core.config import preset; from refvlm_core.encoders import DualImageEncoder; "
            "DualImageEncoder(preset('nano').vision); print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
