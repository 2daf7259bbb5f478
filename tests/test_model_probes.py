"""The parts that let the nano model refer, and the probes that measure them: shape and
colour in separate tower pathways, ROI grids, standardised <REF> states, per-object
linear probes and the <REF> spread (refvlm_training.evaluation.probes, `refvlm probe`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refvlm_core.config import preset

pytestmark = pytest.mark.usefixtures("one_thread")


def split_vision(**fields):
    vision = preset("tiny").vision
    vision.pyramid_input, vision.colour_channels, vision.object_maps = "luminance", 4, True
    for name, value in fields.items():
        setattr(vision, name, value)
    return vision


def _encoder(vision):
    from refvlm_core.encoders import DualImageEncoder

    torch.manual_seed(0)
    return DualImageEncoder(vision).eval()


def _same_luminance_other_hue() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images whose pixels have equal luminance and different hues."""
    torch.manual_seed(1)
    base = torch.rand(1, 3, 64, 64) * 0.5 + 0.25
    other = base[:, [2, 0, 1]].clone()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    gap = ((base - other) * luma).sum(1, keepdim=True)
    other = other + gap          # a grey shift restores each pixel's luminance, hue stays changed
    return base, other


def test_luminance_pyramid_cannot_see_hue_and_the_colour_pathway_can():
    encoder = _encoder(split_vision(object_maps=False))
    form = encoder.form_channels
    assert encoder.pyramid_channels == [c + 4 for c in form]
    base, other = _same_luminance_other_hue()
    a, b = encoder.pyramid(base), encoder.pyramid(other)
    for level_a, level_b, c in zip(a, b, form):
        assert level_a.shape[1] == c + 4
        torch.testing.assert_close(level_a[:, :c], level_b[:, :c], atol=1e-4, rtol=1e-4)  # form: same
        assert (level_a[:, c:] - level_b[:, c:]).abs().max() > 1e-3                       # colour: differs
    rgb = _encoder(split_vision(pyramid_input="rgb", colour_channels=0))
    assert (rgb.pyramid(base)[0] - rgb.pyramid(other)[0]).abs().max() > 1e-3


def test_colour_pathway_has_no_spatial_extent_beyond_its_cell():
    """A pixel change moves the colour features of its own 4x4 cell (and the coarser cells
    that pool it) only: the pathway cannot read form."""
    encoder = _encoder(split_vision(object_maps=False))
    image = torch.full((1, 3, 64, 64), 0.5)
    changed = image.clone()
    changed[:, :, 20, 20] = 1.0
    c = encoder.form_channels[0]
    diff = (encoder.pyramid(changed)[0][:, c:] - encoder.pyramid(image)[0][:, c:]).abs().sum((0, 1))
    assert diff.nonzero().tolist() == [[20 // 4, 20 // 4]]


def test_stage0_towers_with_a_colour_pathway_load_with_identical_outputs(tmp_path):
    from refvlm_training.engine.stage0 import DenseHeads, save_towers

    vision = split_vision()
    trained = _encoder(vision)
    with torch.no_grad():
        for p in trained.colour.parameters():
            p.add_(0.5)
    heads = DenseHeads(trained.layout, trained.vit_width, 8)
    folder = save_towers(trained, heads, tmp_path / "model")
    vision.vit_weights, vision.convnext_weights = str(folder / "vit.safetensors"), str(folder / "convnext.safetensors")
    loaded = _encoder(vision)
    image = torch.rand(2, 3, 64, 64)
    for x, y in zip(trained.pyramid(image), loaded.pyramid(image)):
        torch.testing.assert_close(x, y)


def test_stage0_heads_read_colour_and_form_from_their_own_channels():
    """With a colour pathway, changing only the colour channels moves only the colour outputs."""
    from refvlm_core.encoders import PyramidLayout
    from refvlm_core.features import ImageFeatures
    from refvlm_training.engine.stage0 import DenseHeads

    torch.manual_seed(0)
    layout = PyramidLayout(form=(8, 16, 32), colour=4)
    channels, colour = layout.channels, 4
    heads = DenseHeads(layout, 16, 8).eval()
    pyramid = [torch.randn(1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(channels)]
    recoloured = [level.clone() for level in pyramid]
    for level in recoloured:
        level[:, -colour:] += 1.0
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.7]]])
    tokens = torch.randn(1, 4, 16)
    a = heads(ImageFeatures(patch_tokens=tokens, pyramid=pyramid), boxes)
    b = heads(ImageFeatures(patch_tokens=tokens, pyramid=recoloured), boxes)
    for outputs_a, outputs_b in ((a[0], b[0]), (a[2], b[2])):   # pixel and object heads
        for name in outputs_a:
            moved = not torch.allclose(outputs_a[name], outputs_b[name])
            assert moved == (name == "color"), name


