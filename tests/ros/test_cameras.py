"""Several cameras on one model (parameter `cameras`): one node subscribes to every
camera under its namespace, answers each on its own outputs with its own headers, takes
the cameras' new frames in turn under a standing prompt, and answers a Query about the
camera it names. Real node and tiny-preset Predictor (answer text forced, each
prediction 0.2 s, slower than the cameras) in this process, cameras published over DDS."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

ANSWER = "<Phrase>red cube</Phrase> (<Unit>box</Unit>[0]<REF>)"
CAMERAS = ("front", "left", "right")
TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def graph():
    """An executor thread; a camera node publishing the three cameras' images at 10 Hz; the
    perception node with cameras:=front,left,right and a standing prompt."""
    import rclpy
    import torch
    from _node_process import ForcedAnswerPredictor
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from refvlm_interfaces.msg import RefResult
    from refvlm_ros.image_conversions import array_to_image
    from refvlm_ros.node import RefVLMNode, load_predictor
    from refvlm_ros.params import NodeParams

    torch.set_num_threads(1)
    forced = ForcedAnswerPredictor(load_predictor(NodeParams(model_preset="tiny").validate()), ANSWER, 0.2)
    context = rclpy.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    cameras = rclpy.create_node("test_cameras", context=context)
    publishers = {name: cameras.create_publisher(Image, f"/{name}/image", qos_profile_sensor_data) for name in CAMERAS}
    rgb = np.zeros((48, 64, 3), np.uint8)

    def publish():
        for name, pub in publishers.items():
            image = array_to_image(rgb, "rgb8")
            image.header.frame_id, image.header.stamp = f"{name}_optical", cameras.get_clock().now().to_msg()
            pub.publish(image)

    cameras.create_timer(0.1, publish)
    results = {name: [] for name in CAMERAS}
    for name in CAMERAS:
        cameras.create_subscription(RefResult, f"/refvlm_cameras/{name}/result",
                                    lambda msg, name=name: results[name].append(msg), 50)
    node = RefVLMNode("refvlm_cameras", predictor_factory=lambda p: forced, context=context,
                      parameter_overrides=[Parameter("cameras", value=",".join(CAMERAS)),
                                           Parameter("rate_hz", value=50.0)])
    for made in (cameras, node):
        executor.add_node(made)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    yield node, results
    executor.remove_node(node)
    node.shutdown_cleanly()
    executor.shutdown()
    cameras.destroy_node()
    context.try_shutdown()
    thread.join(timeout=10)


def _wait_for(condition, what):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_one_node_subscribes_and_publishes_per_camera(graph):
    node, _ = graph
    topics = {s.topic_name for s in node.subscriptions}
    assert {f"/{name}/{t}" for name in CAMERAS for t in ("image", "camera_info", "depth")} <= topics
    assert "/image" not in topics
    published = {p.topic_name for p in node.publishers}
    assert {f"/refvlm_cameras/{name}/{t}" for name in CAMERAS for t in ("result", "masks", "overlay")} <= published


def test_queries_name_their_camera(graph):
    from refvlm_interfaces.srv import Query

    from refvlm_ros.params import NodeParams

    node, _ = graph
    _wait_for(lambda: all(s.frames.latest() is not None for s in node._cameras.streams), "a frame of each camera")
    for name in CAMERAS:
        reply = node._run_request(Query.Request(prompt="where is the red cube?", camera=name), Query.Response())
        assert reply.success, reply.error
        assert reply.result.header.frame_id == f"{name}_optical"
    first = node._run_request(Query.Request(prompt="where is the red cube?"), Query.Response())
    assert first.result.header.frame_id == "front_optical"  # empty: the first camera
    reply = node._run_request(Query.Request(prompt="where is the red cube?", camera="rear"), Query.Response())
    assert not reply.success and "'rear'" in reply.error and "front" in reply.error
    with pytest.raises(Exception, match="twice"):
        NodeParams(model_preset="tiny", cameras="front,front").validate()


def test_the_standing_prompt_takes_the_cameras_in_turn(graph):
    """All three cameras always have a new frame (10 Hz each, 0.2 s per answer): turns go
    round, so no camera gets more than one answer ahead of another."""
    from std_msgs.msg import String

    node, results = graph
    node._on_prompt(String(data="where is the red cube?"))
    try:
        _wait_for(lambda: sum(len(r) for r in results.values()) >= 15, "15 standing-prompt answers")
    finally:
        node._on_prompt(String(data=""))
    counts = {name: len(r) for name, r in results.items()}
    assert max(counts.values()) - min(counts.values()) <= 2, counts  # 1, plus one in flight
    for name, received in results.items():
        assert {m.header.frame_id for m in received} == {f"{name}_optical"}  # its own header
        assert all(m.objects[0].track_id >= 1 for m in received)
