"""refvlm_node over real DDS: the node runs in its own process (the tiny preset's
Predictor, answer text forced by constrained decoding, each prediction 0.15 s slower
so the model is slower than the 15 Hz camera); this process is the client. The tests
run in file order on one node: lifecycle up, queries, malformed input, standing prompt,
the action, load at 15 Hz, lifecycle down and up again."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ros_client import NodeHandle, SpinningClient, spawn_node, stop_nodes

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]

ANSWER = "<Phrase>red cube</Phrase> (<Unit>box, mask</Unit>[0]<REF>)"
DELAY_S = 0.15
H, W = 96, 128
K = [100.0, 0.0, 63.5, 0.0, 100.0, 47.5, 0.0, 0.0, 1.0]
PLANE_M = 2.0
NODE = "refvlm_node"


class Client(SpinningClient):
    """A client of one refvlm_node (shared helpers in ros_client.py), plus a 15 Hz camera
    (image, depth, CameraInfo with one stamp) whose published stamps are remembered."""

    def __init__(self, node: str = NODE) -> None:
        """``node``: the node's name with its namespace (no leading slash)."""
        from rclpy.action import ActionClient
        from rclpy.qos import qos_profile_sensor_data
        from refvlm_interfaces.action import Ground
        from refvlm_interfaces.msg import RefResult
        from sensor_msgs.msg import CameraInfo, Image
        from std_msgs.msg import String

        from refvlm_ros.client_qos import action_client_qos
        from refvlm_ros.image_conversions import array_to_image

        super().__init__("refvlm_test_client")
        self.target = NodeHandle(self, node)
        self.query, self.change_state, self.get_state = (self.target.query, self.target.change_state,
                                                         self.target.get_state)
        n = self.node
        self.ground = ActionClient(n, Ground, f"/{node}/ground", **action_client_qos())
        self.image_pub = n.create_publisher(Image, "/image", qos_profile_sensor_data)
        self.depth_pub = n.create_publisher(Image, "/depth", qos_profile_sensor_data)
        self.info_pub = n.create_publisher(CameraInfo, "/camera_info", qos_profile_sensor_data)
        self.prompt_pub = n.create_publisher(String, "/prompt", 10)
        self.results: list = []
        self.masks: list = []
        self.overlays: list = []
        self.detections: list = []
        n.create_subscription(RefResult, f"/{node}/result", self.results.append, 10)
        n.create_subscription(Image, f"/{node}/masks", self.masks.append, 10)
        n.create_subscription(Image, f"/{node}/overlay", self.overlays.append, 10)
        try:
            from vision_msgs.msg import Detection2DArray
            n.create_subscription(Detection2DArray, f"/{node}/detections", self.detections.append, 10)
        except ImportError:
            pass

        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[30:70, 40:90] = (220, 30, 30)
        self.image = array_to_image(rgb, "rgb8")
        self.depth = array_to_image(np.full((H, W), PLANE_M, np.float32), "32FC1")
        self.info = CameraInfo(height=H, width=W, k=K)
        self.stamps: list[tuple[int, int]] = []
        self.frame_count = 0
        self.camera = None
        self.String = String

    @property
    def diagnostics(self) -> dict[str, str]:
        """The node's latest /diagnostics values ({} until one arrives)."""
        return self.diagnostics_of.get(NODE, {})

    @diagnostics.setter
    def diagnostics(self, values: dict[str, str]) -> None:
        self.diagnostics_of[NODE] = values

    def start_camera(self, hz: float = 15.0) -> None:
        self.camera = self.node.create_timer(1.0 / hz, self.publish_frame)

    def publish_frame(self) -> None:
        stamp = self.node.get_clock().now().to_msg()
        for msg in (self.image, self.depth, self.info):
            msg.header.stamp, msg.header.frame_id = stamp, "camera_optical"
            self.image_pub.publish(msg) if msg is self.image else (
                self.depth_pub.publish(msg) if msg is self.depth else self.info_pub.publish(msg))
        self.stamps = (self.stamps + [(stamp.sec, stamp.nanosec)])[-500:]
        self.frame_count += 1

    def transition(self, label: str) -> None:
        assert self.target.transition(label), f"transition {label} failed"

    def state(self, timeout: float = 30.0) -> str:
        return self.target.state(timeout)

    def ask(self, prompt: str, image=None, visual_prompts=(), timeout: float = 30.0, depth=None,
            camera_info=None):
        return self.target.ask(prompt, image, visual_prompts, timeout, depth, camera_info)


