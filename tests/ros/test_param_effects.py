"""Every refvlm_node parameter does something.

``PARAM_REGISTRY`` maps each field of ``refvlm_ros.params.NodeParams`` (what the node
declares) to the test that changes it and asserts what changes with it: a subscription's
topic or QoS, a publisher or timer that exists or not, a refusal, a 3D position, results
that appear; one of this module's, or an existing test named ``path::function``.
``test_the_registry_covers_every_parameter`` fails for a parameter added without one.

The nodes here run in this process on one tiny-preset Predictor (loaded once; the answer
text forced as in ``_node_process.py``): a node start costs the parameters, not a model.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
HERE = "tests/ros/test_param_effects.py"
ROBUST = "tests/ros/test_node_robustness.py"
RUNTIMES = "tests/ros/test_node_runtimes.py"
ANSWER = "<Phrase>red cube</Phrase> (<Unit>box, mask</Unit>[0]<REF>)"


def here(name: str) -> str:
    return f"{HERE}::{name}"


PARAM_REGISTRY: dict[str, str | tuple[str, ...]] = {
    "model_preset": here("test_model_preset_and_model_path_pick_the_model"),
    "model_path": here("test_model_preset_and_model_path_pick_the_model"),
    "device": here("test_device_is_where_the_model_runs"),
    "runtime": (f"{RUNTIMES}::test_diagnostics_say_which_runtime_and_provider_run",
                here("test_a_renamed_parameter_fails_configure_naming_its_new_name")),  # was backend
    "quantize": "tests/ros/test_node_load.py::test_quantize_picks_the_llm_weights",
    "export_dir": (f"{RUNTIMES}::test_empty_export_fails_configure_naming_the_command_then_the_export_runs",
                   here("test_export_dir_with_the_torch_runtime_says_it_is_unused")),
    # TensorRT only (a GPU): without it no engine is built and configure fails naming the command
    "build_engines": "tests/test_export_runtime.py::test_tensorrt_runtime_builds_the_node_engines_on_configure_and_matches_torch",
    "standing_prompt": here("test_standing_prompt_rate_and_depth_pairing_over_dds"),
    "rate_hz": here("test_standing_prompt_rate_and_depth_pairing_over_dds"),
    "sync_tolerance_s": here("test_standing_prompt_rate_and_depth_pairing_over_dds"),
    "image_topic": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "image_transport": f"{ROBUST}::test_compressed_reliable_camera_input",
    "image_reliability": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "image_qos_depth": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "camera_info_topic": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "camera_info_reliability": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "camera_info_qos_depth": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "depth_topic": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "depth_reliability": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "depth_qos_depth": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "prompt_topic": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "visual_prompt_topic": here("test_topic_and_qos_params_shape_the_subscriptions"),
    "max_prompt_chars": here("test_request_limits_refuse_what_they_bound"),
    "max_image_pixels": here("test_request_limits_refuse_what_they_bound"),
    "max_aspect_ratio": here("test_request_limits_refuse_what_they_bound"),
    "max_prompt_tokens": here("test_prompt_tokens_and_request_time_are_bounded"),
    "max_request_s": here("test_prompt_tokens_and_request_time_are_bounded"),
    "max_pending_queries": here("test_query_queue_params"),
    "query_queue_depth": here("test_query_queue_params"),
    "depth_scale": here("test_depth_scale_and_min_pixels_shape_the_3d_answer"),
    "localization_min_pixels": here("test_depth_scale_and_min_pixels_shape_the_3d_answer"),
    "max_depth_m": here("test_max_depth_m_makes_far_readings_unknown"),
    "publish_overlay": here("test_overlay_and_diagnostics_period"),
    "image_backend": here("test_image_backend_picks_the_conversion"),
    "autostart": f"{ROBUST}::test_compressed_reliable_camera_input",
    "diagnostics_period_s": here("test_overlay_and_diagnostics_period"),
    "target_frame": "tests/ros/test_target_frame.py::test_positions_move_into_target_frame_as_tf2_says",
    "transform_timeout_s": "tests/ros/test_target_frame.py::test_missing_or_too_old_transforms_answer_without_positions_and_say_so",
    "track_max_age_s": ("tests/ros/test_target_frame.py::test_track_ids_follow_camera_frames_not_request_images",
                        "tests/ros/test_tracking.py::test_min_iou_and_max_age_bound_the_association"),
    "track_min_iou": "tests/ros/test_tracking.py::test_min_iou_and_max_age_bound_the_association",
    "cameras": ("tests/ros/test_cameras.py::test_one_node_subscribes_and_publishes_per_camera",
                "tests/ros/test_cameras.py::test_queries_name_their_camera"),
}


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def test_the_registry_covers_every_parameter():
    from refvlm_ros.params import NodeParams

    declared = {f.name for f in dataclasses.fields(NodeParams)}
    missing, stale = sorted(declared - set(PARAM_REGISTRY)), sorted(set(PARAM_REGISTRY) - declared)
    assert not missing, f"node parameters with no effect test: {missing}; add one and list it in {HERE}"
    assert not stale, f"{HERE} lists parameters the node no longer declares: {stale}"
    named = {t for entry in PARAM_REGISTRY.values() for t in ((entry,) if isinstance(entry, str) else entry)}
    absent = [t for t in sorted(named) if t.split("::")[1] not in _test_functions(ROOT / t.split("::")[0])]
    assert not absent, f"effect tests that do not exist: {absent}"
    own = {n for n in _test_functions(Path(__file__)) if n.startswith("test_")} - {
        "test_the_registry_covers_every_parameter"}
    unused = sorted(own - {t.split("::")[1] for t in named if t.startswith(HERE)})
    assert not unused, f"tests of {HERE} no parameter names: {unused}"


# ---- in-process nodes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor():
    import torch

    from refvlm_ros.node import load_predictor
    from refvlm_ros.params import NodeParams

    torch.set_num_threads(1)
    return load_predictor(NodeParams(model_preset="tiny").validate())


@pytest.fixture(scope="module")
def context():
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


class Nodes:
    """RefVLMNodes in this process, each with its parameters, on the shared Predictor."""

    def __init__(self, context, predictor) -> None:
        self.context, self.predictor, self.made = context, predictor, []

    def make(self, name: str, factory=None, **params):
        from _node_process import ForcedAnswerPredictor
        from rclpy.parameter import Parameter
        from refvlm_ros.node import RefVLMNode

        forced = ForcedAnswerPredictor(self.predictor, ANSWER, 0.0)
        node = RefVLMNode(name, predictor_factory=factory or (lambda p: forced), context=self.context,
                          parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        self.made.append(node)
        return node

    def configured(self, name: str, factory=None, activate: bool = False, **params):
        from rclpy.lifecycle import TransitionCallbackReturn

        node = self.make(name, factory, **params)
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        if activate:
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        return node

    def close(self) -> None:
        for node in self.made:
            node.shutdown_cleanly()


@pytest.fixture
def nodes(context, predictor):
    made = Nodes(context, predictor)
    yield made
    made.close()


def _image(height: int = 48, width: int = 64, stamp_s: int = 0):
    from refvlm_ros.image_conversions import array_to_image

    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[10:30, 12:40] = (220, 30, 30)
    image = array_to_image(rgb, "rgb8")
    image.header.stamp.sec, image.header.frame_id = stamp_s, "camera_optical"
    return image


def _ask(node, prompt: str = "where is the red cube?", image=None, depth=None, info=None):
    """The ~/query handler's answer to one request (what the service sends back)."""
    from refvlm_interfaces.srv import Query

    request = Query.Request(prompt=prompt)
    if image is not None:
        request.use_image, request.image = True, image
    if depth is not None:
        request.depth, request.camera_info = depth, info
    return node._run_request(request, Query.Response())


