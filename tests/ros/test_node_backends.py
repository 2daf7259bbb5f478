"""refvlm_node with backend:=onnxruntime against backend:=torch over real DDS: two node
processes on the tiny preset (the same seeded weights), one running the encoders, the
projector and the decoders from a `refvlm export onnx` folder. The answer text is forced
(random weights), so the real LLM still runs on each backend's image tokens and the
decoders read each backend's hidden states and pyramid. SimWorld questions: same TRP,
boxes within 1 px, mask IoU >= 0.99, predicted depth within 1e-3 relative. Configure
refuses an empty export folder naming the command that builds it; /diagnostics says which
backend and ONNX Runtime provider run."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]

ANSWER = ("<Phrase>yellow cube</Phrase> (<Unit>box, mask</Unit>[0]<REF>), "
          "<Phrase>floor</Phrase> (<Unit>depth</Unit>[0]<REF>)")
NODES = {"refvlm_torch": "torch", "refvlm_ort": "onnxruntime"}
W, H = 128, 96
LAYOUTS = (0, 1, 2)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from refvlm_cli.main import main

    folder = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["export", "onnx", "--model", "tiny", "--out", str(folder)]) == 0
    return folder


def start_node(name: str, backend: str, log: Path, extra: list[str]) -> subprocess.Popen:
    script = Path(__file__).with_name("_node_process.py")
    command = [sys.executable, str(script), "--answer", ANSWER, "--ros-args", "-r", f"__node:={name}",
               "-p", "model_preset:=tiny", "-p", f"backend:={backend}", *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    process.log = log
    return process


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
    for process in processes.values():
        process.terminate()
    for process in processes.values():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


class Client:
    """Query, lifecycle and parameter clients for both nodes, spun in a background thread."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import ChangeState, GetState
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import MultiThreadedExecutor
        from refvlm_interfaces.srv import Query

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("backend_test_client", context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()
        n = self.node
        self.query = {name: n.create_client(Query, f"/{name}/query") for name in NODES}
        self.change_state = {name: n.create_client(ChangeState, f"/{name}/change_state") for name in NODES}
        self.get_state = {name: n.create_client(GetState, f"/{name}/get_state") for name in NODES}
        self.set_parameters = n.create_client(SetParameters, "/refvlm_ort/set_parameters")
        self.diagnostics: dict[str, dict[str, str]] = {}
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            self.diagnostics[status.hardware_id] = {kv.key: kv.value for kv in status.values}

    def call(self, client, request, timeout: float = 60.0):
        assert client.wait_for_service(timeout_sec=timeout), f"{client.srv_name} not available"
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        assert done.wait(timeout), f"{client.srv_name} did not answer within {timeout} s"
        return future.result()

    def transition(self, name: str, label: str) -> bool:
        from lifecycle_msgs.srv import ChangeState
        request = ChangeState.Request()
        request.transition.label = label
        return self.call(self.change_state[name], request, timeout=120).success

    def state(self, name: str) -> str:
        from lifecycle_msgs.srv import GetState
        return self.call(self.get_state[name], GetState.Request(), timeout=120).current_state.label

    def set_export_dir(self, folder: Path) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter
        request = SetParameters.Request(parameters=[Parameter("export_dir", value=str(folder)).to_parameter_msg()])
        assert all(r.successful for r in self.call(self.set_parameters, request).results)

    def ask(self, name: str, prompt: str, image):
        from refvlm_interfaces.srv import Query
        return self.call(self.query[name], Query.Request(prompt=prompt, use_image=True, image=image))

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


@pytest.fixture(scope="module")
def client(node_processes):
    client = Client()
    yield client
    client.close()


def log_tail(process) -> str:
    return process.log.read_text()[-3000:]


def test_empty_export_fails_configure_naming_the_command_then_the_export_runs(client, node_processes, export_dir):
    ort = node_processes["refvlm_ort"]
    assert client.state("refvlm_ort") == "unconfigured", log_tail(ort)
    assert not client.transition("refvlm_ort", "configure")
    client.wait_for(lambda: "refvlm export onnx --model tiny --out" in ort.log.read_text(), 10, "the error log")
    assert client.state("refvlm_ort") == "unconfigured"
    client.set_export_dir(export_dir)
    assert client.transition("refvlm_ort", "configure"), log_tail(ort)
    assert client.transition("refvlm_ort", "activate")
    client.wait_for(lambda: client.state("refvlm_torch") == "active", 120, "the torch node")


def test_diagnostics_say_which_backend_and_provider_run(client):
    def reported() -> bool:
        return all(client.diagnostics.get(name, {}).get("state") == "active" for name in NODES)
    client.wait_for(reported, 30, "diagnostics of both nodes")
    ort, torch_ = client.diagnostics["refvlm_ort"], client.diagnostics["refvlm_torch"]
    assert ort["backend"] == "onnxruntime" and ort["onnx_provider"] == "CPUExecutionProvider"
    assert "onnxruntime" in ort["backend_reason"]
    assert torch_["backend"] == "torch" and "onnx_provider" not in torch_


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


def mask_array(image) -> np.ndarray:
    from refvlm_ros.image_conversions import image_to_array
    return image_to_array(image, backend="numpy") > 0


def assert_same_objects(reference, candidate) -> None:
    from refvlm_export.parity import mask_iou
    assert len(reference.objects) == len(candidate.objects) == 2
    for ref, got in zip(reference.objects, candidate.objects):
        assert (ref.phrase, list(ref.units), ref.has_box) == (got.phrase, list(got.units), got.has_box)
        if ref.has_box:
            assert np.abs(np.array(ref.box_xyxy) - np.array(got.box_xyxy)).max() <= 1.0
        if ref.mask.width:
            assert mask_iou(mask_array(ref.mask), mask_array(got.mask)) >= 0.99
        assert ref.has_depth == got.has_depth
        for field in ("depth_median", "depth_min", "depth_max"):
            a, b = getattr(ref, field), getattr(got, field)
            assert abs(a - b) <= 1e-3 * max(abs(a), 1e-6), (field, a, b)


def test_simworld_questions_give_the_same_answers_on_both_backends(client):
    boxes = []
    for prompt, image in sim_questions():
        reference, candidate = (client.ask(name, prompt, image) for name in NODES)
        assert reference.success and candidate.success, (reference.error, candidate.error)
        assert candidate.result.trp_text == reference.result.trp_text == ANSWER
        assert list(candidate.result.errors) == list(reference.result.errors) == []
        assert_same_objects(reference.result, candidate.result)
        assert reference.result.objects[0].has_box and reference.result.objects[1].has_depth
        boxes.append(tuple(reference.result.objects[0].box_xyxy))
    assert len(set(boxes)) == len(boxes)  # each image gives its own box: the comparison is not vacuous
