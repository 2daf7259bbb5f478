"""Visual-unit decoders: shapes, finite outputs under full padding, gradients, zero-but-connected
losses, overfitting one target, postprocess format and the registry."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import point_unit as point_unit_module
from point_unit import PointDecoder
from refvlm_core.decoders import (UnitDecoder, build_decoder, register_decoder, registered_units,
                                  unregister_decoder)
from refvlm_core.errors import ConfigError
from refvlm_core.router import RoutedRefs, route
from refvlm_core.targets import UnitTargets

LLM_DIM = 32
CHANNELS = (8, 16, 32)
SMALL = {"box": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2},
         "mask": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2},
         "keypoint": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2},
         "depth": {"hidden_dim": 16}}
BUILTIN = tuple(SMALL)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_decoder(unit: str, seed: int = 0) -> UnitDecoder:
    torch.manual_seed(seed)
    return build_decoder(unit, LLM_DIM, CHANNELS, **SMALL[unit])


def make_pyramid(batch: int = 2, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size >> i, size >> i, generator=generator) for i, c in enumerate(CHANNELS)]


def routed_refs(counts: tuple[int, ...], router_length: int, unit: str, groups_per_image: int = 1) -> RoutedRefs:
    embeddings = [torch.randn(n, LLM_DIM) for n in counts]
    ref_units = [[(unit,)] * n for n in counts]
    ref_groups = [[i % groups_per_image for i in range(n)] for n in counts]
    return route(embeddings, ref_units, ref_groups, units=(unit,), router_length=router_length)[unit]


def random_targets(unit: str, routed: RoutedRefs, size: int = 32) -> list[UnitTargets]:
    """One target per valid ref, in the refs' groups."""
    targets = []
    for b in range(routed.valid.shape[0]):
        groups = routed.group_ids[b][routed.valid[b]]
        m = groups.numel()
        kp = torch.cat([torch.rand(m, 17, 2), torch.randint(0, 3, (m, 17, 1)).float()], dim=-1)
        value = {"box": torch.rand(m, 4) * 0.4 + 0.2, "mask": (torch.rand(m, size, size) > 0.5).float(),
                 "keypoint": kp, "depth": torch.rand(size, size) * 4 + 0.5}[unit]
        targets.append(UnitTargets(group_ids=groups.clone(), value=value))
    return targets


def no_targets(batch: int) -> list[UnitTargets]:
    return [UnitTargets(group_ids=torch.zeros(0, dtype=torch.long)) for _ in range(batch)]


EXPECTED_SHAPES = {"box": {"boxes": (4,), "scores": ()}, "mask": {"mask_logits": (16, 16)},
                   "keypoint": {"keypoints": (17, 2), "visibility_logits": (17,)}, "depth": {"depth": (16, 16)}}


@pytest.mark.parametrize("unit", BUILTIN)
@pytest.mark.parametrize("valid", [0, 1, 7, 100])
def test_shapes_and_finite_outputs(unit, valid):
    """Eval mode gives exactly the export contract's outputs; training mode adds per-layer ones."""
    decoder = make_decoder(unit).eval()
    routed = routed_refs((valid, min(valid, 3)), router_length=100, unit=unit)
    with torch.no_grad():
        outputs = decoder(routed.embeddings, routed.valid, make_pyramid())
        training_outputs = decoder.train()(routed.embeddings, routed.valid, make_pyramid())
    assert set(outputs) == set(EXPECTED_SHAPES[unit])
    assert set(training_outputs) >= set(outputs)
    for name in set(training_outputs) - set(outputs):
        assert name.startswith("layer_") and torch.isfinite(training_outputs[name]).all()
    for name, tail in EXPECTED_SHAPES[unit].items():
        assert outputs[name].shape == (2, 100, *tail)
        assert torch.isfinite(outputs[name]).all(), f"{unit}.{name} not finite with {valid} valid refs"


@pytest.mark.parametrize("unit", ("box", "mask", "keypoint"))
def test_padding_does_not_leak_into_valid_refs(unit):
    decoder = make_decoder(unit).eval()
    routed = routed_refs((3, 1), router_length=8, unit=unit)
    noisy = routed.embeddings.clone()
    noisy[~routed.valid] = torch.randn(int((~routed.valid).sum()), LLM_DIM) * 10
    with torch.no_grad():
        clean_out = decoder(routed.embeddings, routed.valid, make_pyramid())
        noisy_out = decoder(noisy, routed.valid, make_pyramid())
    for name in clean_out:
        assert torch.allclose(clean_out[name][routed.valid], noisy_out[name][routed.valid], atol=1e-5)