# ---- the model -----------------------------------------------------------------------

def test_model_preset_and_model_path_pick_the_model(predictor, tmp_path):
    import torch

    from refvlm_core.checkpoint import save_model
    from refvlm_core.errors import ConfigError
    from refvlm_ros.node import load_predictor
    from refvlm_ros.params import NodeParams

    assert predictor.model.config.name == "tiny"  # model_preset:=tiny
    with pytest.raises(ConfigError, match="unknown preset 'pico'"):
        load_predictor(NodeParams(model_preset="pico").validate())
    model = copy.deepcopy(predictor.model)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.5)  # weights no preset has
    save_model(model, tmp_path / "model")
    expected = model.projector.state_dict()
    # model_path wins over model_preset (even an unknown one)
    loaded = load_predictor(NodeParams(model_path=str(tmp_path / "model"), model_preset="pico").validate())
    state = loaded.model.projector.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_export_dir_with_the_torch_runtime_says_it_is_unused(nodes, tmp_path, capfd):
    """export_dir is for the exported runtimes (their effect: tests/ros/test_node_runtimes.py);
    with runtime:=torch configure says it is not read."""
    capfd.readouterr()
    nodes.configured("refvlm_export_default")
    assert "export_dir" not in capfd.readouterr().err
    nodes.configured("refvlm_export_unused", export_dir=str(tmp_path))
    assert f"export_dir={str(tmp_path)!r} is not read with runtime:=torch" in capfd.readouterr().err


