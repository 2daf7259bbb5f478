"""Track IDs on a moving SimWorld view: the sim camera's orbit (refvlm_sim motion:=orbit)
moves every object across the image; the tracker is fed the objects as a perfect model
would refer to them (SimWorld's exact masks and boxes), so what is checked is the
association, not the model. The node's use of it: test_target_frame.py."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]

RATE_HZ = 5.0      # the sim camera's default frame rate
ORBIT_RAD_S = 0.6  # fast enough to move objects tens of pixels over the sequence
FRAMES = 12


@pytest.fixture(scope="module")
def frames():
    """[(stamp_s, {instance_id: (box, mask)})] of the orbiting camera over layout val/0."""
    from refvlm_ros.sim_node import moved_camera
    from refvlm_ros.sim_scenes import SimScenes
    from refvlm_simworld.render import render_layout

    scenes = SimScenes("val", 0, 320, 240)
    out = []
    for k in range(FRAMES):
        t = k / RATE_HZ
        scene = render_layout(scenes.layout, moved_camera(scenes.base_camera, scenes.target, "orbit", ORBIT_RAD_S, t))
        visible = {i: (np.asarray(box, np.float64), scene.masks(i)) for i, box in scene.boxes.items()}
        out.append((100.0 + t, visible))
    return out


def _observe(frame, ids, phrase="the object", masks=True):
    from refvlm_ros.tracking import Observation

    return [Observation(phrase, frame[i][0], frame[i][1] if masks else None) for i in ids]


def test_ids_hold_while_objects_move_and_change_only_with_the_object(frames):
    from refvlm_ros.tracking import Tracker, box_iou

    always = sorted(set.intersection(*(set(f) for _, f in frames)))  # visible in every frame
    assert len(always) >= 2, "the layout needs two objects in view throughout"
    a, b = always[:2]
    centre = lambda box: np.array([box[0] + box[2], box[1] + box[3]]) / 2  # noqa: E731
    moved = np.linalg.norm(centre(frames[-1][1][a][0]) - centre(frames[0][1][a][0]))
    assert moved > 15.0, f"object {a} moved only {moved:.1f} px: the sequence does not test motion"

    # Every object of every frame, all under one phrase: only overlap tells them apart.
    for masks in (True, False):  # by mask, then by box
        tracker = Tracker(max_age_s=1.0, min_iou=0.3)
        ids = [dict(zip(always, tracker.assign(_observe(f, always, masks=masks), t))) for t, f in frames]
        for i in always:
            assert {frame_ids[i] for frame_ids in ids} == {ids[0][i]}, f"object {i} changed ID (masks={masks})"
        assert len({ids[0][i] for i in always}) == len(always)

    # The referred object changes from a to b half-way (same phrase): the ID changes there, once.
    assert box_iou(frames[5][1][a][0], frames[6][1][b][0]) < 0.3
    tracker = Tracker(max_age_s=1.0, min_iou=0.3)
    ids = [tracker.assign(_observe(f, [a if k < 6 else b]), t)[0] for k, (t, f) in enumerate(frames)]
    assert ids == [ids[0]] * 6 + [ids[6]] * 6 and ids[6] != ids[0]


def test_min_iou_and_max_age_bound_the_association(frames):
    from refvlm_ros.tracking import Tracker

    a = sorted(frames[0][1])[0]
    # track_min_iou: a bound the moving object's frame-to-frame overlap cannot meet breaks its track
    strict = Tracker(max_age_s=1.0, min_iou=0.995)
    assert len({strict.assign(_observe(f, [a]), t)[0] for t, f in frames}) > 1

    # track_max_age_s: a gap shorter than it keeps the ID, a longer one starts a new track
    tracker = Tracker(max_age_s=0.5, min_iou=0.3)
    seen = {k: tracker.assign(_observe(frames[k][1], [a]), frames[k][0])[0] for k in (0, 1, 3, 7)}
    assert seen[0] == seen[1] == seen[3]  # 0.4 s without it
    assert seen[7] != seen[3]             # 0.8 s without it

    # another phrase is another track, even on the same pixels
    tracker = Tracker(max_age_s=1.0, min_iou=0.3)
    t, f = frames[0]
    [first] = tracker.assign(_observe(f, [a], "the red cube"), t)
    [other] = tracker.assign(_observe(f, [a], "the blue ball"), t + 0.2)
    [same] = tracker.assign(_observe(f, [a], "The  red cube"), t + 0.4)
    assert other != first and same == first
