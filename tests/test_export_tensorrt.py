"""TensorRT engines: every exported graph of the tiny model parses and builds with its
optimisation profile (TensorRT-RTX builds on CPU; the full TensorRT needs a GPU), the
engine cache is keyed and refuses engines of another machine, inconsistent profiles
fail, and the `refvlm export` commands work. The node's engines (its profile: batch 1, the
model's L and image side) are checked against what is needed, rebuilt when missing or stale,
or refused naming the command that builds them. GPU tests run engines and fp16 parity."""
from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest
import torch

from refvlm_cli.main import main
from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_export import parity
from refvlm_export.manifest import Manifest
from refvlm_export.runtime import ensure_node_engines
from refvlm_export.tensorrt_build import (DimRange, EngineBuildError, ProfileConfig, build_engine, build_engines,
                                          check_engine, device_identity, engine_paths, ensure_engines,
                                          import_tensorrt)
from tests.export_helpers import has_cuda, tiny_export

pytestmark = pytest.mark.timeout(300)


def _trt():
    try:
        trt = import_tensorrt()
    except ConfigError as error:
        pytest.skip(f"no TensorRT or TensorRT-RTX module here ({error})")
    if trt.__name__ == "tensorrt" and not has_cuda():
        pytest.skip("full TensorRT builds need a CUDA GPU")
    return trt


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    torch.set_num_threads(1)
    trt = _trt()
    model, folder = tiny_export()
    out = tmp_path_factory.mktemp("engines")
    profiles = ProfileConfig.for_manifest(Manifest.load(folder)).override("batch=1/1/2,L=1/8/100")
    built = build_engines(folder, out, profiles, target="SM89", trt=trt)
    return trt, model, folder, out, profiles, built


def test_every_graph_builds_with_its_profile(engines):
    trt, model, folder, out, profiles, built = engines
    assert set(built) == {p.part for p in Manifest.load(folder).parts}
    for part, path in built.items():
        key = json.loads(engine_paths(out, part)[1].read_text())
        assert path.stat().st_size > 1000 and key["part"] == part
        assert key["tensorrt"].endswith(trt.__version__) and len(key["onnx_sha256"]) == 64
    assert json.loads(engine_paths(out, "decoder_box")[1].read_text())["profile"]["ref_embeddings"][2] == [2, 100, 64]


def test_cache_reuses_and_rebuilds(engines):
    trt, model, folder, out, profiles, built = engines
    before = {p: path.stat().st_mtime_ns for p, path in built.items()}
    build_engines(folder, out, profiles, target="SM89", trt=trt, parts=["decoder_box", "projector"])
    assert all(built[p].stat().st_mtime_ns == before[p] for p in ("decoder_box", "projector"))
    wider = ProfileConfig.for_manifest(Manifest.load(folder)).override("batch=1/1/4")  # another key
    build_engines(folder, out, wider, target="SM89", trt=trt, parts=["projector"])
    assert built["projector"].stat().st_mtime_ns != before["projector"]