def test_a_renamed_parameter_fails_configure_naming_its_new_name(nodes, capfd):
    """backend is now runtime: a params file or launch line with the old name is not ignored."""
    from rclpy.lifecycle import TransitionCallbackReturn

    capfd.readouterr()
    node = nodes.make("refvlm_old_name", backend="onnxruntime")
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "backend:=onnxruntime is not read: the parameter is now runtime (runtime:=onnxruntime)" in capfd.readouterr().err


def test_device_is_where_the_model_runs():
    import torch

    from refvlm_ros.node import load_predictor
    from refvlm_ros.params import NodeParams

    if torch.cuda.is_available():
        loaded = load_predictor(NodeParams(model_preset="tiny", device="cuda").validate())
        assert next(loaded.model.parameters()).device.type == "cuda"
    else:  # the model is moved to the device asked for: here there is none
        with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda"):
            load_predictor(NodeParams(model_preset="tiny", device="cuda").validate())


# ---- inputs and outputs --------------------------------------------------------------

def _subscriptions(node) -> dict[str, object]:
    return {s.topic_name: s.qos_profile for s in node.subscriptions}


def test_topic_and_qos_params_shape_the_subscriptions(nodes):
    from rclpy.qos import ReliabilityPolicy as R

    default = _subscriptions(nodes.configured("refvlm_default", activate=True))
    assert {t: (q.reliability, q.depth) for t, q in default.items()} == {
        "/image": (R.BEST_EFFORT, 1), "/camera_info": (R.BEST_EFFORT, 1), "/depth": (R.BEST_EFFORT, 4),
        "/prompt": (R.RELIABLE, 10), "/visual_prompt": (R.RELIABLE, 10)}
    custom = _subscriptions(nodes.configured(
        "refvlm_custom", activate=True, image_topic="cam/rgb", image_reliability="reliable", image_qos_depth=3,
        camera_info_topic="cam/info", camera_info_reliability="reliable", camera_info_qos_depth=2,
        depth_topic="cam/depth", depth_reliability="reliable", depth_qos_depth=7,
        prompt_topic="ask", visual_prompt_topic="point_at"))
    assert {t: (q.reliability, q.depth) for t, q in custom.items()} == {
        "/cam/rgb": (R.RELIABLE, 3), "/cam/info": (R.RELIABLE, 2), "/cam/depth": (R.RELIABLE, 7),
        "/ask": (R.RELIABLE, 10), "/point_at": (R.RELIABLE, 10)}
    no_depth = _subscriptions(nodes.configured("refvlm_no_depth", activate=True, depth_topic=""))
    assert set(no_depth) == set(default) - {"/depth"}


