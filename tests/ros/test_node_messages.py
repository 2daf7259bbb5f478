"""Result <-> message conversions and node parameters, without DDS: what every field of
the node's outputs is made of."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from refvlm_core.errors import ConfigError, InputError
from refvlm_core.results import ReferredObject, Result

pytestmark = pytest.mark.ros
H, W = 60, 80


@pytest.fixture
def result():
    mask = np.zeros((H, W), bool)
    mask[20:40, 30:50] = True
    depth = np.full((H, W), 3.0, np.float32)
    keypoints = np.stack([np.arange(17), np.arange(17) + 1, np.linspace(0, 1, 17)], 1).astype(np.float32)
    return Result(
        prompt="find the box", answer="box", trp_text="<Phrase>box</Phrase> (<Unit>box, mask</Unit>[0]<REF>)",
        image_size=(H, W), timings={"encode": 0.1, "decode": 0.2}, errors=["e1"],
        objects=[
            ReferredObject("box", ("box", "mask"), 0, 0, (44, 49), 0.8,
                           box_xyxy=np.array([30, 20, 50, 40], np.float32), mask=mask),
            ReferredObject("person", ("keypoint",), 0, 1, (60, 65), None, keypoints=keypoints),
            ReferredObject("scene", ("depth",), 0, 2, (70, 75), 0.5, depth=depth),
        ])


@pytest.fixture
def header():
    from std_msgs.msg import Header
    h = Header(frame_id="cam")
    h.stamp.sec, h.stamp.nanosec = 7, 9
    return h


def test_result_to_msg_fields_and_3d(result, header):
    from refvlm_ros.localization import Intrinsics, box_region
    from refvlm_ros.messages import DepthContext, result_to_msg
    sensor = np.full((H, W), 1.25, np.float32)
    context = DepthContext(sensor, Intrinsics(fx=50.0, fy=50.0, cx=39.5, cy=29.5))
    msg = result_to_msg(result, header, context)
    assert msg.header == header and (msg.image_height, msg.image_width) == (H, W)
    assert list(msg.stage_names) == ["encode", "decode"] and list(msg.errors) == ["e1"]
    box, person, scene = msg.objects
    assert box.has_box and list(box.box_xyxy) == [30, 20, 50, 40] and box.score == pytest.approx(0.8)
    mask = np.frombuffer(box.mask.data, np.uint8).reshape(H, W)
    assert box.mask.header == header and set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 400
    # Mask centre (39.5, 29.5) is on the optical axis; 20 px at f=50, 1.25 m -> 0.5 m wide.
    assert box.has_position and (box.position.x, box.position.y, box.position.z) == pytest.approx((0, 0, 1.25))
    assert box.extent.x == pytest.approx(0.5, abs=0.03) and box.position_pixels == 400
    assert box.has_depth and box.depth_median == pytest.approx(1.25)
    result.objects[0].mask[:] = False  # an empty mask locates nothing: the box's centre does
    boxed = result_to_msg(result, header, context).objects[0]
    assert boxed.has_position and boxed.position_pixels == box_region(np.asarray([30, 20, 50, 40]), (H, W)).sum() == 100
    assert len(person.keypoint_names) == 17 and person.keypoint_names[0] == "nose"
    assert list(person.keypoint_x)[:3] == [0, 1, 2] and math.isnan(person.score)
    # keypoints alone: the centre half of the seen joints' box (visibility >= 0.5: 8 x 8 px, fewer
    # than localization_min_pixels; twice as far apart, x 16..32, y 18..34, 64 px)
    assert not person.has_position and "need 20" in person.position_status
    result.objects[1].keypoints[:, :2] *= 2
    person = result_to_msg(result, header, context).objects[1]
    assert person.has_position and person.position.z == pytest.approx(1.25)
    assert (person.position.x, person.position.y) == pytest.approx(((24 - 39.5) / 40, (26 - 29.5) / 40), abs=0.03)
    result.objects[1].keypoints[:, 2] = 0.1  # none seen: no position, and why
    unseen = result_to_msg(result, header, context).objects[1]
    assert not unseen.has_position
    assert unseen.position_status == "the object has no mask, no box and fewer than 2 keypoints seen"
    assert scene.has_depth and scene.depth_median == pytest.approx(3.0)  # the model's depth


def test_images_and_detections(result, header):
    from refvlm_ros.messages import (detections_2d, detections_3d, instance_mask, predicted_depth,
                                     result_to_msg, vision_msgs_available)
    ids = instance_mask(result)
    assert ids.dtype == np.uint8 and set(np.unique(ids)) == {0, 1} and ids[30, 40] == 1
    assert predicted_depth(result)[0, 0] == 3.0
    if not vision_msgs_available():
        pytest.skip("vision_msgs not built")
    msg = result_to_msg(result, header)
    det2d = detections_2d(msg)
    [det] = det2d.detections
    assert det2d.header == header and det.results[0].hypothesis.class_id == "box"
    assert (det.bbox.center.position.x, det.bbox.center.position.y, det.bbox.size_x) == (40, 30, 20)
    assert detections_3d(msg).detections == []   # no depth context -> no 3D


def test_visual_prompts_from_messages():
    from geometry_msgs.msg import Point32
    from refvlm_interfaces.msg import VisualPrompt
    from refvlm_ros.image_conversions import array_to_image
    from refvlm_ros.messages import visual_prompt_from_msg
    box = visual_prompt_from_msg(VisualPrompt(kind="box", points=[Point32(x=9.0, y=8.0), Point32(x=1.0, y=2.0)]))
    assert box.kind == "box" and box.points.tolist() == [[1, 2], [9, 8]]
    point = visual_prompt_from_msg(VisualPrompt(kind="point", points=[Point32(x=3.0, y=4.0)]))
    assert point.points.tolist() == [[3, 4]]
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 2] = 255
    from_mask = visual_prompt_from_msg(VisualPrompt(kind="mask", mask=array_to_image(mask, "mono8")))
    assert from_mask.mask.dtype == bool and from_mask.mask.sum() == 1
    with pytest.raises(InputError, match="unknown visual prompt kind 'lasso'"):
        visual_prompt_from_msg(VisualPrompt(kind="lasso"))
    with pytest.raises(InputError, match="box prompt needs 2 corner points, got 1"):
        visual_prompt_from_msg(VisualPrompt(kind="box", points=[Point32()]))


def test_params_validation():
    from refvlm_ros.params import NodeParams
    NodeParams().validate()
    for change, message in [({"rate_hz": 0.0}, "rate_hz"), ({"runtime": "tflite"}, "runtime"),
                            ({"image_topic": ""}, "image_topic"), ({"depth_scale": -1.0}, "depth_scale"),
                            ({"model_preset": "", "model_path": ""}, "model_preset"),
                            ({"max_prompt_chars": -1}, "max_prompt_chars")]:
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(NodeParams(), **change).validate()


def test_readme_lists_every_parameter():
    from refvlm_ros.params import markdown_table
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the README's 'Node parameters' table with params.markdown_table()"


def test_exported_runtime_without_an_export_names_the_command_that_builds_it():
    from refvlm_ros.node import load_predictor
    from refvlm_ros.params import NodeParams
    with pytest.raises(ConfigError, match="refvlm export onnx --model tiny --out DIR"):
        load_predictor(NodeParams(model_preset="tiny", runtime="onnxruntime").validate())
