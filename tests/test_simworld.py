"""SimWorld rendering: determinism, camera geometry, ray hits against independent
signed distance functions, and ground-truth consistency (depth, masks, boxes, keypoints)."""
from __future__ import annotations

import numpy as np
import pytest

from refvlm_core.errors import ConfigError, InputError
from refvlm_simworld import Camera, SceneObject, SimWorld, SimWorldConfig
from refvlm_simworld.figures import COCO_SKELETON
from refvlm_simworld.primitives import Box, Capsule, Cone, Cylinder, Sphere
from refvlm_simworld.render import render_layout

SMALL = SimWorldConfig(seed=7, width=96, height=72)


@pytest.fixture(scope="module")
def scenes():
    world = SimWorld(SMALL, "train")
    return [world.scene(i) for i in range(8)]


def _arrays(scene):
    kps = [scene.keypoints_by_id[k] for k in sorted(scene.keypoints_by_id)]
    return [scene.rgb, scene.depth, scene.instance_ids] + kps


def test_same_seed_same_bytes_and_index_order_does_not_matter():
    a = SimWorld(SMALL, "val")
    b = SimWorld(SimWorldConfig(seed=7, width=96, height=72), "val")
    b.scene(3)  # generating another scene first must not change scene 5
    for x, y in zip(_arrays(a.scene(5)), _arrays(b.scene(5))):
        assert x.tobytes() == y.tobytes()
    other_seed = SimWorld(SimWorldConfig(seed=8, width=96, height=72), "val").scene(5)
    assert other_seed.rgb.tobytes() != a.scene(5).rgb.tobytes()
    assert SimWorld(SMALL, "train").scene(5).rgb.tobytes() != a.scene(5).rgb.tobytes()


def test_bad_config_and_split_raise_clear_errors():
    with pytest.raises(InputError, match="split"):
        SimWorld(SMALL, "training")
    with pytest.raises(ConfigError, match="min_objects"):
        SimWorld(SimWorldConfig(min_objects=5, max_objects=2))
    with pytest.raises(InputError, match="index"):
        SimWorld(SMALL).layout(-1)


def test_camera_projection_round_trip_and_look_at():
    camera = Camera.look_at([1.0, -2.0, 1.5], [0.2, 3.0, 0.4], width=64, height=48, fov_x_deg=60.0)
    pixels, depth = camera.project(np.array([[0.2, 3.0, 0.4]]))
    np.testing.assert_allclose(pixels[0], [32.0, 24.0], atol=1e-9)
    assert camera.K[0, 0] == pytest.approx(32.0 / np.tan(np.deg2rad(30.0)))
    points = np.random.default_rng(0).uniform([-2, 1, 0], [2, 6, 2], size=(50, 3))
    pixels, depth = camera.project(points)
    np.testing.assert_allclose(camera.unproject(pixels, depth), points, atol=1e-9)
    np.testing.assert_allclose(camera.rotation.T @ camera.rotation, np.eye(3), atol=1e-12)
    with pytest.raises(InputError):
        Camera.look_at([0, 0, 1], [0, 0, 1])


PRIMITIVES = [
    Sphere(np.ones(3), "matte", 1, np.array([0.1, 3.0, 0.5]), 0.4),
    Capsule(np.ones(3), "matte", 1, np.array([-0.3, 3.0, 0.2]), np.array([0.4, 3.4, 0.9]), 0.15),
    Box(np.ones(3), "matte", 1, np.array([0.0, 3.0, 0.3]), np.array([0.3, 0.2, 0.3]), 0.6),
    Cylinder(np.ones(3), "matte", 1, np.array([0.0, 3.0, 0.0]), 0.3, 0.7),
    Cone(np.ones(3), "matte", 1, np.array([0.0, 3.0, 0.0]), 0.35, 0.8),
]