def test_engine_for_another_machine_is_refused(engines, tmp_path):
    trt, _, _, out, _, _ = engines
    identity = device_identity(trt, "SM89")
    assert check_engine(out, "decoder_box", trt, identity).is_file()
    with pytest.raises(CheckpointError, match="another machine.*refvlm export tensorrt"):
        check_engine(out, "decoder_box", trt, {**identity, "gpu": "NVIDIA Jetson Orin", "compute_capability": "8.7"})
    with pytest.raises(CheckpointError, match="missing.*refvlm export tensorrt"):
        check_engine(tmp_path, "decoder_box", trt, identity)
    (tmp_path / "decoder_box.engine").write_bytes(b"x")
    (tmp_path / "decoder_box.engine.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        check_engine(tmp_path, "decoder_box", trt, identity)


def test_inconsistent_profiles_fail(engines):
    trt, _, folder, _, _, _ = engines
    manifest = Manifest.load(folder)
    shapes = ProfileConfig.for_manifest(manifest).shapes(manifest.part("decoder_box"))
    shapes["ref_valid"] = ((1, 1), (1, 8), (1, 50))  # L differs from ref_embeddings'
    with pytest.raises(EngineBuildError, match="not self-consistent.*'L'"):
        build_engine(trt, folder / "decoder_box.onnx", shapes, target="SM89")
    convnext = ProfileConfig(size=DimRange(48, 64, 96)).shapes(manifest.part("convnext"))
    with pytest.raises(EngineBuildError, match="multiple of 32"):
        build_engine(trt, folder / "convnext.onnx", convnext, target="SM89")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        ProfileConfig().override("L=100/8/1")


def test_cli_export_and_build(tmp_path, capsys):
    _trt()
    assert main(["export", "onnx", "--model", "tiny", "--out", str(tmp_path / "onnx"), "--decoders-only"]) == 0
    assert {p.part for p in Manifest.load(tmp_path / "onnx").parts} == {
        "decoder_box", "decoder_mask", "decoder_keypoint", "decoder_depth"}
    args = ["export", "tensorrt", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "eng"),
            "--parts", "decoder_depth", "--profiles", "L=1/4/100"]
    assert main(args + (["--target", "SM89"] if not has_cuda() else [])) == 0
    assert (tmp_path / "eng" / "decoder_depth.engine").is_file()
    assert main(["export", "tensorrt", "--onnx", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    assert "refvlm export onnx" in capsys.readouterr().err


# ---- the node's engines: its profile, staleness, rebuild or refusal --------------------

def test_node_profile_is_one_image_the_models_L_and_image_side():
    model, folder = tiny_export()
    manifest = Manifest.load(folder)
    profile = ProfileConfig.for_node(manifest)
    length, size = model.config.router_length, model.config.vision.image_size
    assert (profile.batch, profile.L, profile.size) == (DimRange(1, 1, 1), DimRange(length, length, length),
                                                       DimRange(size, size, size))
    assert profile.tokens.min == 1 and profile.tokens.max == manifest.part("vit").outputs[0].shape[1]
    assert ProfileConfig().override(profile.to_text()) == profile  # the refusal's command gives it back
    box = profile.shapes(manifest.part("decoder_box"))
    assert box["ref_embeddings"] == ((1, length, model.llm.hidden_size),) * 3
    assert box != ProfileConfig.for_manifest(manifest).shapes(manifest.part("decoder_box"))


@pytest.fixture()
def node_export(tmp_path):
    """(TensorRT module, a copy of the tiny export, its manifest, this machine's identity)."""
    trt = _trt()
    _, folder = tiny_export()
    target = tmp_path / "export"
    shutil.copytree(folder, target)
    return trt, target, Manifest.load(target), device_identity(trt, "SM89")


def _command_in(message: str) -> list[str]:
    [command] = re.findall(r"`(refvlm export tensorrt [^`]*)`", message)
    return shlex.split(command)[1:]


def test_missing_engines_are_refused_naming_the_command_that_builds_them(node_export):
    trt, folder, manifest, identity = node_export
    with pytest.raises(CheckpointError, match="there is no engine; build it with `refvlm export tensorrt") as refused:
        ensure_node_engines(folder, manifest, trt, identity, build=False)
    assert not (folder / "engines").exists()
    assert main(_command_in(str(refused.value))) == 0  # exactly the engines the node needs
    engines = ensure_node_engines(folder, manifest, trt, identity, build=False)
    assert set(engines) == {p.part for p in manifest.parts if p.unit} and all(p.is_file() for p in engines.values())


def test_stale_engines_are_rebuilt_or_refused_with_the_reason(node_export):
    trt, folder, manifest, identity = node_export
    engines = ensure_node_engines(folder, manifest, trt, identity, build=True)  # built: none were there
    before = {part: path.stat().st_mtime_ns for part, path in engines.items()}
    key_file = engine_paths(folder / "engines", "decoder_box")[1]
    key = json.loads(key_file.read_text())
    stale = {"tensorrt": ("tensorrt 8.6.1", "tensorrt 'tensorrt 8.6.1'"),
             "gpu": ("NVIDIA Jetson Orin", "gpu 'NVIDIA Jetson Orin'"),
             "onnx_sha256": ("0" * 64, "another ONNX graph"),
             "profile": ({**key["profile"], "ref_embeddings": [[1, 1, 64]] * 3}, "another optimisation profile")}
    for name, (value, reason) in stale.items():
        key_file.write_text(json.dumps({**key, name: value}))
        with pytest.raises(CheckpointError, match=re.escape(reason) + ".*build it with `refvlm export tensorrt"):
            ensure_node_engines(folder, manifest, trt, identity, build=False)
    rebuilt = ensure_node_engines(folder, manifest, trt, identity, build=True)
    after = {part: path.stat().st_mtime_ns for part, path in rebuilt.items()}
    assert after["decoder_box"] != before["decoder_box"]  # only the stale engine was built again
    assert all(after[p] == before[p] for p in before if p != "decoder_box")
    assert ensure_node_engines(folder, manifest, trt, identity, build=False) == rebuilt
    wider = ProfileConfig.for_manifest(manifest)  # another profile than the node's: every engine is stale
    with pytest.raises(CheckpointError, match="another optimisation profile"):
        ensure_engines(folder, folder / "engines", wider, ["decoder_depth"], trt=trt, identity=identity, build=False)


# ---- GPU: run what was built ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs an NVIDIA GPU")
def test_tensorrt_backend_matches_torch(tmp_path):
    from refvlm_export.runtime import TensorRTDecoders

    trt = import_tensorrt("tensorrt")
    model, folder = tiny_export()
    model = model.cuda()
    for fp16, atol in ((False, parity.ATOL * 10), (True, parity.FP16_ATOL)):
        out = tmp_path / f"fp16_{fp16}"
        build_engines(folder, out, ProfileConfig.for_manifest(Manifest.load(folder)).override("batch=1/1/2"),
                      fp16=fp16, trt=trt)
        backend = TensorRTDecoders(out, folder, model.config, trt=trt)
        for unit in model.decoders:
            for length, valid in ((100, 100), (5, 0)):
                report = parity.decoder_parity(model.cpu(), _OnDevice(backend), unit, 1, length, valid, 64,
                                               atol=atol, rtol=atol)
                assert report.ok, str(report)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs an NVIDIA GPU")
def test_onnxruntime_cuda_provider_matches_torch():
    import onnxruntime as ort

    from refvlm_export.runtime import OnnxRuntimeDecoders

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (extra ort-gpu)")
    model, folder = tiny_export()
    backend = OnnxRuntimeDecoders(folder, "cuda", model.config)
    assert backend.sessions["box"].get_providers()[0] == "CUDAExecutionProvider"
    for unit in model.decoders:
        report = parity.decoder_parity(model, backend, unit, 1, 100, 37, 64, atol=1e-3, rtol=1e-3)
        assert report.ok, str(report)


class _OnDevice:
    """Feeds a CUDA backend from CPU inputs (the parity helper builds them on CPU)."""

    def __init__(self, backend):
        self.backend = backend

    def run(self, unit, embeddings, valid, pyramid):
        out = self.backend.run(unit, embeddings.cuda(), valid.cuda(), [p.cuda() for p in pyramid])
        torch.cuda.synchronize()
        return {k: v.cpu() for k, v in out.items()}
