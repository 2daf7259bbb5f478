"""What is in a SimWorld scene: objects with attributes, their placement on the ground,
the room (checkered ground, a back wall), the light and the default camera.

A layout is a pure function of (config.seed, split, index); the renderer turns it into
pixels. World frame: z up, ground at z = 0, the default camera looks along +y.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refvlm_core.errors import ConfigError

from .camera import Camera
from .figures import SKIN_TONES, PersonPose, build_figure
from .primitives import Box, Cone, Cylinder, Plane, Primitive, Sphere
from .splits import COLORS, SHAPES, allowed_colors, check_split, held_out_color, scene_rng

CATEGORIES = SHAPES + ("person",)
MATERIALS = ("matte", "metal")
SIZES = ("small", "large")
SCALE_RANGE = {"small": (0.16, 0.24), "large": (0.32, 0.44)}           # metres, rigid shapes
PERSON_HEIGHT = {"small": (1.05, 1.30), "large": (1.60, 1.85)}          # metres
GROUND_TONES = ((0.62, 0.60, 0.55), (0.50, 0.56, 0.62), (0.58, 0.52, 0.44), (0.52, 0.58, 0.50))
TROUSER_TONES = {"dark blue": (0.08, 0.10, 0.25), "black": (0.05, 0.05, 0.05), "brown": (0.30, 0.18, 0.08),
                 "khaki": (0.55, 0.48, 0.30)}
WALL_TONES = ((0.78, 0.76, 0.70), (0.66, 0.72, 0.78), (0.80, 0.70, 0.62), (0.70, 0.78, 0.70))


@dataclass
class SimWorldConfig:
    seed: int = 0
    width: int = 320
    height: int = 240
    min_objects: int = 3
    max_objects: int = 7
    person_probability: float = 0.2   # chance that an object slot holds a person
    max_people: int = 2
    fov_x_deg: tuple[float, float] = (50.0, 65.0)
    min_visible_pixels: int = 25      # smaller objects are not named in language tasks
    held_out_fraction_test: float = 0.5  # test split: chance that a rigid object takes a held-out pair

    def validate(self) -> "SimWorldConfig":
        if self.width < 16 or self.height < 16:
            raise ConfigError(f"SimWorld image must be at least 16x16, got {self.width}x{self.height}")
        if not 1 <= self.min_objects <= self.max_objects <= 12:
            raise ConfigError("SimWorld needs 1 <= min_objects <= max_objects <= 12, got "
                              f"{self.min_objects}..{self.max_objects}")
        if not 0.0 <= self.person_probability <= 1.0:
            raise ConfigError(f"person_probability must lie in [0, 1], got {self.person_probability}")
        return self


@dataclass
class SceneObject:
    instance_id: int              # 1-based, as in Scene.instance_ids
    category: str                 # one of CATEGORIES
    color: str                    # key of COLORS (people: shirt colour)
    material: str                 # one of MATERIALS
    size: str                     # one of SIZES
    center_world: np.ndarray      # [3] centre of the object's bounding box
    extent: np.ndarray            # [3] width, depth, height in metres (object frame)
    radius: float                 # footprint radius on the ground
    yaw: float                    # radians about world z
    keypoints_world: np.ndarray | None = None  # [17, 3], people only
    primitives: list[Primitive] = field(default_factory=list, repr=False)
    keypoint_owners: list[tuple[int, ...]] | None = field(default=None, repr=False)  # people: indices into primitives
    person_spec: tuple | None = field(default=None, repr=False)  # people: (PersonPose, skin rgb, trousers name)

    @property
    def volume(self) -> float:
        """Bounding volume in cubic metres (what "largest" compares)."""
        return float(np.prod(self.extent))


@dataclass
class Layout:
    seed: int
    split: str
    index: int
    objects: list[SceneObject]
    camera_eye: np.ndarray       # [3]
    camera_target: np.ndarray    # [3]
    fov_x_deg: float
    light_direction: np.ndarray  # [3] unit, towards the light
    ground_colors: tuple[np.ndarray, np.ndarray]
    checker_size: float
    wall_y: float                # the back wall is the plane y = wall_y, from z = 0 to wall_height
    wall_height: float
    wall_color: np.ndarray

    def default_camera(self, width: int, height: int) -> Camera:
        return Camera.look_at(self.camera_eye, self.camera_target, width, height, self.fov_x_deg)

    def background(self) -> list[Plane]:
        """Ground and back wall (instance 0)."""
        ground = Plane(self.ground_colors[0], "matte", 0, np.zeros(3), np.array([0.0, 0.0, 1.0]),
                       albedo_b=self.ground_colors[1], checker_size=self.checker_size)
        wall = Plane(self.wall_color, "matte", 0, np.array([0.0, self.wall_y, 0.0]), np.array([0.0, -1.0, 0.0]),
                     max_z=self.wall_height)
        return [ground, wall]

    def primitives(self) -> list[Primitive]:
        """Background planes first, then every object's primitives."""
        return self.background() + [p for obj in self.objects for p in obj.primitives]