def test_stage0_learns_split_towers_with_object_maps(tmp_path):
    """Stage 0 with luminance towers, a colour pathway and object maps: the object-map and
    per-object losses are trained and fall, the towers' file holds every part, and
    brightness jitter changes what the towers see."""
    from refvlm_training.engine.config import config_from_dict
    from refvlm_training.engine.stage0 import pretrain_towers

    def run(out, steps, jitter):
        cfg = config_from_dict({
            "stage": 0, "out": str(out), "steps": steps, "batch_size": 4, "checkpoint_every": steps,
            "model": {"preset": "tiny", "overrides": {"vision": {"pyramid_input": "luminance", "colour_channels": 4,
                                                                 "object_maps": True}}},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "vision_pretrain": {"scenes": 8, "width": 96, "height": 64, "head_dim": 16, "brightness_jitter": jitter}})
        result = pretrain_towers(cfg, progress=False)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], result

    lines, result = run(tmp_path / "a", 30, 0.3)
    for name in ("loss_edges", "loss_centre", "loss_object_shape", "loss_object_color"):
        first, last = lines[0][name], sum(m[name] for m in lines[-5:]) / 5
        assert last < first, (name, first, last)
    from safetensors import safe_open

    with safe_open(str(result.model_dir / "convnext.safetensors"), "pt") as handle:
        prefixes = {key.split(".")[0] for key in handle.keys()}
    assert prefixes == {"convnext", "colour_pathway", "object_maps"}
    plain, _ = run(tmp_path / "b", 1, 0.0)
    jittered, _ = run(tmp_path / "c", 1, 0.3)
    assert plain[0]["loss"] != pytest.approx(jittered[0]["loss"], rel=1e-6)


def test_overrides_on_init_from_rebuild_only_the_changed_parts():
    """A decoder phase over a trained model with new towers and decoders: the LLM, the
    projector and the unchanged tower keep their weights; changed parts are new."""
    from refvlm_core.decoders.objects import ObjectBoxDecoder
    from refvlm_core.model import RefVLM
    from refvlm_training.engine.stages import with_overrides, rebuild_parts

    torch.manual_seed(0)
    model = RefVLM.from_config(preset("tiny"))
    overrides = {"vision": {"pyramid_input": "luminance", "colour_channels": 4, "object_maps": True},
                 "decoders": {**preset("tiny").decoders,
                              "box": {"kind": "objects", "hidden_dim": 16, "num_heads": 2, "num_layers": 1}}}
    torch.manual_seed(5)
    rebuilt = rebuild_parts(model, with_overrides(model.config, overrides))
    assert rebuilt.llm is model.llm
    for part in ("projector", "encoder.vit"):
        old, new = model.get_submodule(part).state_dict(), rebuilt.get_submodule(part).state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), part
    assert isinstance(rebuilt.decoders["box"], ObjectBoxDecoder)
    assert rebuilt.encoder.pyramid_channels != model.encoder.pyramid_channels
    old_depth, new_depth = model.decoders["depth"].state_dict(), rebuilt.decoders["depth"].state_dict()
    assert any(old_depth[k].shape != new_depth[k].shape or not torch.equal(old_depth[k], new_depth[k])
               for k in old_depth)
    # only the box decoder changes: the towers and the other decoders are kept as they are
    detr = {**preset("tiny").decoders, "box": {"kind": "detr", "hidden_dim": 16, "num_heads": 2, "num_layers": 1}}
    same_towers = rebuild_parts(model, with_overrides(model.config, {"decoders": detr}))
    assert same_towers.encoder is model.encoder
    for unit in ("mask", "keypoint", "depth"):
        old, new = model.decoders[unit].state_dict(), same_towers.decoders[unit].state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), unit