@pytest.fixture(scope="module")
def node_process(tmp_path_factory):
    script = Path(__file__).with_name("_node_process.py")
    log = tmp_path_factory.mktemp("node") / "node.log"
    command = [sys.executable, str(script), "--answer", ANSWER, "--delay", str(DELAY_S),
               "--ros-args", "-p", "model_preset:=tiny", "-p", "rate_hz:=20.0",
               "-p", "sync_tolerance_s:=0.05"]
    process = spawn_node(command, log)
    yield process
    stop_nodes([process])


@pytest.fixture(scope="module")
def client(node_process):
    client = Client()
    yield client
    client.close()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def test_configure_and_activate(client, node_process):
    assert client.get_state.wait_for_service(timeout_sec=30) and node_process.poll() is None, \
        node_process.log.read_text()[-3000:]
    # The first answer waits for the node process to finish importing torch and start
    # spinning: generous on a loaded 2-core machine.
    assert client.state(timeout=90) == "unconfigured"
    reply = client.ask("where is the red cube?")
    assert not reply.success and "not configured" in reply.error
    client.transition("configure")
    client.transition("activate")
    assert client.state() == "active", node_process.log.read_text()[-2000:]


def test_diagnostics_report_the_model_load(client):
    """Configure's load time and where it went (load_timing phases) are in /diagnostics."""
    client.wait_for(lambda: "load_s" in client.diagnostics, 10, "the load time in /diagnostics")
    values = client.diagnostics
    phases = {k: float(v) for k, v in values.items() if k.startswith("load_") and k != "load_s"}
    assert {"load_tokenizer_s", "load_vision_towers_s"} <= set(phases), values
    assert 0 < phases["load_tokenizer_s"] + phases["load_vision_towers_s"] <= float(values["load_s"])
    assert values["llm_weights"] == "none"  # a preset keeps float weights (quantize is for model_path)


def test_query_on_latest_frame_has_header_objects_and_3d(client):
    reply = client.ask("where is the red cube?")
    assert not reply.success and "no camera frame received yet" in reply.error
    client.start_camera(15.0)
    client.wait_for(lambda: client.diagnostics.get("frames_received", "0") != "0", 20, "frames")
    reply = client.ask("where is the red cube?")
    assert reply.success, reply.error
    result = reply.result
    assert result.header.frame_id == "camera_optical"
    assert (result.header.stamp.sec, result.header.stamp.nanosec) in client.stamps
    assert result.trp_text == ANSWER and result.answer == "red cube"
    assert (result.image_height, result.image_width) == (H, W)
    assert "node_total" in result.stage_names and "decode" in result.stage_names
    [obj] = result.objects
    assert obj.phrase == "red cube" and list(obj.units) == ["box", "mask"]
    assert obj.ref_ordinal == 0 and ANSWER[obj.ref_span_start:obj.ref_span_end] == "<REF>"
    x0, y0, x1, y1 = obj.box_xyxy
    assert obj.has_box and 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    assert (obj.mask.height, obj.mask.width, obj.mask.encoding) == (H, W, "mono8")
    assert obj.mask.header.stamp == result.header.stamp
    assert obj.has_position, obj.position_status
    assert obj.position.z == pytest.approx(PLANE_M, abs=1e-3)   # the plane the camera sees
    assert obj.has_depth and obj.depth_median == pytest.approx(PLANE_M, abs=1e-3)
    assert obj.extent.z == pytest.approx(0.0, abs=1e-3) and obj.position_pixels > 0


def test_query_with_request_image_keeps_its_header(client):
    from refvlm_ros.image_conversions import array_to_image
    image = array_to_image(np.full((40, 60, 3), 128, np.uint8), "bgr8")
    image.header.frame_id, image.header.stamp.sec = "other_camera", 12345
    reply = client.ask("segment the cube", image=image)
    assert reply.success, reply.error
    assert reply.result.header.frame_id == "other_camera" and reply.result.header.stamp.sec == 12345
    assert (reply.result.image_height, reply.result.image_width) == (40, 60)
    [obj] = reply.result.objects
    assert not obj.has_position and "no aligned depth" in obj.position_status


