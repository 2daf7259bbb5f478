"""The exported vision runtime: `refvlm export onnx` records the config and the weights it
came from; ONNX Runtime sessions run the ViT, the ConvNeXt pyramid, the projector and the
decoders for the Predictor with torch's answers; a stale, partial or missing export is
refused with the command that rebuilds it; ``auto`` says what it picked and why."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from refvlm_core import trp
from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_core.predictor import Predictor
from refvlm_core.runtime import TorchRuntime
from refvlm_export import parity
from refvlm_export.manifest import Manifest, check_export, config_hash, weights_sha256
from refvlm_export.onnx_export import load_export_model
from refvlm_export.runtime import OnnxRuntimeVision, select_runtime
from tests.export_helpers import has_cuda, tiny_export
from tests.model_samples import forced_answer_hook

pytestmark = pytest.mark.timeout(300)

ANSWER = (f"{trp.format_phrase('cups', ('box',), 2)}, {trp.format_phrase('a bowl', ('mask', 'box'), 1)}, "
          f"{trp.format_phrase('floor', ('depth',), 1)}")


@pytest.fixture(scope="module")
def exported():
    """(tiny model seeded 0, the folder `refvlm export onnx --model tiny` wrote for it; once
    per test session)."""
    return tiny_export()


def copy_export(folder, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(folder, target)
    return target


def predict_both(model, runtime, prompt="Find things.", visual_prompts=()):
    """(torch Result, runtime Result) of one image and one forced answer."""
    predictor = Predictor(model)
    image = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    hook = lambda: forced_answer_hook(model.llm.tokenizer, ANSWER)  # noqa: E731 (one per call)
    reference = predictor.predict(image, prompt, visual_prompts, max_new_tokens=80, logits_hook=hook())
    predictor.set_runtime(runtime, "test")
    candidate = predictor.predict(image, prompt, visual_prompts, max_new_tokens=80, logits_hook=hook())
    return reference, candidate


def test_manifest_records_the_config_and_the_weights(exported):
    model, folder = exported
    manifest = Manifest.load(folder)
    assert manifest.format_version == 2 and manifest.model_name == model.config.name
    assert manifest.config_hash == config_hash(model.config)
    assert manifest.model_sha256 == weights_sha256(model)
    assert json.loads((folder / "config.json").read_text())["name"] == model.config.name
    other = load_export_model("tiny", seed=1)
    assert weights_sha256(other) != manifest.model_sha256  # other weights, same config


def test_onnxruntime_runtime_reports_its_provider_and_matches_torch(exported):
    model, folder = exported
    runtime = OnnxRuntimeVision(folder, model, "cpu", threads=1)
    assert runtime.describe()["onnx_provider"] == "CPUExecutionProvider"
    assert {s.get_providers()[0] for s in runtime.sessions.values()} == {"CPUExecutionProvider"}
    from refvlm_core.visual_prompts import VisualPrompt
    region = [VisualPrompt.box(10, 10, 50, 40)]  # region tokens go through the exported projector
    reference, candidate = predict_both(model, runtime, "What is in the region?", region)
    assert reference.errors == candidate.errors == [] and candidate.trp_text == reference.trp_text
    assert candidate.diagnostics["runtime"] == "onnxruntime"
    scores = parity.result_parity(reference, candidate)
    assert scores["max_box_error_px"] <= 1.0 and scores["min_mask_iou"] >= parity.MASK_IOU_MIN
    [ref_depth] = [o.depth for o in reference.objects if o.depth is not None]
    [got_depth] = [o.depth for o in candidate.objects if o.depth is not None]
    assert np.abs(got_depth - ref_depth).max() <= 1e-3 * np.abs(ref_depth).max()


def test_the_runtime_really_runs_the_exported_graphs(exported, tmp_path):
    """A ViT graph from other weights changes the answer's boxes: the export is what runs."""
    model, folder = exported
    target = copy_export(folder, tmp_path)
    other = tiny_export_of_other_weights(tmp_path)
    shutil.copy(other / "vit.onnx", target / "vit.onnx")
    shutil.copy(other / "convnext.onnx", target / "convnext.onnx")
    runtime = OnnxRuntimeVision(target, model, "cpu", threads=1)  # the manifest still matches
    reference, candidate = predict_both(model, runtime)
    assert parity.result_parity(reference, candidate)["max_box_error_px"] > 1e-3