def test_load_parts_puts_stage0_object_heads_into_the_choosers(tmp_path):
    """model.load_parts: tensors of a file (under a prefix) into a sub-module, here stage 0's
    object heads into an objects decoder's attribute heads; a wrong module, a missing file or
    tensors that do not fit are refused naming what to fix."""
    from safetensors.torch import save_file

    from refvlm_core.errors import ConfigError
    from refvlm_training.engine.config import config_from_dict
    from refvlm_training.engine.stages import build_model

    box = {"kind": "objects", "hidden_dim": 16, "num_heads": 2, "num_layers": 1,
           "attributes": {"color": 3, "shape": 2}, "colour_channels": 4}
    vision = {"pyramid_input": "luminance", "colour_channels": 4, "object_maps": True}

    def build(load_parts: dict[str, str]):
        model = {"preset": "tiny", "load_parts": load_parts,
                 "overrides": {"vision": vision, "decoders": {**preset("tiny").decoders, "box": box}}}
        return build_model(config_from_dict({"stage": 2, "out": str(tmp_path / "run"), "data": {"train": "unread"},
                                             "model": model}))

    heads = build({}).decoders["box"].trunk.attribute_heads
    tensors = {f"object_heads.{k}": torch.randn_like(v) for k, v in heads.state_dict().items()}
    save_file({**tensors, "pixel_head.weight": torch.zeros(1)}, tmp_path / "dense_heads.safetensors")
    source = f"{tmp_path / 'dense_heads.safetensors'}:object_heads."
    loaded = build({"decoders.box.trunk.attribute_heads": source}).decoders["box"].trunk.attribute_heads
    assert all(torch.equal(v, tensors[f"object_heads.{k}"]) for k, v in loaded.state_dict().items())
    with pytest.raises(ConfigError, match="no module 'decoders.mask.trunk.attribute_heads'"):
        build({"decoders.mask.trunk.attribute_heads": source})
    with pytest.raises(ConfigError, match="does not exist"):
        build({"decoders.box.trunk.attribute_heads": str(tmp_path / "none.safetensors")})
    with pytest.raises(ConfigError, match="does not fit it"):
        build({"decoders.box.trunk.attribute_heads": str(tmp_path / "dense_heads.safetensors")})


def test_roi_grid_reads_the_inside_of_the_box_cell_by_cell():
    from refvlm_core.roi import roi_channels, roi_grid, roi_mean

    level = torch.zeros(1, 1, 12, 12)
    level[..., :, 6:] = 1.0                                    # right half of the image is 1
    box = torch.tensor([[[0.25, 0.25, 0.75, 0.75]]])           # centred box: left half 0, right half 1
    mean = roi_mean([level], box)
    assert mean.shape == (1, 1, 1) and abs(float(mean) - 0.5) < 0.05
    grid = roi_grid([level], box, grid=2).view(2, 2)
    assert torch.allclose(grid[:, 0], torch.zeros(2), atol=0.05)
    assert torch.allclose(grid[:, 1], torch.ones(2), atol=0.05)
    levels = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    assert roi_grid(levels, torch.rand(2, 6, 4).sort(-1).values).shape == (2, 6, roi_channels([3, 5]))


def test_standardised_ref_states_learn_data_statistics_and_freeze_in_eval():
    from refvlm_core.decoders.layers import RefStandardizer

    torch.manual_seed(0)
    shared = torch.zeros(16)
    shared[:2] = 50.0                                           # two huge shared dimensions, as an LLM's
    states = shared + torch.randn(64, 16) * 0.1
    norm = RefStandardizer(16).train()
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[:, 6:] = False                                        # padded slots must not count
    batch = torch.where(valid[..., None], states.view(8, 8, 16), torch.zeros(()))
    for _ in range(200):
        norm(batch, valid)
    kept = states.view(8, 8, 16)[valid]
    torch.testing.assert_close(norm.mean, kept.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.var, kept.var(0, unbiased=False), atol=1e-4, rtol=1e-3)
    norm.eval()
    before = norm.mean.clone()
    out = norm(states[None] * 3, torch.ones(1, 64, dtype=torch.bool))[0]
    assert torch.equal(norm.mean, before)                       # frozen in eval
    from refvlm_training.evaluation.probes import mean_pairwise_cosine

    assert mean_pairwise_cosine(states) > 0.99
    assert mean_pairwise_cosine(norm(states[None], torch.ones(1, 64, dtype=torch.bool))[0]) < 0.2
    assert out.shape == states.shape


