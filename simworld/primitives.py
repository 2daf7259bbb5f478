"""Solid primitives of SimWorld with vectorised ray hits, surface normals and signed
distances. Rays share one origin (the pinhole) and need not be unit length: a hit at
parameter t is the point ``origin + t * direction``.

The signed distance functions are written independently of the ray hits, so tests can
check every rendered pixel against them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-9


def _first_positive(t_near: np.ndarray, t_far: np.ndarray) -> np.ndarray:
    """Smallest positive root per ray, +inf when none (NaN counts as no root)."""
    t = np.where(t_near > EPS, t_near, np.where(t_far > EPS, t_far, np.inf))
    return np.where(np.isnan(t), np.inf, t)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), EPS)


def _segment_distance_2d(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of 2D points [N, 2] to the segment a-b."""
    ab = b - a
    s = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + s[:, None] * ab), axis=1)


@dataclass
class Primitive:
    """Shared appearance fields; subclasses add geometry."""

    albedo: np.ndarray  # [3] float in [0, 1]
    material: str       # "matte" or "metal"
    instance_id: int    # 1-based object id; 0 for the background

    def bounding_sphere(self) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def intersect(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Ray parameter of the first hit [N] (+inf for a miss)."""
        raise NotImplementedError

    def normal(self, points: np.ndarray) -> np.ndarray:
        """Outward unit normals [N, 3] at surface points [N, 3]."""
        raise NotImplementedError

    def sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance [N] (negative inside)."""
        raise NotImplementedError


@dataclass
class Sphere(Primitive):
    center: np.ndarray = None  # [3]
    radius: float = 0.0

    def bounding_sphere(self):
        return self.center, self.radius

    def intersect(self, origin, directions):
        oc = origin - self.center
        a = np.einsum("ij,ij->i", directions, directions)
        b = directions @ oc
        c = oc @ oc - self.radius ** 2
        disc = b * b - a * c
        with np.errstate(invalid="ignore"):
            root = np.sqrt(disc)
        return _first_positive((-b - root) / a, (-b + root) / a)

    def normal(self, points):
        return _normalize(points - self.center)

    def sdf(self, points):
        return np.linalg.norm(points - self.center, axis=1) - self.radius


@dataclass
class Capsule(Primitive):
    """All points within ``radius`` of the segment a-b (limbs, torso)."""

    a: np.ndarray = None  # [3]
    b: np.ndarray = None  # [3]
    radius: float = 0.0

    def bounding_sphere(self):
        return (self.a + self.b) / 2.0, np.linalg.norm(self.b - self.a) / 2.0 + self.radius

    def _closest_on_axis(self, points):
        ab = self.b - self.a
        s = np.clip(((points - self.a) @ ab) / max(ab @ ab, EPS), 0.0, 1.0)
        return self.a + s[:, None] * ab

    def intersect(self, origin, directions):
        # The union's first entry is the earliest entry of its parts: side tube and end balls.
        axis = self.b - self.a
        length = np.linalg.norm(axis)
        t_side = np.full(len(directions), np.inf)
        if length > EPS:
            u = axis / length
            oc = origin - self.a
            d_perp = directions - np.outer(directions @ u, u)
            oc_perp = oc - (oc @ u) * u
            a = np.einsum("ij,ij->i", d_perp, d_perp)
            b = d_perp @ oc_perp
            c = oc_perp @ oc_perp - self.radius ** 2
            with np.errstate(invalid="ignore", divide="ignore"):
                t = (-b - np.sqrt(b * b - a * c)) / a
                along = oc @ u + t * (directions @ u)
                ok = (t > EPS) & (along >= 0.0) & (along <= length)
            t_side = np.where(ok, t, np.inf)
        ends = [Sphere(self.albedo, self.material, self.instance_id, p, self.radius) for p in (self.a, self.b)]
        return np.minimum(t_side, np.minimum(ends[0].intersect(origin, directions), ends[1].intersect(origin, directions)))

    def normal(self, points):
        return _normalize(points - self._closest_on_axis(points))

    def sdf(self, points):
        return np.linalg.norm(points - self._closest_on_axis(points), axis=1) - self.radius


@dataclass
class Box(Primitive):
    """A box turned by ``yaw`` radians about the world z axis."""

    center: np.ndarray = None        # [3]
    half_extents: np.ndarray = None  # [3]
    yaw: float = 0.0

    @property
    def _rotation(self) -> np.ndarray:  # world-from-local
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def bounding_sphere(self):
        return self.center, float(np.linalg.norm(self.half_extents))

    def intersect(self, origin, directions):
        rotation = self._rotation
        o = (origin - self.center) @ rotation
        d = directions @ rotation
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-self.half_extents - o) / d
            t2 = (self.half_extents - o) / d
        t_near = np.nanmax(np.minimum(t1, t2), axis=1)
        t_far = np.nanmin(np.maximum(t1, t2), axis=1)
        hit = (t_near <= t_far) & (t_far > EPS)
        return np.where(hit, _first_positive(t_near, t_far), np.inf)

    def normal(self, points):
        rotation = self._rotation
        local = (points - self.center) @ rotation
        face = np.argmax(np.abs(local) / self.half_extents, axis=1)
        n_local = np.zeros_like(local)
        rows = np.arange(len(points))
        n_local[rows, face] = np.sign(local[rows, face])
        return n_local @ rotation.T

    def sdf(self, points):
        q = np.abs((points - self.center) @ self._rotation) - self.half_extents
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
        return outside + np.minimum(q.max(axis=1), 0.0)