@pytest.mark.parametrize("unit", BUILTIN)
def test_gradients_reach_every_parameter_and_the_embeddings(unit):
    decoder = make_decoder(unit)
    routed = routed_refs((3, 2), router_length=8, unit=unit, groups_per_image=2)
    routed.embeddings.requires_grad_(True)
    outputs = decoder(routed.embeddings, routed.valid, make_pyramid())
    losses = decoder.loss(outputs, routed, random_targets(unit, routed))
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert routed.embeddings.grad[routed.valid].abs().sum() > 0


@pytest.mark.parametrize("unit", BUILTIN)
@pytest.mark.parametrize("valid", [0, 2])
def test_no_targets_gives_zero_connected_loss(unit, valid):
    decoder = make_decoder(unit)
    routed = routed_refs((valid, 0), router_length=4, unit=unit)
    outputs = decoder(routed.embeddings, routed.valid, make_pyramid())
    losses = decoder.loss(outputs, routed, no_targets(2))
    assert losses and all(v == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in decoder.parameters())  # DDP sees every parameter


# unit -> (steps, factor the summed loss must drop by)
OVERFIT = {"box": (100, 10.0), "mask": (100, 50.0), "keypoint": (100, 20.0), "depth": (100, 50.0)}  # seen: 29x, >1e6x, 111x, 1500x


@pytest.mark.parametrize("unit", BUILTIN)
def test_overfits_a_single_target(unit):
    decoder = make_decoder(unit)
    torch.manual_seed(1)
    routed = routed_refs((1,), router_length=4, unit=unit)
    pyramid = make_pyramid(batch=1)
    target = random_targets(unit, routed, size=16)
    if unit == "mask":  # a blob, not noise: learnable from a 16 x 16 feature map
        yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
        target[0].value = (((yy - 6) ** 2 + (xx - 9) ** 2) < 20).float()[None]
    steps, factor = OVERFIT[unit]
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    first = last = None
    floors = []  # the keypoint heatmap cross-entropy cannot go below its Gaussian target's entropy
    for _ in range(steps):
        losses = decoder.loss(decoder(routed.embeddings, routed.valid, pyramid), routed, target)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        loss = sum(v for k, v in losses.items() if k != "loss_keypoint_heatmap")
        floors.append(float(losses.get("loss_keypoint_heatmap", torch.zeros(()))))
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert floors[-1] <= floors[0]
    print(f"{unit}: loss {first:.4f} -> {last:.4f} in {steps} steps ({first / last:.1f}x)")
    assert last * factor < first, f"{unit}: loss {first:.4f} -> {last:.4f}, expected a drop by {factor}x"


@pytest.mark.parametrize("unit", BUILTIN)
def test_postprocess_gives_numpy_per_valid_ref(unit):
    decoder = make_decoder(unit)
    routed = route([torch.randn(3, LLM_DIM), torch.randn(0, LLM_DIM)], [[(unit,), ("other",), (unit,)], []],
                   [[0, 1, 2], []], units=(unit, "other"), router_length=4)[unit]
    with torch.no_grad():
        results = decoder.postprocess(decoder(routed.embeddings, routed.valid, make_pyramid()), routed)
    assert [len(r) for r in results] == [2, 0]
    assert [r["ordinal"] for r in results[0]] == [0, 2] and [r["group"] for r in results[0]] == [0, 2]
    item = results[0][0]
    if unit == "box":
        assert item["box_cxcywh"].shape == (4,) and 0 <= item["score"] <= 1
    elif unit == "mask":
        assert isinstance(item["mask_logits"], np.ndarray) and item["mask_logits"].shape == (16, 16)
    elif unit == "keypoint":
        assert item["keypoints"].shape == (17, 3) and ((item["keypoints"] >= 0) & (item["keypoints"] <= 1)).all()
    else:
        assert item["depth"].shape == (16, 16) and (item["depth"] > 0).all()


# ---- registry --------------------------------------------------------------------

@pytest.fixture
def point_unit():
    yield point_unit_module.register()
    point_unit_module.unregister()


def test_a_registered_unit_routes_and_builds_without_other_changes(point_unit):
    assert point_unit in registered_units() and set(BUILTIN) <= set(registered_units())
    units = registered_units()
    routed = route([torch.randn(2, LLM_DIM)], [[("point",), ("box", "point")]], [[0, 1]], units=units, router_length=4)
    decoders = {u: build_decoder(u, LLM_DIM, CHANNELS, **SMALL.get(u, {})) for u in units}
    pyramid = make_pyramid(batch=1)
    outputs = {u: decoders[u](routed[u].embeddings, routed[u].valid, pyramid) for u in units}
    assert outputs["point"]["points"].shape == (1, 4, 2) and routed["point"].num_refs == 2
    target = [UnitTargets(group_ids=torch.tensor([0, 1]), value=torch.rand(2, 2))]
    assert decoders["point"].loss(outputs["point"], routed["point"], target)["loss_point"] > 0
    assert len(decoders["point"].postprocess(outputs["point"], routed["point"])[0]) == 2