def test_ref_norm_picks_the_decoders_input_normalisation():
    from refvlm_core.decoders.base import build_decoder
    from refvlm_core.decoders.layers import RefStandardizer

    torch.manual_seed(0)
    layer = build_decoder("box", 24, [8, 16, 32], hidden_dim=16, num_heads=2, num_layers=1)
    torch.manual_seed(0)
    standard = build_decoder("box", 24, [8, 16, 32], hidden_dim=16, num_heads=2, num_layers=1, ref_norm="standard")
    assert isinstance(layer.trunk.queries.norm, torch.nn.LayerNorm)
    assert isinstance(standard.trunk.queries.norm, RefStandardizer)
    assert "trunk.queries.norm.mean" in standard.state_dict()   # saved with the model
    refs, valid = torch.randn(1, 3, 24) * 5 + 2, torch.ones(1, 3, dtype=torch.bool)
    pyramid = [torch.randn(1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate([8, 16, 32])]
    a, b = layer.eval()(refs, valid, pyramid)["boxes"], standard.eval()(refs, valid, pyramid)["boxes"]
    assert not torch.allclose(a, b)
    with pytest.raises(Exception, match="ref_norm"):
        build_decoder("box", 24, [8, 16, 32], hidden_dim=16, num_heads=2, num_layers=1, ref_norm="batch")


def test_linear_probe_reads_a_linear_attribute_and_not_noise():
    from refvlm_training.evaluation.probes import fit_linear_probe, probe_accuracy

    torch.manual_seed(0)
    y = torch.randint(0, 3, (300,))
    x = torch.randn(300, 10) * 0.3
    x[:, 0] += y.float() * 2                                    # class readable from one dimension
    probe = fit_linear_probe(x[:200], y[:200], 3)
    assert probe_accuracy(probe, x[200:], y[200:]) > 0.95
    noise = fit_linear_probe(torch.randn(200, 10), y[:200], 3)
    assert probe_accuracy(noise, torch.randn(100, 10), y[200:]) < 0.6


def test_between_phrase_share_and_cosine():
    from refvlm_training.evaluation.probes import between_group_share, mean_pairwise_cosine

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    states = torch.stack([a, a, b, b])
    assert between_group_share(states, ["x", "x", "y", "y"]) == pytest.approx(1.0)
    assert between_group_share(states, ["x", "y", "x", "y"]) == pytest.approx(0.0)
    assert mean_pairwise_cosine(states) == pytest.approx(1 / 3)


def test_probe_commands_write_their_reports_on_the_tiny_preset(tmp_path):
    """`refvlm probe towers` and `refvlm probe refs` end to end, as a user runs them."""
    towers = tmp_path / "towers.json"
    run = subprocess.run([sys.executable, "-m", "refvlm_cli.main", "probe", "towers", "--model", "tiny",
                          "--train-scenes", "6", "--new-train-scenes", "2", "--test-scenes", "3",
                          "--size", "96x64", "--out", str(towers)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(towers.read_text())
    for kind in ("mean", "grid"):
        assert set(report[kind]) == {"color", "shape", "material", "size"}
        assert all(0 <= v <= 1 for row in report[kind].values() for v in row.values() if v is not None)
    assert report["objects"]["train"] > 10 and report["test_held_out_objects"] >= 1

    refs = tmp_path / "refs.json"
    run = subprocess.run([sys.executable, "-m", "refvlm_cli.main", "probe", "refs", "--model", "tiny",
                          "--data", "simworld:test:3", "--fit-data", "simworld:train:3", "--limit", "4",
                          "--out", str(refs)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(refs.read_text())
    assert report["refs"] >= 1 and -1 <= report["raw"]["mean_pairwise_cosine"] <= 1
    assert report["ref_norm"] == "layer" and report["standardised"]["fit_refs"] >= 1
    assert report["standardised"]["mean_pairwise_cosine"] < report["raw"]["mean_pairwise_cosine"]

    bad = subprocess.run([sys.executable, "-m", "refvlm_cli.main", "probe", "towers", "--towers", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "vit.safetensors" in bad.stderr


def test_swap_decoder_takes_one_unit_from_a_decoder_only_phase(tmp_path, monkeypatch):
    """tools/swap_decoder.py: the base keeps its other units, the unit's settings and weights
    come from the donor; a donor whose towers or LLM differ is refused."""
    from refvlm_core.checkpoint import load_model, save_model
    from refvlm_core.model import RefVLM

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    from swap_decoder import main

    torch.manual_seed(0)
    base = RefVLM.from_config(preset("tiny"))
    donor_config = preset("tiny")
    donor_config.decoders["box"] = {**donor_config.decoders["box"], "hidden_dim": 24}
    donor = RefVLM.from_config(donor_config)
    donor.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("decoders.box.")},
                          strict=False)
    save_model(base, tmp_path / "base")
    save_model(donor, tmp_path / "donor")

    assert main(["--base", str(tmp_path / "base"), "--donor", str(tmp_path / "donor"), "--unit", "box",
                 "--out", str(tmp_path / "out")]) == 0
    out = load_model(tmp_path / "out")
    assert out.config.decoders["box"]["hidden_dim"] == 24 != base.config.decoders["box"].get("hidden_dim")
    for unit, source in (("box", donor), ("mask", base), ("keypoint", base)):
        theirs = source.decoders[unit].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in out.decoders[unit].state_dict().items()), unit

    other = RefVLM.from_config(donor_config)  # other random projector and decoders
    save_model(other, tmp_path / "other")
    assert main(["--base", str(tmp_path / "base"), "--donor", str(tmp_path / "other"), "--unit", "box",
                 "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