@dataclass
class UprightSolid(Primitive):
    """A solid of revolution about the vertical axis through ``base`` (the centre of
    its bottom disc): shared fields and bounds of Cylinder and Cone."""

    base: np.ndarray = None  # [3]
    radius: float = 0.0
    height: float = 0.0

    def bounding_sphere(self):
        return self.base + [0.0, 0.0, self.height / 2.0], float(np.hypot(self.radius, self.height / 2.0))


@dataclass
class Cylinder(UprightSolid):
    """Upright cylinder standing on ``base``."""

    def intersect(self, origin, directions):
        o = origin - self.base
        dx, dy, dz = directions[:, 0], directions[:, 1], directions[:, 2]
        a = dx * dx + dy * dy
        b = dx * o[0] + dy * o[1]
        c = o[0] ** 2 + o[1] ** 2 - self.radius ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            root = np.sqrt(b * b - a * c)
            t_side = (-b - root) / a
            z = o[2] + t_side * dz
            t_side = np.where((t_side > EPS) & (z >= 0.0) & (z <= self.height), t_side, np.inf)
            t_caps = []
            for cap_z in (0.0, self.height):
                t = (cap_z - o[2]) / dz
                rho2 = (o[0] + t * dx) ** 2 + (o[1] + t * dy) ** 2
                t_caps.append(np.where((t > EPS) & (rho2 <= self.radius ** 2), t, np.inf))
        return np.nan_to_num(np.minimum(t_side, np.minimum(*t_caps)), nan=np.inf, posinf=np.inf)

    def normal(self, points):
        local = points - self.base
        rho = np.hypot(local[:, 0], local[:, 1])
        to_side = np.abs(rho - self.radius)
        to_top, to_bottom = np.abs(local[:, 2] - self.height), np.abs(local[:, 2])
        radial = _normalize(np.stack([local[:, 0], local[:, 1], np.zeros(len(points))], axis=1))
        n = np.where((to_top < to_side)[:, None], [0.0, 0.0, 1.0], radial)
        return np.where(((to_bottom < to_side) & (to_bottom < to_top))[:, None], [0.0, 0.0, -1.0], n)

    def sdf(self, points):
        local = points - self.base
        d = np.stack([np.hypot(local[:, 0], local[:, 1]) - self.radius,
                      np.abs(local[:, 2] - self.height / 2.0) - self.height / 2.0], axis=1)
        return np.linalg.norm(np.maximum(d, 0.0), axis=1) + np.minimum(d.max(axis=1), 0.0)


