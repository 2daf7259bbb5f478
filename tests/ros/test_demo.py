"""`refvlm demo`: the pieces (scene choice, ground-truth table, overlays, model choice)
and a short end-to-end run over real DDS with the tiny preset."""
from __future__ import annotations

import json

import numpy as np
import pytest



def test_demo_without_ros_says_what_to_do():
    """Where rclpy is missing, `refvlm demo` explains instead of failing with a traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['rclpy'] = None; from refvlm_cli.main import main; "
            "sys.exit(main(['demo']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "make setup" in done.stderr and "Traceback" not in done.stderr


pytestmark = pytest.mark.ros
demo = pytest.importorskip("refvlm_ros.demo")


def referred(phrase: str, position=None, box=None, mask: np.ndarray | None = None, keypoints=None):
    from geometry_msgs.msg import Point
    from refvlm_interfaces.msg import ReferredObject

    from refvlm_ros.image_conversions import array_to_image

    obj = ReferredObject(phrase=phrase, units=["box"])
    if position is not None:
        obj.has_position, obj.position = True, Point(x=position[0], y=position[1], z=position[2])
    else:
        obj.position_status = "no depth"
    if box is not None:
        obj.has_box, obj.box_xyxy = True, [float(v) for v in box]
    if mask is not None:
        obj.mask = array_to_image(mask.astype(np.uint8) * 255, "mono8")
    if keypoints is not None:
        obj.keypoint_x, obj.keypoint_y = [float(k[0]) for k in keypoints], [float(k[1]) for k in keypoints]
        obj.keypoint_visibility = [float(k[2]) for k in keypoints]
    return obj


def test_the_chosen_scene_shows_every_target():
    from refvlm_ros.sim_scenes import SimScenes

    index = demo.pick_layout("test", {"red cube", "person"}, 160, 120)
    scenes = SimScenes("test", index, 160, 120)
    truth = scenes.render(scenes.base_camera)[3]
    for target in ("red cube", "person"):
        found = demo.find_truth(truth, target)
        assert found is not None and found["visible_pixels"] >= 0.002 * 160 * 120
    assert demo.find_truth(truth, "golden teapot") is None


def test_table_puts_answers_next_to_ground_truth():
    from refvlm_interfaces.msg import RefResult

    truth = {"name": "red cube", demo.TRUTH_KEY: [0.1, 0.2, 2.0], "box_xyxy": [1, 2, 3, 4]}
    result = RefResult(answer="there", objects=[referred("red cube", (0.1, 0.2, 2.5)),
                                                referred("cube")])
    rows = [demo.DemoRow("Locate the red cube.", True, result.answer, truth=truth,
                         objects=demo.object_rows(result, truth)),
            demo.DemoRow("Segment the person.", False, "", error="no camera frame yet")]
    assert rows[0].objects[0]["error_m"] == pytest.approx(0.5)
    assert rows[0].objects[1]["position"] is None
    table = demo.format_table(rows)
    assert "(+0.10, +0.20, 2.50)" in table and "(+0.10, +0.20, 2.00)" in table
    assert "0.50 m" in table and "error: no camera frame yet" in table
    assert "OFF by more than 0.15 m" in table and "found 0 of 2 asked objects" in table
    rows[0].objects = demo.object_rows(RefResult(objects=[referred("red cube", (0.1, 0.2, 2.1))]), truth)
    assert "ok" in demo.format_table(rows).split("\n")[2] and "found 1 of 2" in demo.format_table(rows)


def test_overlay_draws_mask_box_and_keypoints():
    from refvlm_interfaces.msg import RefResult

    rgb = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:20, 10:20] = True
    result = RefResult(answer="a cube", objects=[
        referred("cube", box=(30, 30, 50, 50), mask=mask,
                 keypoints=[(70, 5, 1.0)] + [(0, 0, 0.0)] * 16)])  # COCO-17, the nose seen
    picture = demo.draw_overlay(rgb, result, {"box_xyxy": [2, 2, 8, 8]})
    assert picture.shape == rgb.shape and picture.dtype == np.uint8
    assert not np.array_equal(picture[15, 15], rgb[15, 15])   # mask tint
    assert not np.array_equal(picture[30, 40], rgb[30, 40])   # box edge
    assert not np.array_equal(picture[5, 70], rgb[5, 70])     # keypoint
    assert tuple(picture[2, 5]) == (255, 255, 255)            # ground-truth box
    assert np.array_equal(picture[25, 25], rgb[25, 25])       # untouched elsewhere


def test_default_model_is_the_trained_one_when_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("REFVLM_MODEL_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(demo, "TRAINED_MODEL_DIRS", ())
    fallback = demo.default_model()
    assert not fallback.trained and fallback.parameters["model_preset"] == "tiny"
    assert "UNTRAINED" in fallback.description
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("REFVLM_MODEL_DIR", str(tmp_path / "model"))
    chosen = demo.default_model()
    assert chosen.trained and chosen.parameters == {"model_path": str((tmp_path / "model").resolve())}


def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("refvlm_ros.node")
    lines: list[str] = []
    config = demo.DemoConfig(out_dir=tmp_path, width=160, height=120, timeout_s=100.0,
                             questions=demo.DEFAULT_QUESTIONS[:2],
                             model=demo.ModelChoice({"model_preset": "tiny"}, "tiny", False))
    rows = demo.run_demo(config, log=lines.append)
    assert [row.question for row in rows] == [q.prompt for q in demo.DEFAULT_QUESTIONS[:2]]
    for row in rows:
        assert row.success, row.error
        assert row.truth is not None and row.truth["surface_median_camera"][2] > 0
        assert row.truth[demo.TRUTH_KEY] is not None  # the truth in base_link, through the sim's /tf
        assert (tmp_path / row.overlay.split("/")[-1]).is_file()
    saved = json.loads((tmp_path / "answers.json").read_text())
    assert len(saved["rows"]) == 2 and saved["trained"] is False
    output = "\n".join(lines)
    assert "Locate the red cube." in output and "truth xyz" in output
    assert "untrained" in output


def test_demo_runtime_runs_the_export_from_the_cache(tmp_path):
    """--runtime onnxruntime: the node runs the model's cached export (a broken one fails
    configure, the real one answers); the cache entry is found, not exported again."""
    import shutil

    pytest.importorskip("refvlm_ros.node")
    from refvlm_core.errors import RefVLMError
    from refvlm_export.cache import model_key
    from tests.export_helpers import tiny_export

    entry = tmp_path / "cache" / "-".join(model_key("tiny"))
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    config = demo.DemoConfig(out_dir=tmp_path / "out", width=160, height=120, timeout_s=100.0,
                             questions=demo.DEFAULT_QUESTIONS[:1], runtime="onnxruntime",
                             export_cache=tmp_path / "cache",
                             model=demo.ModelChoice({"model_preset": "tiny"}, "tiny", False))
    with pytest.raises(RefVLMError, match="failed to configure"):
        demo.run_demo(config, log=lambda line: None)
    shutil.rmtree(entry)
    shutil.copytree(tiny_export()[1], entry)
    lines: list[str] = []
    [row] = demo.run_demo(config, log=lines.append)
    assert row.success, row.error
    assert f"export of tiny: reusing {entry}" in lines
    assert json.loads((tmp_path / "out" / "answers.json").read_text())["model"].endswith(
        f"runtime onnxruntime, export {entry}")