def test_overlay_and_diagnostics_period(nodes):
    default = nodes.configured("refvlm_outputs_default")
    other = nodes.configured("refvlm_outputs_other", publish_overlay=False, diagnostics_period_s=0.25)
    topics = lambda node: {p.topic_name for p in node.publishers}  # noqa: E731
    assert "/refvlm_outputs_default/overlay" in topics(default)
    assert "/refvlm_outputs_other/result" in topics(other) and "/refvlm_outputs_other/overlay" not in topics(other)
    assert 1_000_000_000 in [t.timer_period_ns for t in default.timers]
    assert 250_000_000 in [t.timer_period_ns for t in other.timers]
    assert 1_000_000_000 not in [t.timer_period_ns for t in other.timers]


def test_request_limits_refuse_what_they_bound(nodes, capfd):
    default = nodes.configured("refvlm_limits_default")
    strict = nodes.configured("refvlm_limits_strict", max_prompt_chars=10, max_image_pixels=2000,
                              max_aspect_ratio=1.5)
    cases = {"max_prompt_chars": ("where is the red cube?", _image(40, 40)),
             "max_image_pixels": ("cube?", _image(48, 48)),
             "max_aspect_ratio": ("cube?", _image(20, 40))}
    for parameter, (prompt, image) in cases.items():
        assert _ask(default, prompt, image).success, parameter
        reply = _ask(strict, prompt, image)
        assert not reply.success and f"parameter {parameter}" in reply.error, (parameter, reply.error)
    # above the model's own limit the parameter cannot raise it: configure says so
    model_limit = nodes.predictor.config.max_prompt_chars
    capfd.readouterr()
    wide = nodes.configured("refvlm_limits_wide", max_prompt_chars=model_limit + 1000)
    assert f"max_prompt_chars={model_limit + 1000} is above the model's limit ({model_limit}" in capfd.readouterr().err
    reply = _ask(wide, "x" * (model_limit + 1), _image(40, 40))
    assert not reply.success and "ModelConfig.max_prompt_chars" in reply.error


def test_prompt_tokens_and_request_time_are_bounded(nodes, predictor):
    """max_prompt_tokens counts the LLM's tokens, not characters (an emoji is several);
    max_request_s stops an answer still generating (here: each prediction 0.5 s late)."""
    from _node_process import ForcedAnswerPredictor

    emoji = "\U0001F999" * 100   # 100 characters, 300 tokens
    assert _ask(nodes.configured("refvlm_tokens_default"), emoji, _image()).success
    reply = _ask(nodes.configured("refvlm_tokens_strict", max_prompt_tokens=250), emoji, _image())
    assert not reply.success and "300 tokens" in reply.error and "max_prompt_tokens" in reply.error, reply.error
    slow = ForcedAnswerPredictor(predictor, ANSWER, 0.5)
    assert _ask(nodes.configured("refvlm_time_default", factory=lambda p: slow), image=_image()).success
    reply = _ask(nodes.configured("refvlm_time_strict", factory=lambda p: slow, max_request_s=0.2), image=_image())
    assert not reply.success and "max_request_s" in reply.error, reply.error
    no_limit = nodes.configured("refvlm_time_none", factory=lambda p: slow, max_request_s=0.0)
    assert _ask(no_limit, image=_image()).success


class GatedPredictor:
    """The forced-answer Predictor, each prediction waiting until ``gate`` opens."""

    def __init__(self, predictor, gate: threading.Event) -> None:
        self._predictor, self.gate, self.started = predictor, gate, threading.Event()

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def predict(self, *args, **kwargs):
        self.started.set()
        assert self.gate.wait(60)
        return self._predictor.predict(*args, **kwargs)


