"""ONNX export of the tiny model: every part passes the full checker and carries its
metadata; ONNX Runtime CPU matches torch at shapes other than the export shapes
(L = 100, all refs padded, another batch and image size); the Predictor gives the same
boxes and masks with the torch and onnxruntime runtimes; bad files are clear errors."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from refvlm_core import trp
from refvlm_core.decoders import registered_units
from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_core.runtime import TorchRuntime
from refvlm_export import parity
from refvlm_export.runtime import OnnxRuntimeDecoders, OnnxRuntimeVision, select_runtime
from refvlm_export.manifest import Manifest, config_hash
from refvlm_export.onnx_export import ConvNextGraph, VitGraph
from tests.export_helpers import tiny_export
from tests.model_samples import forced_answer_hook

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def exported():
    torch.set_num_threads(1)
    return tiny_export()


@pytest.fixture(scope="module")
def ort_decoders(exported):
    model, folder = exported
    return OnnxRuntimeDecoders(folder, "cpu", model.config, threads=1)


def test_every_part_exported_checked_and_labelled(exported):
    model, folder = exported
    manifest = Manifest.load(folder)
    parts = {p.part for p in manifest.parts}
    assert parts == {f"decoder_{u}" for u in model.decoders} | {"vit", "convnext", "projector"}
    assert set(model.decoders) <= set(registered_units())
    for spec in manifest.parts:
        proto = onnx.load(str(folder / spec.file))
        onnx.checker.check_model(proto, full_check=True)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["config_hash"] == config_hash(model.config) and meta["part"] == spec.part
        assert meta["opset"] == str(manifest.opset) and meta["unit"] == (spec.unit or "")
        assert [t["name"] for t in json.loads(meta["inputs"])] == [i.name for i in proto.graph.input]
        assert [t["name"] for t in json.loads(meta["outputs"])] == [o.name for o in proto.graph.output]
    box = onnx.load(str(folder / "decoder_box.onnx")).graph.input
    assert [d.dim_param for d in box[0].type.tensor_type.shape.dim[:2]] == ["batch", "L"]
    assert box[2].type.tensor_type.shape.dim[2].dim_param  # feature size is dynamic


@pytest.mark.parametrize("batch,length,num_valid,size", [
    (1, 100, 100, 64),   # L = 100 (the paper's router length), all valid
    (1, 5, 0, 64),       # every query padded: finite outputs
    (3, 1, 1, 96),       # other batch, single query, larger feature maps
    (1, 13, 4, 32),      # partly padded, smaller maps
])
def test_decoders_onnxruntime_match_torch(exported, ort_decoders, batch, length, num_valid, size):
    model, _ = exported
    for unit in model.decoders:
        report = parity.decoder_parity(model, ort_decoders, unit, batch, length, num_valid, size)
        assert report.ok, str(report)


def test_encoders_and_projector_match_torch(exported):
    model, folder = exported
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 64, 64, generator=generator)  # batch 3 (exported with 2)
    for part, module, inputs in [("vit", VitGraph(model.encoder), (images,)),
                                 ("convnext", ConvNextGraph(model.encoder), (torch.rand(1, 3, 96, 96),)),
                                 ("projector", model.projector, (torch.randn(1, 5, model.encoder.vit_width),))]:
        report = parity.onnx_part_parity(folder, part, module.eval(), inputs)
        assert report.ok, str(report)


def test_predictor_same_result_with_the_onnxruntime_runtime(exported):
    from refvlm_core.predictor import Predictor

    model, folder = exported
    predictor = Predictor(model)
    answer = (f"{trp.format_phrase('cups', ('box',), 2)}, {trp.format_phrase('a bowl', ('mask', 'box'), 1)}, "
              f"{trp.format_phrase('a man', ('keypoint',), 1)}, {trp.format_phrase('floor', ('depth',), 1)}")
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    reference = predictor.predict(image, "Find things.", max_new_tokens=80,
                                  logits_hook=forced_answer_hook(model.llm.tokenizer, answer))
    predictor.set_runtime(OnnxRuntimeVision(folder, model, "cpu", threads=1))
    try:
        candidate = predictor.predict(image, "Find things.", max_new_tokens=80,
                                      logits_hook=forced_answer_hook(model.llm.tokenizer, answer))
    finally:
        predictor.set_runtime(None)
    assert reference.errors == [] and candidate.trp_text == reference.trp_text
    assert sum(o.box_xyxy is not None for o in candidate.objects) == 3
    assert sum(o.mask is not None for o in candidate.objects) == 1
    scores = parity.result_parity(reference, candidate)
    assert scores["max_box_error_px"] <= parity.BOX_PIXEL_TOL and scores["min_mask_iou"] >= parity.MASK_IOU_MIN
    for ref, got in zip(reference.objects, candidate.objects):
        if ref.keypoints is not None:
            assert np.allclose(ref.keypoints, got.keypoints, atol=0.5)
        if ref.depth is not None:
            assert np.allclose(ref.depth, got.depth, rtol=1e-3, atol=1e-4)


def test_missing_corrupt_and_mismatched_files(exported, tmp_path):
    model, folder = exported
    with pytest.raises(CheckpointError, match="refvlm export onnx"):
        OnnxRuntimeDecoders(tmp_path, "cpu")
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "decoder_mask.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(CheckpointError, match="decoder_mask.onnx.*refvlm export onnx"):
        OnnxRuntimeDecoders(tmp_path, "cpu")
    (tmp_path / "decoder_mask.onnx").unlink()
    with pytest.raises(CheckpointError, match="decoder_mask.onnx is missing"):
        OnnxRuntimeDecoders(tmp_path, "cpu")
    other = model.config.from_dict(model.config.to_dict())
    other.router_length = 9
    with pytest.raises(CheckpointError, match="another model config"):
        OnnxRuntimeDecoders(folder, "cpu", other)


def test_runtime_choice(exported):
    model, folder = exported
    assert isinstance(select_runtime("torch", model, None)[0], TorchRuntime)
    auto, _ = select_runtime("auto", model, folder)
    assert auto.name == ("onnxruntime" if not torch.cuda.is_available() else auto.name)
    assert isinstance(select_runtime("auto", model, None)[0], TorchRuntime)  # nothing exported: torch
    with pytest.raises(ConfigError, match="use one of"):
        select_runtime("tflite", model, None)
    with pytest.raises(ConfigError, match="needs an export"):
        select_runtime("onnxruntime", model, None)


def test_cpu_build_refuses_silent_fallback(exported):
    import onnxruntime as ort

    _, folder = exported
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA provider exists")
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        OnnxRuntimeDecoders(folder, "cuda")