def test_a_plugin_units_loss_weight_comes_with_its_decoder(point_unit):
    """Set in the model config like any decoder setting; config.py is not edited for it."""
    from refvlm_core.config import preset
    from refvlm_core.model import RefVLM

    config = preset("tiny")
    config.decoders["point"] = {"l1_weight": 3.0}
    model = RefVLM.from_config(config.validate())
    assert model.decoders["point"].l1_weight == 3.0
    routed = route([torch.randn(1, LLM_DIM)], [[("point",)]], [[0]], units=[point_unit], router_length=2)
    plain = build_decoder("point", LLM_DIM, CHANNELS)
    heavy = build_decoder("point", LLM_DIM, CHANNELS, l1_weight=3.0)
    heavy.load_state_dict(plain.state_dict())
    target = [UnitTargets(group_ids=torch.tensor([0]), value=torch.rand(1, 2))]
    losses = [d.loss(d(routed["point"].embeddings, routed["point"].valid, make_pyramid(batch=1)), routed["point"],
                     target)["loss_point"] for d in (plain, heavy)]
    assert float(losses[1]) == pytest.approx(3 * float(losses[0]), rel=1e-5) and float(losses[0]) > 0


def test_registry_errors_and_replacement(point_unit):
    class OtherPoint(PointDecoder):
        pass

    with pytest.raises(ConfigError, match="replace=True"):
        register_decoder("point")(OtherPoint)
    register_decoder("point", replace=True)(OtherPoint)
    assert type(build_decoder("point", LLM_DIM, CHANNELS)) is OtherPoint
    with pytest.raises(ConfigError, match="registered units"):
        build_decoder("polygon", LLM_DIM, CHANNELS)
    with pytest.raises(ConfigError, match="decoders\\['box'\\]"):
        build_decoder("box", LLM_DIM, CHANNELS, hidden_size=3)
    with pytest.raises(ConfigError, match="unknown loss weight"):
        build_decoder("box", LLM_DIM, CHANNELS, loss_weights={"box_l2": 1.0}, **SMALL["box"])


def test_kind_picks_the_implementation_of_a_unit():
    from refvlm_core.decoders.box import BoxDecoder, DetrBoxDecoder

    assert type(build_decoder("box", LLM_DIM, CHANNELS, **SMALL["box"])) is BoxDecoder
    assert type(build_decoder("box", LLM_DIM, CHANNELS, kind="detr", **SMALL["box"])) is DetrBoxDecoder
    with pytest.raises(ConfigError, match="no decoder of kind 'sam2'.*'default', 'detr', 'grounding_dino'"):
        build_decoder("box", LLM_DIM, CHANNELS, kind="sam2")


# ---- ONNX (dynamo exporter, dynamic B and L) ---------------------------------------

class _Positional(torch.nn.Module):
    """Flat tensor arguments around a decoder, the way an exporter sees it."""

    def __init__(self, decoder: UnitDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, embeddings, valid, p0, p1, p2):
        return tuple(self.decoder(embeddings, valid, [p0, p1, p2]).values())


@pytest.mark.parametrize("unit", BUILTIN)
def test_exports_to_onnx_with_dynamic_batch_and_length(unit, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _Positional(make_decoder(unit).eval())
    batch, length = torch.export.Dim("B"), torch.export.Dim("L")
    example = (torch.randn(2, 8, LLM_DIM), torch.arange(8)[None].expand(2, 8) < torch.tensor([[3], [0]]),
               *make_pyramid(batch=2))
    path = tmp_path / f"{unit}.onnx"
    torch.onnx.export(model, example, str(path), dynamo=True, verbose=False,
                      dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}, {0: batch}, {0: batch}, {0: batch}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # other B and L than exported with; image 1 fully padded
    inputs = (torch.randn(3, 5, LLM_DIM), torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, False]]),
              *make_pyramid(batch=3, seed=1))
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        expected = model(*inputs)
    for onnx_out, torch_out in zip(got, expected):
        assert onnx_out.shape == tuple(torch_out.shape) and np.isfinite(onnx_out).all()
        assert np.abs(onnx_out - torch_out.numpy()).max() < 1e-4