def tiny_export_of_other_weights(tmp_path):
    from refvlm_export.onnx_export import export_model

    folder = tmp_path / "other"
    export_model(load_export_model("tiny", seed=1), folder, units=["box"])
    return folder


def test_stale_partial_and_missing_exports_name_the_rebuild_command(exported, tmp_path):
    model, folder = exported
    with pytest.raises(CheckpointError, match="refvlm export onnx --model tiny"):
        check_export(tmp_path / "none", model, "tiny")
    target = copy_export(folder, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "model_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match=r"stale.*refvlm export onnx --model tiny --out"):
        check_export(target, model, "tiny")
    (target / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "x"}))
    with pytest.raises(CheckpointError, match="another model config"):
        check_export(target, model, "tiny")
    parts = [p for p in manifest["parts"] if p["part"] != "convnext"]
    (target / "manifest.json").write_text(json.dumps({**manifest, "parts": parts}))
    with pytest.raises(CheckpointError, match=r"lacks \['convnext'\]"):
        check_export(target, model, "tiny")


def test_select_runtime_explicit_and_auto(exported, tmp_path):
    model, folder = exported
    runtime, reason = select_runtime("onnxruntime", model, folder)
    assert runtime.name == "onnxruntime" and "onnxruntime" in reason
    with pytest.raises(ConfigError, match="needs an export.*refvlm export onnx --model tiny"):
        select_runtime("onnxruntime", model, None, model_arg="tiny")
    with pytest.raises(ConfigError, match="runtime='tflite'"):
        select_runtime("tflite", model, folder)
    runtime, reason = select_runtime("auto", model, folder)
    if not has_cuda():
        assert runtime.describe()["onnx_provider"] == "CPUExecutionProvider"
        assert reason.startswith("auto: onnxruntime cpu") and "no CUDA GPU" in reason
        assert "tensorrt: runtime tensorrt needs a CUDA GPU" in reason  # why TensorRT was passed over
        with pytest.raises(ConfigError, match="runtime tensorrt needs a CUDA GPU: pick onnxruntime or torch"):
            select_runtime("tensorrt", model, folder)
    runtime, reason = select_runtime("auto", model, tmp_path / "missing", model_arg="tiny")
    assert isinstance(runtime, TorchRuntime) and "refvlm export onnx --model tiny" in reason


def test_export_cli_writes_a_folder_the_runtime_accepts(exported):
    model, folder = exported  # written by the CLI, model built again from the same preset and seed
    assert check_export(folder, model, "tiny").model_sha256 == weights_sha256(model)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs an NVIDIA GPU")
def test_onnxruntime_cuda_runtime_matches_torch(exported):
    model, folder = exported
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install the ort-gpu extra)")
    runtime = OnnxRuntimeVision(folder, model, "cuda")
    assert runtime.describe()["onnx_provider"] == "CUDAExecutionProvider"
    reference, candidate = predict_both(model, runtime)
    scores = parity.result_parity(reference, candidate)
    assert scores["max_box_error_px"] <= 1.0 and scores["min_mask_iou"] >= parity.MASK_IOU_MIN


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs an NVIDIA GPU")
def test_tensorrt_runtime_builds_the_node_engines_on_configure_and_matches_torch(exported, tmp_path):
    from refvlm_export.runtime import TensorRTVision
    from refvlm_export.tensorrt_build import import_tensorrt

    try:
        trt = import_tensorrt("tensorrt")
    except ConfigError as error:
        pytest.skip(f"no TensorRT on this machine ({error})")
    model, folder = exported
    model = copy.deepcopy(model).cuda()  # the shared model stays on the CPU
    target = copy_export(folder, tmp_path)
    with pytest.raises(CheckpointError, match="there is no engine; build it with `refvlm export tensorrt"):
        TensorRTVision(target, model, "tiny", build_engines=False, trt=trt)
    runtime = TensorRTVision(target, model, "tiny", build_engines=True, trt=trt)  # built into the cache
    assert sorted(p.name for p in (target / "engines").glob("*.engine")) == sorted(
        f"decoder_{u}.engine" for u in model.decoders)
    TensorRTVision(target, model, "tiny", build_engines=False, trt=trt)  # the cache now matches
    reference, candidate = predict_both(model, runtime)
    assert candidate.trp_text == reference.trp_text and candidate.diagnostics["runtime"] == "tensorrt"
    scores = parity.result_parity(reference, candidate)
    assert scores["max_box_error_px"] <= 1.0 and scores["min_mask_iou"] >= parity.MASK_IOU_MIN