@pytest.mark.parametrize("primitive", PRIMITIVES, ids=lambda p: type(p).__name__)
def test_ray_hits_lie_on_the_surface_and_nothing_is_hit_earlier(primitive):
    origin = np.array([0.3, -1.0, 1.6])
    center, radius = primitive.bounding_sphere()
    rng = np.random.default_rng(1)
    aims = center + rng.uniform(-1.2, 1.2, size=(400, 3)) * radius
    directions = (aims - origin) * rng.uniform(0.5, 2.0, size=(400, 1))  # any length
    t = primitive.intersect(origin, directions)
    hit = np.isfinite(t)
    assert 50 < hit.sum() < 400  # both hits and misses are exercised
    points = origin + t[hit, None] * directions[hit]
    np.testing.assert_allclose(primitive.sdf(points), 0.0, atol=1e-7)
    # March along each ray up to its hit (or far past the object on a miss): no earlier inside point.
    t_end = np.where(hit, t, 3.0 * (np.linalg.norm(center - origin) + radius) / np.linalg.norm(directions, axis=1))
    fractions = np.linspace(0.0, 0.999, 300)
    samples = origin + (fractions[None, :, None] * t_end[:, None, None]) * directions[:, None, :]
    assert primitive.sdf(samples.reshape(-1, 3)).min() > -1e-6
    normals = primitive.normal(points)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-9)
    assert np.all(np.einsum("ij,ij->i", normals, directions[hit]) < 1e-9)  # facing the camera


def _surface_distance(scene, instance_id, points):
    if instance_id == 0:
        return np.min([p.sdf(points) for p in scene.layout.background()], axis=0)
    obj = scene.object(instance_id)
    return np.min([p.sdf(points) for p in obj.primitives], axis=0)


def test_every_pixel_reprojects_onto_its_objects_surface(scenes):
    for scene in scenes:
        depth, ids, camera = scene.depth, scene.instance_ids, scene.camera
        assert depth.dtype == np.float32 and ids.dtype == np.int32
        assert not np.any(depth == 0) and not np.any(np.isnan(depth))
        assert np.all(ids[~np.isfinite(depth)] == 0)
        ys, xs = np.nonzero(np.isfinite(depth))
        points = camera.unproject(np.stack([xs + 0.5, ys + 0.5], axis=1), depth[ys, xs])
        for instance_id in np.unique(ids[ys, xs]):
            on = ids[ys, xs] == instance_id
            distance = _surface_distance(scene, instance_id, points[on])
            # depth is float32: a few parts in 1e7 of the range
            assert np.abs(distance).max() < 2e-6 * depth[ys, xs][on].max() + 1e-6, instance_id


def test_boxes_are_mask_extents_and_cover_every_visible_object(scenes):
    for scene in scenes:
        visible = {i for i, n in scene.pixel_counts().items() if n > 0}
        assert set(scene.boxes) == visible
        for instance_id, box in scene.boxes.items():
            ys, xs = np.nonzero(scene.masks(instance_id))
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    with pytest.raises(InputError, match="instance id"):
        scenes[0].masks(99)


