"""Articulated people: a posed skeleton with the 17 COCO keypoints, dressed in
spheres and capsules.

The figure is built in its own frame (it faces +y, its left-hand side is -x, z is
up), posed with random joint angles, then turned by ``yaw`` and stood on
the ground. Keypoints are COCO's, in COCO's order; face keypoints lie on the head's
surface, joint keypoints on limb axes inside the body.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .primitives import Capsule, Primitive, Sphere

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's skeleton, 0-based keypoint indices.
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
# Mirror pairs for horizontal flips.
COCO_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
FACE_KEYPOINTS = frozenset(range(5))

SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.65, 0.46, 0.33], [0.45, 0.30, 0.22]])


@dataclass
class PersonPose:
    """Joint angles in radians; positive flexion swings a limb forward (+y)."""

    shoulder_flex: np.ndarray  # [2] left, right
    shoulder_abduct: np.ndarray  # [2] sideways lift
    elbow_flex: np.ndarray  # [2]
    hip_flex: np.ndarray  # [2]
    knee_flex: np.ndarray  # [2]
    head_yaw: float
    torso_lean: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> "PersonPose":
        return cls(
            shoulder_flex=rng.uniform(-0.6, 2.6, 2),
            shoulder_abduct=rng.uniform(0.05, 1.5, 2),
            elbow_flex=rng.uniform(0.0, 2.2, 2),
            hip_flex=rng.uniform(-0.4, 0.9, 2),
            knee_flex=rng.uniform(0.0, 1.4, 2),
            head_yaw=float(rng.uniform(-0.7, 0.7)),
            torso_lean=float(rng.uniform(-0.15, 0.25)),
        )


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _limb_direction(flex: float, abduct: float, side: float) -> np.ndarray:
    """Unit direction of a limb hanging down (-z), swung forward by ``flex`` and out to
    its side (side = +1 right, -1 left) by ``abduct``."""
    down = np.array([0.0, 0.0, -1.0])
    return _rot_y(-side * abduct) @ _rot_x(flex) @ down


@dataclass
class Figure:
    """A posed person: world keypoints and the primitives that dress it."""

    keypoints_world: np.ndarray  # [17, 3]
    primitives: list[Primitive]
    keypoint_owners: list[tuple[int, ...]]  # per keypoint: indices into primitives of its own body part


def build_figure(
    position_xy: np.ndarray,
    yaw: float,
    height: float,
    pose: PersonPose,
    shirt: np.ndarray,
    trousers: np.ndarray,
    skin: np.ndarray,
    instance_id: int,
) -> Figure:
    """Skeleton -> keypoints and body primitives, standing on z = 0."""
    h = height
    pelvis = np.array([0.0, 0.0, 0.53 * h])
    lean = _rot_x(pose.torso_lean)
    neck = pelvis + lean @ np.array([0.0, 0.0, 0.29 * h])
    head = neck + lean @ np.array([0.0, 0.0, 0.10 * h])
    head_radius = 0.065 * h
    shoulder_half, hip_half = 0.12 * h, 0.065 * h
    upper_arm, forearm, thigh, shin = 0.17 * h, 0.16 * h, 0.24 * h, 0.24 * h

    k = np.zeros((17, 3))
    face = lean @ _rot_z(pose.head_yaw)
    k[0] = head + face @ (head_radius * np.array([0.0, 1.0, 0.0]))
    for index, side in ((1, -1.0), (2, 1.0)):  # eyes: forward, up a little, to each side
        k[index] = head + face @ (head_radius * _unit([0.35 * side, 0.85, 0.35]))
    for index, side in ((3, -1.0), (4, 1.0)):  # ears: on the sides
        k[index] = head + face @ (head_radius * _unit([side, -0.1, 0.1]))
    for i, side in enumerate((-1.0, 1.0)):  # left is -x in the figure's frame (it faces +y)
        shoulder = neck + lean @ np.array([side * shoulder_half, 0.0, -0.02 * h])
        elbow = shoulder + upper_arm * _limb_direction(pose.shoulder_flex[i], pose.shoulder_abduct[i], side)
        upper_dir = _unit(elbow - shoulder)
        # The elbow bends the forearm towards the front (or upwards when the arm points forward).
        toward = [0.0, 1.0, 0.0] if abs(upper_dir[1]) < 0.9 else [0.0, 0.0, 1.0]
        bend_axis = _unit(np.cross(upper_dir, toward))
        wrist = elbow + forearm * _rotate_about(upper_dir, bend_axis, pose.elbow_flex[i])
        hip = pelvis + np.array([side * hip_half, 0.0, 0.0])
        knee = hip + thigh * _limb_direction(pose.hip_flex[i], 0.08, side)
        ankle = knee + shin * _limb_direction(pose.hip_flex[i] - pose.knee_flex[i], 0.04, side)
        k[5 + i], k[7 + i], k[9 + i], k[11 + i], k[13 + i], k[15 + i] = shoulder, elbow, wrist, hip, knee, ankle

    limb = 0.045 * h
    parts: list[tuple[str, Primitive]] = []

    def add(name: str, primitive: Primitive) -> int:
        parts.append((name, primitive))
        return len(parts) - 1

    def capsule(a, b, radius, colour):
        return Capsule(colour, "matte", instance_id, a, b, radius)

    head_i = add("head", Sphere(skin, "matte", instance_id, head, head_radius))
    add("neck", capsule(neck, head, 0.035 * h, skin))
    torso_i = add("torso", capsule(pelvis + [0.0, 0.0, 0.05 * h], neck - [0.0, 0.0, 0.03 * h], 0.1 * h, shirt))
    shoulders_i = add("shoulders", capsule(k[5], k[6], 0.05 * h, shirt))
    hips_i = add("hips", capsule(k[11], k[12], 0.07 * h, trousers))
    owners: list[tuple[int, ...]] = [(head_i,)] * 5 + [()] * 12
    for i in range(2):
        upper_i = add("upper_arm", capsule(k[5 + i], k[7 + i], limb, shirt))
        fore_i = add("forearm", capsule(k[7 + i], k[9 + i], 0.85 * limb, skin))
        thigh_i = add("thigh", capsule(k[11 + i], k[13 + i], 1.3 * limb, trousers))
        shin_i = add("shin", capsule(k[13 + i], k[15 + i], 1.1 * limb, trousers))
        owners[5 + i] = (shoulders_i, upper_i, torso_i)
        owners[7 + i] = (upper_i, fore_i)
        owners[9 + i] = (fore_i,)
        owners[11 + i] = (hips_i, thigh_i, torso_i)
        owners[13 + i] = (thigh_i, shin_i)
        owners[15 + i] = (shin_i,)

    # Stand on the ground: the lowest body point touches z = 0.
    lowest = min(_lowest_z(p) for _, p in parts)
    place = np.array([position_xy[0], position_xy[1], -lowest])
    turn = _rot_z(yaw)
    primitives = [_moved(p, turn, place) for _, p in parts]
    return Figure(k @ turn.T + place, primitives, owners)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rotate_about(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of v about a unit axis."""
    return v * np.cos(angle) + np.cross(axis, v) * np.sin(angle) + axis * (axis @ v) * (1.0 - np.cos(angle))


def _lowest_z(p: Primitive) -> float:
    if isinstance(p, Sphere):
        return float(p.center[2] - p.radius)
    return float(min(p.a[2], p.b[2]) - p.radius)


def _moved(p: Primitive, rotation: np.ndarray, offset: np.ndarray) -> Primitive:
    if isinstance(p, Sphere):
        return Sphere(p.albedo, p.material, p.instance_id, rotation @ p.center + offset, p.radius)
    return Capsule(p.albedo, p.material, p.instance_id, rotation @ p.a + offset, rotation @ p.b + offset, p.radius)