@dataclass
class Cone(UprightSolid):
    """Upright cone: base disc centred on ``base``, apex ``height`` above it. (The
    circumsphere of its cross-section would bound it tighter; the shared one is simple.)"""

    def intersect(self, origin, directions):
        o = origin - self.base
        k2 = (self.radius / self.height) ** 2
        w = self.height - o[2]
        dx, dy, dz = directions[:, 0], directions[:, 1], directions[:, 2]
        # x^2 + y^2 = k^2 (H - z)^2 along the ray
        a = dx * dx + dy * dy - k2 * dz * dz
        b = 2.0 * (o[0] * dx + o[1] * dy + k2 * w * dz)
        c = o[0] ** 2 + o[1] ** 2 - k2 * w * w
        with np.errstate(invalid="ignore", divide="ignore"):
            root = np.sqrt(b * b - 4.0 * a * c)
            roots = np.stack([(-b - root) / (2.0 * a), (-b + root) / (2.0 * a)])
            z = o[2] + roots * dz
            valid = (roots > EPS) & (z >= 0.0) & (z <= self.height)
            t_side = np.where(valid, roots, np.inf).min(axis=0)
            t = -o[2] / dz
            rho2 = (o[0] + t * dx) ** 2 + (o[1] + t * dy) ** 2
            t_base = np.where((t > EPS) & (rho2 <= self.radius ** 2), t, np.inf)
        return np.nan_to_num(np.minimum(t_side, t_base), nan=np.inf, posinf=np.inf)

    def normal(self, points):
        local = points - self.base
        k2 = (self.radius / self.height) ** 2
        side = _normalize(np.stack([local[:, 0], local[:, 1], k2 * (self.height - local[:, 2])], axis=1))
        on_base = np.abs(local[:, 2]) < 1e-6 * max(self.height, 1.0)
        return np.where(on_base[:, None], [0.0, 0.0, -1.0], side)

    def sdf(self, points):
        # Exact 2D distance in the (rho, z) half-plane to the triangle (0,0), (r,0), (0,H).
        local = points - self.base
        q = np.stack([np.hypot(local[:, 0], local[:, 1]), local[:, 2]], axis=1)
        corner, apex, origin2 = np.array([self.radius, 0.0]), np.array([0.0, self.height]), np.zeros(2)
        distance = np.minimum(_segment_distance_2d(q, origin2, corner), _segment_distance_2d(q, corner, apex))
        inside = (q[:, 1] >= 0.0) & (q[:, 0] <= self.radius * (self.height - q[:, 1]) / self.height)
        return np.where(inside, -distance, distance)


@dataclass
class Plane(Primitive):
    """Infinite plane ``dot(normal, p) = dot(normal, point)``, optionally bounded above
    in z (a back wall of finite height)."""

    point: np.ndarray = None    # [3]
    unit_normal: np.ndarray = None  # [3]
    max_z: float = np.inf
    albedo_b: np.ndarray = None  # [3] second checker colour, None for a plain plane
    checker_size: float = 0.5    # metres

    def bounding_sphere(self):
        return self.point, np.inf

    def intersect(self, origin, directions):
        denominator = directions @ self.unit_normal
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((self.point - origin) @ self.unit_normal) / denominator
        z = origin[2] + t * directions[:, 2]
        return np.where((t > EPS) & (z <= self.max_z), t, np.inf)

    def normal(self, points):
        return np.broadcast_to(self.unit_normal, points.shape).copy()

    def sdf(self, points):
        return (points - self.point) @ self.unit_normal

    def albedo_at(self, points: np.ndarray) -> np.ndarray:
        """Per-point colour [N, 3]: a checker pattern in the plane's two in-plane axes."""
        if self.albedo_b is None:
            return np.broadcast_to(self.albedo, points.shape).copy()
        axes = [i for i in range(3) if abs(self.unit_normal[i]) < 0.5]
        cells = np.floor(points[:, axes] / self.checker_size).astype(np.int64).sum(axis=1)
        return np.where((cells % 2 == 0)[:, None], self.albedo, self.albedo_b)
