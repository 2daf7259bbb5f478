"""refvlm_node with runtime:=onnxruntime against runtime:=torch over real DDS: two node
processes on the tiny preset (the same seeded weights), one running the encoders, the
projector and the decoders from a `refvlm export onnx` folder. The answer text is forced
(random weights), so the real LLM still runs on each runtime's image tokens and the
decoders read each runtime's hidden states and pyramid. SimWorld questions: same TRP,
boxes within 1 px, mask IoU >= 0.99, predicted depth within 1e-3 relative. Configure
refuses an empty export folder naming the command that builds it; /diagnostics says which
runtime and ONNX Runtime provider run; without a GPU, runtime:=tensorrt fails configure saying
so and runtime:=auto runs ONNX Runtime CPU with TensorRT's refusal as its reason."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_parity import assert_same_result
from ros_client import NodeHandle, SpinningClient, spawn_node, stop_nodes

from tests.export_helpers import tiny_export

pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]

ANSWER = ("<Phrase>yellow cube</Phrase> (<Unit>box, mask</Unit>[0]<REF>), "
          "<Phrase>floor</Phrase> (<Unit>depth</Unit>[0]<REF>)")
NODES = {"refvlm_torch": "torch", "refvlm_ort": "onnxruntime"}
W, H = 128, 96
LAYOUTS = (0, 1, 2)


@pytest.fixture(scope="module")
def export_dir():
    return tiny_export()[1]  # `refvlm export onnx --model tiny`, once per test session


def start_node(name: str, runtime: str, log: Path, extra: list[str]) -> subprocess.Popen:
    script = Path(__file__).with_name("_node_process.py")
    command = [sys.executable, str(script), "--answer", ANSWER, "--ros-args", "-r", f"__node:={name}",
               "-p", "model_preset:=tiny", "-p", f"runtime:={runtime}", *extra]
    return spawn_node(command, log)


@pytest.fixture(scope="module")
def node_processes(tmp_path_factory, export_dir):
    logs = tmp_path_factory.mktemp("nodes")
    empty = tmp_path_factory.mktemp("empty_export")
    processes = {
        # autostarts on torch; the onnxruntime node first gets an empty folder (configure must fail)
        "refvlm_torch": start_node("refvlm_torch", "torch", logs / "torch.log", ["-p", "autostart:=true"]),
        "refvlm_ort": start_node("refvlm_ort", "onnxruntime", logs / "ort.log", ["-p", f"export_dir:={empty}"]),
    }
    yield processes
    stop_nodes(processes.values())


@pytest.fixture(scope="module")
def client(node_processes):
    client = SpinningClient("runtime_test_client")
    yield client
    client.close()


@pytest.fixture(scope="module")
def nodes(client):
    return {name: NodeHandle(client, name) for name in NODES}


def log_tail(process) -> str:
    return process.log.read_text()[-3000:]


def test_empty_export_fails_configure_naming_the_command_then_the_export_runs(client, nodes, node_processes,
                                                                             export_dir):
    ort, log = nodes["refvlm_ort"], node_processes["refvlm_ort"].log
    assert ort.state(timeout=120) == "unconfigured", log_tail(node_processes["refvlm_ort"])
    assert not ort.transition("configure", timeout=120)
    client.wait_for(lambda: "refvlm export onnx --model tiny --out" in log.read_text(), 10, "the error log")
    assert ort.state() == "unconfigured"
    ort.set_parameters(export_dir=str(export_dir))
    assert ort.transition("configure", timeout=120), log_tail(node_processes["refvlm_ort"])
    assert ort.transition("activate")
    client.wait_for(lambda: nodes["refvlm_torch"].state(timeout=120) == "active", 120, "the torch node")


def test_diagnostics_say_which_runtime_and_provider_run(client, nodes):
    def reported() -> bool:
        return all(node.diagnostics.get("state") == "active" for node in nodes.values())
    client.wait_for(reported, 30, "diagnostics of both nodes")
    ort, torch_ = nodes["refvlm_ort"].diagnostics, nodes["refvlm_torch"].diagnostics
    assert ort["runtime"] == "onnxruntime" and ort["onnx_provider"] == "CPUExecutionProvider"
    assert "onnxruntime" in ort["runtime_reason"]
    assert torch_["runtime"] == "torch" and "onnx_provider" not in torch_


def sim_questions():
    """(prompt, rgb8 Image) for a few SimWorld layouts, naming an object each one shows."""
    from refvlm_ros.image_conversions import array_to_image
    from refvlm_ros.sim_scenes import SimScenes

    questions = []
    for layout in LAYOUTS:
        scenes = SimScenes("val", layout, W, H)
        rgb, _, _, truth = scenes.render(scenes.base_camera)
        visible = [o["name"] for o in truth["objects"] if o["box_xyxy"]]
        questions.append((f"Where is the {visible[0]}?", array_to_image(rgb, "rgb8")))
    return questions


def test_simworld_questions_give_the_same_answers_on_both_runtimes(nodes):
    boxes = []
    for prompt, image in sim_questions():
        reference, candidate = (nodes[name].ask(prompt, image, timeout=60) for name in NODES)
        assert reference.success and candidate.success, (reference.error, candidate.error)
        assert reference.result.trp_text == ANSWER and list(reference.result.errors) == []
        assert len(reference.result.objects) == 2
        assert_same_result(reference.result, candidate.result)
        assert reference.result.objects[0].has_box and reference.result.objects[1].has_depth
        boxes.append(tuple(reference.result.objects[0].box_xyxy))
    assert len(set(boxes)) == len(boxes)  # each image gives its own box: the comparison is not vacuous


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fall-through")
def test_without_a_gpu_tensorrt_is_refused_and_auto_runs_onnxruntime_saying_why(client, nodes, node_processes):
    ort, log = nodes["refvlm_ort"], node_processes["refvlm_ort"].log
    assert ort.transition("deactivate") and ort.transition("cleanup")
    ort.set_parameters(runtime="tensorrt")
    assert not ort.transition("configure", timeout=120)
    client.wait_for(lambda: "runtime tensorrt needs a CUDA GPU: pick onnxruntime or torch" in log.read_text(),
                    10, "the refusal in the log")
    ort.set_parameters(runtime="auto")
    assert ort.transition("configure", timeout=120), log_tail(node_processes["refvlm_ort"])
    client.wait_for(lambda: ort.diagnostics.get("state") == "configured", 30, "diagnostics after configure")
    reason = ort.diagnostics["runtime_reason"]
    assert ort.diagnostics["runtime"] == "onnxruntime" and reason.startswith("auto: onnxruntime cpu")
    assert "tensorrt: runtime tensorrt needs a CUDA GPU" in reason and "onnxruntime cuda: no CUDA GPU" in reason
    assert "runtime_reason=auto: onnxruntime cpu" in log.read_text()  # the log says it too