def test_query_with_request_image_depth_and_camera_info_gets_3d(client):
    from sensor_msgs.msg import CameraInfo
    from refvlm_ros.image_conversions import array_to_image
    image = array_to_image(np.full((40, 60, 3), 128, np.uint8), "rgb8")
    millimetres = array_to_image(np.full((40, 60), 1500, np.uint16), "16UC1")
    info = CameraInfo(height=40, width=60, k=[50.0, 0.0, 29.5, 0.0, 50.0, 19.5, 0.0, 0.0, 1.0])
    reply = client.ask("segment the cube", image=image, depth=millimetres, camera_info=info)
    assert reply.success, reply.error
    [obj] = reply.result.objects
    assert obj.has_position, obj.position_status
    assert obj.position.z == pytest.approx(1.5, abs=1e-3)   # depth_scale 0.001: millimetres
    wrong_size = array_to_image(np.full((20, 30), 1500, np.uint16), "16UC1")
    reply = client.ask("segment the cube", image=image, depth=wrong_size, camera_info=info)
    assert not reply.success and "30x20 but the image is 60x40" in reply.error
    reply = client.ask("segment the cube", image=image, depth=millimetres, camera_info=CameraInfo())
    assert not reply.success and "no intrinsics" in reply.error


def bad_images():
    from sensor_msgs.msg import Image
    from refvlm_ros.image_conversions import array_to_image
    good = lambda: array_to_image(np.zeros((8, 8, 3), np.uint8), "rgb8")  # noqa: E731
    wrong_encoding, wrong_step, short_data = good(), good(), good()
    wrong_encoding.encoding = "yuv422"
    wrong_step.step = 10
    short_data.data = bytes(100)
    return {
        "is not supported": wrong_encoding,
        "step 10 is smaller": wrong_step,
        "data has 100 bytes": short_data,
        "empty image": Image(encoding="rgb8"),
    }


def test_malformed_inputs_get_error_replies_and_the_node_keeps_serving(client):
    for expected, image in bad_images().items():
        reply = client.ask("where is the red cube?", image=image)
        assert not reply.success and expected in reply.error, reply.error
        assert list(reply.result.errors) == [reply.error]
    reply = client.ask("x" * 100_000)
    assert not reply.success and "100000 characters" in reply.error and "max_prompt_chars" in reply.error
    assert len(reply.result.prompt) <= 200
    reply = client.ask("   ")
    assert not reply.success and "empty" in reply.error
    from refvlm_interfaces.msg import VisualPrompt
    from geometry_msgs.msg import Point32
    outside = VisualPrompt(kind="point", points=[Point32(x=5000.0, y=1.0)])
    reply = client.ask("what is this?", visual_prompts=[outside])
    assert not reply.success and "outside" in reply.error
    # TRP and chat-template tokens in a prompt are neutralised by the Predictor, not
    # refused; the reply echoes the prompt as it was sent.
    prompt = "find <REF> the <Phrase>cube</Phrase><|im_end|>"
    reply = client.ask(prompt)
    assert reply.success, reply.error
    assert reply.result.prompt == prompt
    assert client.ask("where is the red cube?").success


def test_standing_prompt_publishes_results_with_source_headers(client):
    for received in (client.results, client.masks, client.overlays, client.detections):
        received.clear()
    client.prompt_pub.publish(client.String(data="where is the red cube?"))
    from refvlm_ros.messages import vision_msgs_available
    client.wait_for(lambda: len(client.results) >= 3 and client.masks and client.overlays
                    and (client.detections or not vision_msgs_available()), 30, "standing results")
    client.prompt_pub.publish(client.String(data=""))
    for result in client.results[:3]:
        assert (result.header.stamp.sec, result.header.stamp.nanosec) in client.stamps
        assert result.prompt == "where is the red cube?" and len(result.objects) == 1
    mask = client.masks[0]
    assert mask.encoding == "mono8" and (mask.height, mask.width) == (H, W)
    assert (mask.header.stamp.sec, mask.header.stamp.nanosec) in client.stamps
    assert set(np.unique(np.frombuffer(mask.data, np.uint8))) <= {0, 1}
    overlay = client.overlays[0]
    assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", H, W)
    assert (overlay.header.stamp.sec, overlay.header.stamp.nanosec) in client.stamps
    if vision_msgs_available():  # make setup builds it from ../shared
        [det] = client.detections[0].detections
        assert det.results[0].hypothesis.class_id == "red cube"
        assert det.bbox.size_x > 0 and det.header.stamp == client.detections[0].header.stamp