def test_keypoints_inside_image_or_absent_and_visible_ones_show_the_person(scenes):
    checked = 0
    for scene in scenes:
        for instance_id, kps in scene.keypoints_by_id.items():
            assert kps.shape == (17, 3) and set(np.unique(kps[:, 2])) <= {0.0, 1.0, 2.0}
            absent = kps[:, 2] == 0
            assert np.all(kps[absent, :2] == 0)
            h, w = scene.instance_ids.shape
            assert np.all((kps[~absent, 0] >= 0) & (kps[~absent, 0] < w) & (kps[~absent, 1] >= 0) & (kps[~absent, 1] < h))
            for x, y, v in kps[~absent]:
                c, r = int(x), int(y)
                patch = scene.instance_ids[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
                if v == 2 and np.all(patch == patch.flat[0]):  # away from silhouettes
                    assert patch.flat[0] == instance_id
                    checked += 1
    assert checked > 10


def test_a_cube_in_front_of_a_person_occludes_its_keypoints():
    world = SimWorld(SimWorldConfig(seed=3, width=96, height=72, person_probability=1.0, max_people=1,
                                    min_objects=1, max_objects=1))
    layout = world.layout(0)
    person = layout.objects[0]
    camera = layout.default_camera(96, 72)
    before = render_layout(layout, camera).keypoints(person.instance_id)
    assert np.sum(before[:, 2] == 2) >= 5
    # A wall-like box halfway between the camera and the person hides all of it.
    middle = (camera.position + person.center_world) / 2.0
    yaw = np.arctan2(*(person.center_world[:2] - camera.position[:2])[::-1]) + np.pi / 2
    blocker = SceneObject(2, "cube", "red", "matte", "large", middle, np.array([3.0, 0.1, 3.0]), 1.5, yaw)
    blocker.primitives = [Box(np.array([0.8, 0.1, 0.1]), "matte", 2, middle, np.array([1.5, 0.05, 1.5]), yaw)]
    layout.objects.append(blocker)
    after = render_layout(layout, camera)
    kps = after.keypoints(person.instance_id)
    assert np.array_equal(kps[:, 2] > 0, before[:, 2] > 0)  # same keypoints in the image...
    assert np.all(kps[kps[:, 2] > 0, 2] == 1)                # ...all occluded now
    assert after.pixel_counts()[person.instance_id] == 0
    with pytest.raises(InputError, match="keypoints"):
        after.keypoints(2)


def test_rays_that_miss_everything_get_infinite_depth():
    layout = SimWorld(SMALL).layout(0)
    up = Camera.look_at(layout.camera_eye, layout.camera_eye + [0.0, 1.0, 3.0], 32, 24, 40.0)
    scene = SimWorld(SMALL).render(layout, up)
    assert np.all(np.isposinf(scene.depth)) and np.all(scene.instance_ids == 0)
    assert scene.rgb[..., 2].mean() > scene.rgb[..., 0].mean()  # sky blue


def test_figures_keep_bone_lengths_and_stand_on_the_ground():
    world = SimWorld(SimWorldConfig(seed=11, width=64, height=48, person_probability=1.0, max_people=2))
    people = [o for i in range(6) for o in world.layout(i).objects if o.category == "person"]
    assert len(people) >= 6
    for person in people:
        k = person.keypoints_world
        height = person.extent[2]
        for a, b, fraction in ((5, 7, 0.17), (7, 9, 0.16), (11, 13, 0.24), (13, 15, 0.24)):
            scale = np.linalg.norm(k[a] - k[b]) / fraction
            assert 0.8 * height < scale < 1.3 * height  # posed, not stretched
        bottoms = [(p.center[2] if isinstance(p, Sphere) else min(p.a[2], p.b[2])) - p.radius for p in person.primitives]
        assert min(bottoms) == pytest.approx(0.0, abs=1e-9)
    assert len(COCO_SKELETON) == 19 and max(max(e) for e in COCO_SKELETON) == 16


def test_other_resolutions_render_the_same_view():
    world = SimWorld(SMALL)
    layout = world.layout(2)
    small = world.render(layout)
    large = world.render(layout, small.camera.resized(192, 144))
    assert large.rgb.shape == (144, 192, 3)
    # Box corners scale with the resolution (within a pixel or two of rasterisation).
    for instance_id, box in small.boxes.items():
        if instance_id in large.boxes and small.pixel_counts()[instance_id] > 40:
            np.testing.assert_allclose(large.boxes[instance_id] / 2.0, box, atol=2.0)


def test_default_system_samples_and_nothing_matches_answers():
    """--system default stores no system prompt (the model's default is used, as the node
    sends); train scenes get "nothing matches" REC/RES answers with no <REF>, never naming a
    held-out colour x shape pair; test scenes get none."""
    from refvlm_core import trp
    from refvlm_simworld.splits import HELD_OUT_COLOR_SHAPE
    from refvlm_training.data.simworld import world_samples

    world = SimWorld(SimWorldConfig(width=96, height=64), "train")
    samples = [s for i in range(30) for s in world_samples(world, i, max_per_task=4, conversations=1,
                                                             tasks=("rec", "res"), system="default")]
    assert samples and all(s.system is None for s in samples)
    negatives = [s for s in samples if s.task in ("rec", "res") and not s.turns[1].targets]
    assert negatives, "no 'nothing matches' sample in 30 train scenes"
    for sample in negatives:
        answer = sample.turns[1].text
        assert answer.startswith("There is no ") and trp.parse(answer).refs == []
        colour, shape = answer.removeprefix("There is no ").removesuffix(" in the image.").split()
        assert (colour, shape) not in HELD_OUT_COLOR_SHAPE
    test = SimWorld(SimWorldConfig(width=96, height=64), "test")
    assert all(s.turns[1].targets for i in range(10) for s in world_samples(test, i, 4, 0, tasks=("rec",)))


def test_the_simulator_runs_without_the_training_package_torch_or_ros():
    """SimWorld is shared by the training data and the ROS sim camera: rendering a scene in a
    fresh interpreter loads neither the training package, torch nor rclpy."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from refvlm_simworld import SimWorld, SimWorldConfig\n"
            "SimWorld(SimWorldConfig(width=32, height=24), 'val').scene(0)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'refvlm_training', 'torch', 'rclpy'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