def make_layout(config: SimWorldConfig, split: str, index: int) -> Layout:
    """The layout of scene ``index`` of ``split``: deterministic from (config.seed, split, index)."""
    check_split(split)
    rng = scene_rng(config.seed, split, index)
    eye = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-2.2, -1.0), rng.uniform(1.8, 2.8)])
    target = np.array([rng.uniform(-0.3, 0.3), rng.uniform(2.0, 3.0), rng.uniform(0.0, 0.4)])
    fov = float(rng.uniform(*config.fov_x_deg))
    wall_y = float(target[1] + rng.uniform(2.0, 3.0))
    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.9, -0.2), rng.uniform(0.8, 1.4)])
    ground_a = np.array(GROUND_TONES[int(rng.integers(len(GROUND_TONES)))])
    layout = Layout(
        seed=config.seed, split=split, index=index, objects=[], camera_eye=eye, camera_target=target,
        fov_x_deg=fov, light_direction=light / np.linalg.norm(light),
        ground_colors=(ground_a, ground_a * rng.uniform(0.78, 0.9)), checker_size=float(rng.uniform(0.35, 0.7)),
        wall_y=wall_y, wall_height=float(rng.uniform(2.2, 3.2)),
        wall_color=np.array(WALL_TONES[int(rng.integers(len(WALL_TONES)))]),
    )
    placement_camera = layout.default_camera(640, 480)
    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    force_held_out = split == "test"
    people = 0
    for _ in range(n_objects):
        is_person = people < config.max_people and rng.uniform() < config.person_probability
        category = "person" if is_person else SHAPES[int(rng.integers(len(SHAPES)))]
        obj = _sample_object(rng, config, split, category, len(layout.objects) + 1, force_held_out)
        if _place(obj, rng, layout, placement_camera):
            layout.objects.append(obj)
            people += is_person
            force_held_out = force_held_out and category == "person"
    if split == "test" and force_held_out:  # no rigid object was placed yet: place one held-out object
        for _ in range(20):
            obj = _sample_object(rng, config, split, SHAPES[int(rng.integers(len(SHAPES)))],
                                 len(layout.objects) + 1, True)
            if _place(obj, rng, layout, placement_camera):
                layout.objects.append(obj)
                break
    return layout


def _sample_object(rng, config, split, category, instance_id, force_held_out) -> SceneObject:
    """Attributes and shape parameters; position comes later from _place."""
    size = SIZES[int(rng.integers(2))]
    material = MATERIALS[int(rng.integers(2))] if category != "person" else "matte"
    if category in SHAPES and split == "test" and (force_held_out or rng.uniform() < config.held_out_fraction_test):
        color = held_out_color(category, rng)
    else:
        colors = allowed_colors(split, category)
        color = colors[int(rng.integers(len(colors)))]
    yaw = float(rng.uniform(-np.pi, np.pi))
    if category == "person":
        height = float(rng.uniform(*PERSON_HEIGHT[size]))
        extent = np.array([0.45, 0.3, 1.0]) * height  # refined from the posed body in _build
        obj = SceneObject(instance_id, category, color, material, size, np.zeros(3), extent, 0.3 * height, yaw)
        obj.person_spec = (PersonPose.random(rng), SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
                       tuple(TROUSER_TONES)[int(rng.integers(len(TROUSER_TONES)))])
        return obj
    scale = float(rng.uniform(*SCALE_RANGE[size]))
    extent, radius = {
        "cube": (np.full(3, 1.6 * scale), 1.6 * scale * np.sqrt(0.5)),
        "sphere": (np.full(3, 2.0 * scale), scale),
        "cylinder": (np.array([1.6 * scale, 1.6 * scale, 2.0 * scale]), 0.8 * scale),
        "cone": (np.array([2.0 * scale, 2.0 * scale, 2.4 * scale]), scale),
    }[category]
    return SceneObject(instance_id, category, color, material, size, np.zeros(3), extent, float(radius), yaw)