def test_query_queue_params(nodes, predictor):
    from _node_process import ForcedAnswerPredictor
    from refvlm_interfaces.srv import Query

    gate = threading.Event()
    gated = GatedPredictor(ForcedAnswerPredictor(predictor, ANSWER, 0.0), gate)
    node = nodes.configured("refvlm_queue", factory=lambda p: gated, max_pending_queries=2, query_queue_depth=5)
    [service] = [s for s in node.services if s.srv_name == "~/query"]
    assert service.qos_profile.depth == 5
    default = nodes.make("refvlm_queue_default")
    [default_service] = [s for s in default.services if s.srv_name == "~/query"]
    assert default_service.qos_profile.depth == 100
    try:
        request = lambda: Query.Request(prompt="where is the red cube?", use_image=True, image=_image())  # noqa: E731
        node._queries.submit(request(), Query.Response())        # the service callback: in the worker
        assert gated.started.wait(30)
        waiting = node._queries.submit(request(), Query.Response())
        busy = node._queries.submit(request(), Query.Response())  # a third while two are pending
        assert waiting.error == "" and not busy.success and "max_pending_queries=2" in busy.error
    finally:
        gate.set()


def test_depth_scale_and_min_pixels_shape_the_3d_answer(nodes):
    from sensor_msgs.msg import CameraInfo

    from refvlm_ros.image_conversions import array_to_image

    image = _image(40, 60)
    depth = array_to_image(np.full((40, 60), 1500, np.uint16), "16UC1")
    info = CameraInfo(height=40, width=60, k=[50.0, 0.0, 29.5, 0.0, 50.0, 19.5, 0.0, 0.0, 1.0])
    objects = {}
    for name, params in {"default": {}, "scaled": {"depth_scale": 0.01},
                         "strict": {"localization_min_pixels": 100_000}}.items():
        reply = _ask(nodes.configured(f"refvlm_3d_{name}", **params), image=image, depth=depth, info=info)
        assert reply.success, reply.error
        [objects[name]] = reply.result.objects
    assert objects["default"].has_position, objects["default"].position_status
    assert objects["default"].position.z == pytest.approx(1.5, abs=1e-3)
    assert objects["scaled"].has_position and objects["scaled"].position.z == pytest.approx(15.0, abs=1e-2)
    assert not objects["strict"].has_position and objects["strict"].position_status


def test_max_depth_m_makes_far_readings_unknown(nodes):
    """A 16UC1 depth of 65535 (a sensor's 'no return') is 65.5 m: no position under the
    default max_depth_m, with the reason; a position when the limit allows it."""
    from sensor_msgs.msg import CameraInfo

    from refvlm_ros.image_conversions import array_to_image

    depth = array_to_image(np.full((40, 60), 65535, np.uint16), "16UC1")
    info = CameraInfo(height=40, width=60, k=[50.0, 0.0, 29.5, 0.0, 50.0, 19.5, 0.0, 0.0, 1.0])
    reply = _ask(nodes.configured("refvlm_far_default"), image=_image(40, 60), depth=depth, info=info)
    [obj] = reply.result.objects
    assert not obj.has_position and "beyond max_depth_m=20 m" in obj.position_status, obj.position_status
    reply = _ask(nodes.configured("refvlm_far_wide", max_depth_m=100.0), image=_image(40, 60), depth=depth, info=info)
    [obj] = reply.result.objects
    assert obj.has_position and obj.position.z == pytest.approx(65.535, abs=1e-3)


def test_image_backend_picks_the_conversion(nodes):
    from refvlm_ros.image_conversions import cv_bridge_instance

    if cv_bridge_instance() is not None:
        pytest.skip("a working cv_bridge converts like numpy: the backends differ only where it is missing")
    image = _image()
    assert _ask(nodes.configured("refvlm_numpy", image_backend="numpy"), image=image).success
    assert _ask(nodes.configured("refvlm_auto", image_backend="auto"), image=image).success
    reply = _ask(nodes.configured("refvlm_cv_bridge", image_backend="cv_bridge"), image=image)
    assert not reply.success and "no working cv_bridge" in reply.error


