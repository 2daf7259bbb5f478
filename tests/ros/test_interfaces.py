"""The interface package as built by ros_ws/build.sh: it imports with nothing sourced,
carries the fields the node and its clients rely on, serialises, and a second build
is a fast no-op."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ros
REPO = Path(__file__).resolve().parents[2]


def test_messages_have_the_documented_fields():
    from refvlm_interfaces.msg import ReferredObject, RefResult, VisualPrompt
    obj = ReferredObject()
    for name in ("phrase", "units", "instance_index", "ref_ordinal", "ref_span_start", "ref_span_end",
                 "score", "has_box", "box_xyxy", "mask", "keypoint_names", "keypoint_x", "keypoint_y",
                 "keypoint_visibility", "has_depth", "depth_median", "depth_min", "depth_max",
                 "has_position", "position", "extent", "position_pixels", "position_status"):
        assert hasattr(obj, name), name
    assert obj.box_xyxy.shape == (4,) and obj.box_xyxy.dtype == np.float64
    result = RefResult()
    for name in ("header", "prompt", "answer", "trp_text", "image_height", "image_width", "objects",
                 "stage_names", "stage_seconds", "errors"):
        assert hasattr(result, name), name
    assert (VisualPrompt.KIND_POINT, VisualPrompt.KIND_BOX, VisualPrompt.KIND_SCRIBBLE,
            VisualPrompt.KIND_MASK) == ("point", "box", "scribble", "mask")


def test_service_and_action_types():
    from refvlm_interfaces.action import Ground
    from refvlm_interfaces.srv import Query
    request, response = Query.Request(), Query.Response()
    assert {"prompt", "visual_prompts", "use_image", "image"} <= set(request.get_fields_and_field_types())
    assert {"success", "error", "result"} <= set(response.get_fields_and_field_types())
    assert set(Ground.Goal.get_fields_and_field_types()) == {"prompt", "visual_prompts", "camera"}
    assert set(Ground.Result.get_fields_and_field_types()) == {"success", "error", "result"}
    assert set(Ground.Feedback.get_fields_and_field_types()) == {"stage", "partial_answer"}


def test_nested_result_round_trips_through_serialisation():
    from geometry_msgs.msg import Point
    from rclpy.serialization import deserialize_message, serialize_message
    from refvlm_interfaces.msg import ReferredObject, RefResult
    obj = ReferredObject(phrase="mug", units=["box", "mask"], has_box=True,
                         box_xyxy=np.array([1.0, 2.0, 30.0, 40.0]), keypoint_x=[1.5, 2.5],
                         has_position=True, position=Point(x=0.1, y=-0.2, z=1.5))
    msg = RefResult(prompt="where is the mug?", trp_text="<Phrase>mug</Phrase>", objects=[obj],
                    stage_names=["encode"], stage_seconds=[0.01], errors=["none"])
    msg.header.frame_id = "camera"
    back = deserialize_message(serialize_message(msg), RefResult)
    assert back == msg and back.objects[0].position.z == 1.5


def test_second_build_is_a_fast_no_op():
    start = time.perf_counter()
    run = subprocess.run(["bash", str(REPO / "ros_ws" / "build.sh")], capture_output=True, text=True,
                         timeout=600)
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert "refvlm_interfaces is up to date" in run.stdout or "built refvlm_interfaces" in run.stdout
    if "up to date" in run.stdout:
        assert elapsed < 10.0, f"an up-to-date build took {elapsed:.1f} s"
    cmake_files = (REPO / ".venv" / "share").rglob("*.cmake")
    assert not any("/opt/python/cp311-cp311" in p.read_text(errors="ignore") for p in cmake_files)