def _place(obj: SceneObject, rng, layout: Layout, camera: Camera, tries: int = 30) -> bool:
    """Put the object where the camera sees its footprint centre, clear of the others
    and of the wall; builds its primitives. False when no free spot was found."""
    for _ in range(tries):
        pixel = np.array([[rng.uniform(0.08, 0.92) * camera.width, rng.uniform(0.45, 0.92) * camera.height]])
        ray = camera.unproject(pixel, np.ones(1))[0] - camera.position
        if ray[2] >= -1e-6:
            continue
        ground = camera.position + ray * (-camera.position[2] / ray[2])
        if ground[1] + obj.radius > layout.wall_y - 0.1 or np.linalg.norm(ground[:2] - camera.position[:2]) < 2.0:
            continue
        if any(np.linalg.norm(ground[:2] - o.center_world[:2]) < obj.radius + o.radius + 0.05 for o in layout.objects):
            continue
        _build(obj, ground[:2])
        if _top_and_bottom_in_view(obj, camera):
            return True
    return False


def _top_and_bottom_in_view(obj: SceneObject, camera: Camera, margin: float = 0.02) -> bool:
    half_height = np.array([0.0, 0.0, obj.extent[2] / 2.0])
    pixels, depth = camera.project(np.stack([obj.center_world - half_height, obj.center_world + half_height]))
    low = np.array([margin * camera.width, margin * camera.height])
    high = np.array([(1 - margin) * camera.width, (1 - margin) * camera.height])
    return bool(np.all(depth > 0) and np.all((pixels >= low) & (pixels <= high)))


def _build(obj: SceneObject, xy: np.ndarray) -> None:
    albedo = np.array(COLORS[obj.color])
    i = obj.instance_id
    if obj.category == "person":
        pose, skin, trousers = obj.person_spec
        figure = build_figure(xy, obj.yaw, float(obj.extent[2]), pose, albedo, np.array(TROUSER_TONES[trousers]),
                              skin, i)
        obj.primitives, obj.keypoint_owners, obj.keypoints_world = figure.primitives, figure.keypoint_owners, \
            figure.keypoints_world
        lows = np.array([_aabb(p) for p in figure.primitives])
        low, high = lows[:, 0].min(axis=0), lows[:, 1].max(axis=0)
        obj.center_world = (low + high) / 2.0
        obj.extent = np.array([obj.extent[0], obj.extent[1], high[2]])
        return
    height = float(obj.extent[2])
    base = np.array([xy[0], xy[1], 0.0])
    obj.center_world = base + [0.0, 0.0, height / 2.0]
    if obj.category == "cube":
        obj.primitives = [Box(albedo, obj.material, i, obj.center_world, obj.extent / 2.0, obj.yaw)]
    elif obj.category == "sphere":
        obj.primitives = [Sphere(albedo, obj.material, i, obj.center_world, height / 2.0)]
    elif obj.category == "cylinder":
        obj.primitives = [Cylinder(albedo, obj.material, i, base, obj.extent[0] / 2.0, height)]
    else:
        obj.primitives = [Cone(albedo, obj.material, i, base, obj.extent[0] / 2.0, height)]


def _aabb(p: Primitive) -> np.ndarray:
    """[2, 3] low/high corners of a sphere or capsule."""
    ends = np.stack([p.center] if isinstance(p, Sphere) else [p.a, p.b])
    return np.stack([ends.min(axis=0) - p.radius, ends.max(axis=0) + p.radius])
