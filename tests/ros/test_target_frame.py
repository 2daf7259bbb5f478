"""3D answers in target_frame through real tf2 (Buffer + TransformListener on the node,
broadcasters in another node, over DDS), and track IDs on the node's answers.

Nodes run in this process on one tiny-preset Predictor whose answer text is forced (as in
``_node_process.py``): the real decoders give a box and a mask, and a flat depth image
gives every object a camera-frame position to move.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

ANSWER = "<Phrase>red cube</Phrase> (<Unit>box, mask</Unit>[0]<REF>)"
CAMERA = "test_camera_optical"
OLD_CAMERA = "old_camera_optical"  # (a frame has one parent in tf2: another camera for odom)
# base_link-from-camera: the optical frame looks along base x (z forward -> x, x right -> -y,
# y down -> -z), 0.5 m ahead of and 1.2 m above the base, yawed by 30 degrees.
YAW = np.deg2rad(30.0)
BASE_FROM_CAMERA = np.eye(4)
BASE_FROM_CAMERA[:3, :3] = np.array([[np.cos(YAW), -np.sin(YAW), 0], [np.sin(YAW), np.cos(YAW), 0], [0, 0, 1]]) @ \
    np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
BASE_FROM_CAMERA[:3, 3] = [0.5, 0.0, 1.2]
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def predictor():
    import torch

    from refvlm_ros.node import load_predictor
    from refvlm_ros.params import NodeParams

    torch.set_num_threads(1)
    return load_predictor(NodeParams(model_preset="tiny").validate())


@pytest.fixture(scope="module")
def ros(predictor):
    """A context, an executor spinning in a thread, a broadcaster node publishing
    base_link -> CAMERA (static) and odom -> OLD_CAMERA (one pose, at an old stamp)."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from tf2_ros import StaticTransformBroadcaster, TransformBroadcaster

    from refvlm_ros.transforms import transform_msg

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    broadcaster = rclpy.create_node("test_tf_broadcaster", context=context)
    executor.add_node(broadcaster)
    StaticTransformBroadcaster(broadcaster).sendTransform(
        transform_msg("base_link", CAMERA, broadcaster.get_clock().now().to_msg(), BASE_FROM_CAMERA))
    dynamic = TransformBroadcaster(broadcaster)
    old = transform_msg("odom", OLD_CAMERA, broadcaster.get_clock().now().to_msg(), np.eye(4))
    old.header.stamp.sec = 1000  # one pose, long ago: later images are too new for it
    timer = broadcaster.create_timer(0.2, lambda: dynamic.sendTransform(old))
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    made = []

    def node(name: str, **params):
        from _node_process import ForcedAnswerPredictor
        from rclpy.lifecycle import TransitionCallbackReturn
        from rclpy.parameter import Parameter
        from refvlm_ros.node import RefVLMNode

        forced = ForcedAnswerPredictor(predictor, ANSWER, 0.0)
        made_node = RefVLMNode(name, predictor_factory=lambda p: forced, context=context,
                               parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        made.append(made_node)
        executor.add_node(made_node)
        assert made_node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        return made_node

    yield node
    for made_node in made:
        executor.remove_node(made_node)
        made_node.shutdown_cleanly()
    broadcaster.destroy_timer(timer)
    executor.shutdown()
    broadcaster.destroy_node()
    context.try_shutdown()
    thread.join(timeout=10)


def _request(stamp_sec: int = 0, frame_id: str = CAMERA):
    """A Query with its own 64x48 image, flat 2 m depth and intrinsics."""
    from sensor_msgs.msg import CameraInfo

    from refvlm_interfaces.srv import Query
    from refvlm_ros.image_conversions import array_to_image

    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[10:30, 12:40] = (220, 30, 30)
    request = Query.Request(prompt="where is the red cube?", use_image=True)
    request.image = array_to_image(rgb, "rgb8")
    request.depth = array_to_image(np.full((48, 64), 2.0, np.float32), "32FC1")
    request.camera_info = CameraInfo(height=48, width=64, k=[60.0, 0.0, 31.5, 0.0, 60.0, 23.5, 0.0, 0.0, 1.0])
    for message in (request.image, request.depth, request.camera_info):
        message.header.frame_id = frame_id
        message.header.stamp.sec = stamp_sec
    return request


def _ask(node, request):
    from refvlm_interfaces.srv import Query

    return node._run_request(request, Query.Response())


def _position(obj) -> np.ndarray:
    return np.array([obj.position.x, obj.position.y, obj.position.z])


def test_positions_move_into_target_frame_as_tf2_says(ros):
    from rclpy.time import Time

    from refvlm_ros.messages import detections_3d, vision_msgs_available

    camera_node = ros("refvlm_tf_camera")
    base_node = ros("refvlm_tf_base", target_frame="base_link", transform_timeout_s=5.0)
    now = camera_node.get_clock().now().to_msg().sec
    in_camera = _ask(camera_node, _request(now))
    in_base = _ask(base_node, _request(now))
    assert in_camera.success and in_base.success, (in_camera.error, in_base.error)
    [cam], [base] = in_camera.result.objects, in_base.result.objects
    assert cam.has_position and base.has_position, (cam.position_status, base.position_status)
    assert in_camera.result.position_frame == CAMERA and in_base.result.position_frame == "base_link"
    assert cam.position.z == pytest.approx(2.0, abs=1e-3)  # the flat depth
    expected = BASE_FROM_CAMERA[:3, :3] @ _position(cam) + BASE_FROM_CAMERA[:3, 3]
    np.testing.assert_allclose(_position(base), expected, atol=1e-6)
    # ...which is what the node's own tf2 buffer gives for that point
    transform = base_node._target.buffer.lookup_transform("base_link", CAMERA, Time()).transform
    from refvlm_ros.transforms import quaternion_matrix
    t = transform.translation
    np.testing.assert_allclose(quaternion_matrix(transform.rotation) @ _position(cam) + [t.x, t.y, t.z],
                               _position(base), atol=1e-6)
    assert in_base.result.header.frame_id == CAMERA  # the image's header stays the image's
    if vision_msgs_available():
        [det] = detections_3d(in_base.result).detections
        assert det.header.frame_id == "base_link"
        np.testing.assert_allclose([det.bbox.center.position.x, det.bbox.center.position.y,
                                    det.bbox.center.position.z], expected, atol=1e-6)
        q = det.bbox.center.orientation  # the box is oriented as the camera in base_link
        np.testing.assert_allclose(quaternion_matrix(q), BASE_FROM_CAMERA[:3, :3], atol=1e-6)


def test_missing_or_too_old_transforms_answer_without_positions_and_say_so(ros):
    from diagnostic_msgs.msg import DiagnosticStatus

    missing = ros("refvlm_tf_missing", target_frame="no_such_frame", transform_timeout_s=0.3)
    now = missing.get_clock().now().to_msg().sec
    start = time.monotonic()
    reply = _ask(missing, _request(now))
    took = time.monotonic() - start
    assert reply.success and reply.result.answer, reply.error  # the answer still comes
    [obj] = reply.result.objects
    assert not obj.has_position and _position(obj).tolist() == [0.0, 0.0, 0.0]  # no camera-frame value
    assert f"'{CAMERA}'" in obj.position_status and "'no_such_frame'" in obj.position_status
    assert obj.has_box and reply.result.position_frame == "no_such_frame"
    assert 0.3 <= took < 0.3 + 30.0  # the lookup waits its timeout, not forever (margin: a busy machine)
    patient = ros("refvlm_tf_patient", target_frame="no_such_frame", transform_timeout_s=1.5)
    start = time.monotonic()
    assert not _ask(patient, _request(now)).result.objects[0].has_position
    assert time.monotonic() - start >= 1.5  # transform_timeout_s is how long it waits

    too_old = ros("refvlm_tf_too_old", target_frame="odom", transform_timeout_s=0.3)
    [old] = _ask(too_old, _request(now, OLD_CAMERA)).result.objects  # its only pose is at t=1000
    assert not old.has_position and "'odom'" in old.position_status
    assert "xtrapolation" in old.position_status  # tf2: the image is newer than the pose

    unnamed = _ask(ros("refvlm_tf_unnamed", target_frame="base_link"), _request(now, frame_id=""))
    [obj] = unnamed.result.objects
    assert not obj.has_position and "no frame_id" in obj.position_status

    seen = {}
    published = threading.Event()

    def on_diagnostics(msg):
        for status in msg.status:
            if status.hardware_id == "refvlm_tf_missing":
                seen.update(level=status.level, message=status.message,
                            values={kv.key: kv.value for kv in status.values})
                published.set()

    from diagnostic_msgs.msg import DiagnosticArray
    listener = missing  # any node of the executor can subscribe
    subscription = listener.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    try:
        assert published.wait(TIMEOUT_S), "no /diagnostics from the node"
    finally:
        listener.destroy_subscription(subscription)
    assert seen["level"] == DiagnosticStatus.WARN and "no_such_frame" in seen["message"]
    assert seen["values"]["target_frame"] == "no_such_frame"
    assert int(seen["values"]["transform_failures"]) >= 1


def test_track_ids_follow_camera_frames_not_request_images(ros):
    """Answers about camera frames get track IDs (the same object, the same ID); an image
    sent with a request is no frame of a stream: ID 0. track_max_age_s:=0 turns it off."""
    from refvlm_ros.messages import detections_2d, vision_msgs_available

    node = ros("refvlm_tracks", track_max_age_s=5.0)
    off = ros("refvlm_tracks_off", track_max_age_s=0.0)
    frame = _request(100).image

    def ask(asked, prompt="where is the red cube?"):  # as the worker answers a camera's frame
        return asked.answer(frame, prompt, [], lambda: None, camera=asked._cameras.get(""))[1]

    ids = [ask(node).objects[0].track_id for _ in range(3)]
    assert ids[0] >= 1 and ids == [ids[0]] * 3
    frame.header.stamp.sec = 110  # past track_max_age_s: the track has ended, a new one starts
    [later] = ask(node).objects
    assert later.track_id == ids[0] + 1
    [other] = ask(node, "where is the blue ball?").objects
    assert other.track_id == later.track_id  # the forced answer's phrase is the same object's
    assert _ask(node, _request(110)).result.objects[0].track_id == 0
    [untracked] = ask(off).objects
    assert untracked.track_id == 0
    if vision_msgs_available():
        result = ask(node)
        assert [d.id for d in detections_2d(result).detections] == [str(later.track_id)]
