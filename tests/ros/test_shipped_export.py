"""The shipped model through its export, over DDS, as a fresh clone runs it: models/nano is
exported on first use (refvlm_export.cache; once per test session, found again when asked
again), then one refvlm_node runs runtime:=torch and one runtime:=onnxruntime on that
export. The demo's SimWorld questions (a box, a mask, a depth map) give the same TRP answers
on both, boxes within 1 px, masks IoU >= 0.99, depth within 1e-3 relative. Both nodes run
the LLM with float weights (quantize:=none), the same on both runtimes.

The export takes minutes on a CPU; with REFVLM_EXPORT_CACHE set, the test uses (and fills)
that cache instead of a fresh one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_parity import assert_same_result
from ros_client import NodeHandle, SpinningClient, spawn_node, stop_nodes

pytestmark = [pytest.mark.ros, pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = Path(__file__).resolve().parents[2] / "models" / "nano"
NODES = {"nano_torch": "torch", "nano_ort": "onnxruntime"}
QUESTIONS = ("Locate the red cube.", "Segment the person.", "Please estimate the depth map of the image.")
W, H = 320, 240


@pytest.fixture(scope="module")
def nano_export(tmp_path_factory):
    from refvlm_export.cache import CACHE_ENV, cached_export

    if not (MODEL / "config.json").is_file():
        pytest.skip(f"no shipped model in {MODEL}")
    cache = Path(os.environ.get(CACHE_ENV) or tmp_path_factory.mktemp("export_cache"))
    said: list[str] = []
    folder = cached_export(str(MODEL), cache, say=said.append)
    again = cached_export(str(MODEL), cache, say=said.append)
    assert again == folder and "reusing" in said[-1], said  # the second use finds the first export
    return folder


def start_node(name: str, runtime: str, export_dir: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "refvlm_ros.node", "--ros-args", "-r", f"__node:={name}",
               "-p", f"model_path:={MODEL}", "-p", f"runtime:={runtime}", "-p", f"export_dir:={export_dir}",
               "-p", "publish_overlay:=false", "-p", "autostart:=true",
               # float LLM weights (the default, pinned): the runtimes differ in the vision parts
               # only, and int8 weights empty some of these short answers on either runtime
               "-p", "quantize:=none"]
    return spawn_node(command, log)


@pytest.fixture(scope="module")
def nodes(nano_export, tmp_path_factory):
    logs = tmp_path_factory.mktemp("nano_nodes")
    processes = {name: start_node(name, runtime, nano_export, logs / f"{name}.log")
                 for name, runtime in NODES.items()}
    client = SpinningClient("shipped_export_client")
    handles = {name: NodeHandle(client, name) for name in NODES}
    try:
        for name, handle in handles.items():
            client.wait_for(lambda: processes[name].poll() is not None or handle.diagnostics.get("state") == "active",
                            300, f"{name} to be active", poll_s=0.5)
            assert processes[name].poll() is None, processes[name].log.read_text()[-3000:]
        yield handles
    finally:
        client.close()
        stop_nodes(processes.values(), timeout_s=30)


def demo_image():
    """The demo's scene: the first SimWorld test layout showing a red cube and a person."""
    from refvlm_ros.demo import pick_layout
    from refvlm_ros.image_conversions import array_to_image
    from refvlm_ros.sim_scenes import SimScenes

    scenes = SimScenes("test", pick_layout("test", {"red cube", "person"}, W, H), W, H)
    return array_to_image(scenes.render(scenes.base_camera)[0], "rgb8")


def test_the_exported_nano_node_answers_like_the_torch_node(nodes):
    ort = nodes["nano_ort"].diagnostics
    assert ort["runtime"] == "onnxruntime" and ort["onnx_provider"] == "CPUExecutionProvider"
    assert nodes["nano_torch"].diagnostics["runtime"] == "torch"
    image = demo_image()
    units = set()
    for prompt in QUESTIONS:
        reference, candidate = (nodes[name].ask(prompt, image, timeout=180) for name in NODES)
        assert reference.success and candidate.success, (reference.error, candidate.error)
        assert_same_result(reference.result, candidate.result)
        units |= {unit for obj in reference.result.objects for unit in obj.units}
    assert {"box", "mask", "depth"} <= units, units  # each decoder's output was compared