# ---- over DDS ------------------------------------------------------------------------

class Camera:
    """A node in this process publishing image, depth and CameraInfo with chosen stamps
    (depth ``depth_offset_s`` after the image), and collecting the node's results."""

    def __init__(self, context, node_name: str, depth_offset_s: float) -> None:
        import rclpy
        from rclpy.qos import qos_profile_sensor_data
        from refvlm_interfaces.msg import RefResult
        from sensor_msgs.msg import CameraInfo, Image

        from refvlm_ros.image_conversions import array_to_image

        self.node = rclpy.create_node(f"{node_name}_camera", context=context)
        self.pubs = [self.node.create_publisher(kind, topic, qos_profile_sensor_data)
                     for kind, topic in ((Image, "/image"), (Image, "/depth"), (CameraInfo, "/camera_info"))]
        self.image = _image(40, 60)
        self.depth = array_to_image(np.full((40, 60), 2.0, np.float32), "32FC1")
        self.info = CameraInfo(height=40, width=60, k=[50.0, 0.0, 29.5, 0.0, 50.0, 19.5, 0.0, 0.0, 1.0])
        self.offset, self.frames, self.results = depth_offset_s, 0, []
        self.node.create_subscription(RefResult, f"/{node_name}/result", self.results.append, 10)
        self.node.create_timer(0.1, self.publish)

    def publish(self) -> None:
        """CameraInfo and depth first, images from the 5th tick on: the node has the
        intrinsics by the time its first frame comes."""
        self.ticks = getattr(self, "ticks", 0) + 1
        stamp = 10.0 * self.ticks   # far apart: only the frame's own depth can pair with it
        for msg, at in ((self.image, stamp), (self.depth, stamp + self.offset), (self.info, stamp)):
            msg.header.stamp.sec, msg.header.stamp.nanosec = int(at), int(round(at % 1 * 1e9))
        self.pubs[2].publish(self.info)
        self.pubs[1].publish(self.depth)
        if self.ticks >= 5:
            self.pubs[0].publish(self.image)
            self.frames += 1


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_standing_prompt_rate_and_depth_pairing_over_dds(nodes):
    """A standing prompt answers frames with no prompt message; rate_hz bounds how often
    (one answer while 20 frames pass at 0.01 Hz, several at 20 Hz); depth 0.3 s after its
    image pairs under sync_tolerance_s 0.5, not under the default 0.1."""
    from rclpy.executors import MultiThreadedExecutor

    prompt = "where is the red cube?"
    runs = {}
    for name, params in {"slow": {"rate_hz": 0.01, "sync_tolerance_s": 0.5}, "fast": {"rate_hz": 20.0}}.items():
        node = nodes.configured(f"refvlm_standing_{name}", activate=True, standing_prompt=prompt, **params)
        camera = Camera(nodes.context, f"refvlm_standing_{name}", depth_offset_s=0.3)
        executor = MultiThreadedExecutor(num_threads=3, context=nodes.context)
        executor.add_node(node)
        executor.add_node(camera.node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        try:
            if name == "slow":
                _wait_for(lambda: camera.results, 60, "the first standing answer")
                seen = camera.frames
                _wait_for(lambda: camera.frames >= seen + 20, 60, "20 more frames")
            else:
                _wait_for(lambda: len(camera.results) >= 3, 60, "three standing answers")
            runs[name] = list(camera.results)
        finally:
            node.trigger_deactivate()
            executor.shutdown()
            camera.node.destroy_node()
            spinner.join(timeout=10)
    slow, fast = runs["slow"], runs["fast"]
    assert len(slow) == 1 and len(fast) >= 3
    assert all(r.prompt == prompt and len(r.objects) == 1 for r in slow + fast)
    assert slow[0].objects[0].has_position, slow[0].objects[0].position_status
    assert slow[0].objects[0].position.z == pytest.approx(2.0, abs=1e-3)
    assert not fast[0].objects[0].has_position and "depth" in fast[0].objects[0].position_status