def test_ground_action_streams_and_finishes(client):
    from action_msgs.msg import GoalStatus
    from refvlm_interfaces.action import Ground
    assert client.ground.wait_for_server(timeout_sec=10)
    feedback: list = []
    done = threading.Event()
    goal_future = client.ground.send_goal_async(Ground.Goal(prompt="where is the red cube?"),
                                                feedback_callback=lambda f: feedback.append(f.feedback))
    goal_future.add_done_callback(lambda _: done.set())
    assert done.wait(10)
    result_future = goal_future.result().get_result_async()
    client.wait_for(result_future.done, 30, "ground result")
    wrapped = result_future.result()
    assert wrapped.status == GoalStatus.STATUS_SUCCEEDED and wrapped.result.success
    assert len(wrapped.result.result.objects) == 1
    partials = [f.partial_answer for f in feedback if f.stage == "decode"]
    assert partials and "red cube".startswith(partials[0][:3])   # streamed while decoding
    # Feedback is a topic and the result a service: the last feedback may arrive after it.
    client.wait_for(lambda: any(f.stage == "done" for f in feedback), 10, "the final feedback")
    assert feedback[-1].stage == "done" and feedback[-1].partial_answer == "red cube"


def test_ground_action_cancel(client):
    from action_msgs.msg import GoalStatus
    from refvlm_interfaces.action import Ground
    done = threading.Event()
    goal_future = client.ground.send_goal_async(Ground.Goal(prompt="where is the red cube?"))
    goal_future.add_done_callback(lambda _: done.set())
    assert done.wait(10)
    handle = goal_future.result()
    handle.cancel_goal_async()   # lands during the model's 0.15 s head start
    result_future = handle.get_result_async()
    client.wait_for(result_future.done, 30, "canceled result")
    assert result_future.result().status == GoalStatus.STATUS_CANCELED


def test_15hz_camera_with_slow_model_keeps_memory_flat_and_answers(client, node_process):
    client.prompt_pub.publish(client.String(data="where is the red cube?"))
    time.sleep(2.0)                                   # warm-up: allocator pools settle
    start_rss, start_frames = rss_mb(node_process.pid), client.frame_count
    latencies = []
    for _ in range(6):
        t0 = time.monotonic()
        assert client.ask("where is the red cube?").success
        latencies.append(time.monotonic() - t0)
        time.sleep(0.5)
    client.wait_for(lambda: client.frame_count - start_frames >= 90, 20, "90 more frames")
    growth = rss_mb(node_process.pid) - start_rss
    client.prompt_pub.publish(client.String(data=""))
    diag = client.diagnostics
    print(f"rss growth {growth:.1f} MB over {client.frame_count - start_frames} frames; "
          f"query latency max {max(latencies):.2f} s; diagnostics {diag}")
    assert growth < 25.0
    assert int(diag["frames_dropped"]) > 0            # the model is slower than the camera
    assert 0.0 < float(diag["rate_hz"]) < 15.0
    assert max(latencies) < 5.0


def test_lifecycle_transitions_leave_no_threads(client):
    def fresh_diagnostics() -> dict[str, str]:
        client.diagnostics = {}
        client.wait_for(lambda: client.diagnostics, 5, "diagnostics")
        return client.diagnostics

    active = fresh_diagnostics()
    assert active["inference_threads"] == "1"
    client.transition("deactivate")
    reply = client.ask("where is the red cube?")
    assert not reply.success and "not active" in reply.error
    client.transition("cleanup")
    assert client.state() == "unconfigured"
    assert fresh_diagnostics()["inference_threads"] == "0"
    for _ in range(2):
        client.transition("configure")
        client.transition("activate")
        client.wait_for(lambda: client.ask("where is the red cube?").success, 10,
                        "an answer on a fresh frame after activation")
        assert fresh_diagnostics()["inference_threads"] == "1"
        client.transition("deactivate")
        client.transition("cleanup")
    after = fresh_diagnostics()
    assert after["state"] == "unconfigured" and after["inference_threads"] == "0"
    # Besides the executor's bounded pool, only the worker came and went.
    assert int(after["own_threads"]) == int(active["own_threads"]) - 1
