"""Pinhole camera of SimWorld.

Frames: the world is z-up (ground plane z = 0); the camera frame is the ROS optical
frame (x right, y down, z forward). ``world_from_camera`` maps camera-frame points to
the world. Pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``, so its centre is at
``(i + 0.5, j + 0.5)``; boxes that cover mask pixels are therefore ``(x0, y0, x1 + 1,
y1 + 1)`` of the extreme pixel indices, as in COCO.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refvlm_core.errors import InputError


@dataclass
class Camera:
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    world_from_camera: np.ndarray  # [4, 4] float64, rigid transform

    @property
    def K(self) -> np.ndarray:
        """Intrinsics [3, 3]."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def position(self) -> np.ndarray:
        """Optical centre in the world [3]."""
        return self.world_from_camera[:3, 3].copy()

    @property
    def rotation(self) -> np.ndarray:
        """World-from-camera rotation [3, 3]; its columns are the camera axes in the world."""
        return self.world_from_camera[:3, :3]

    @classmethod
    def look_at(
        cls,
        eye,
        target,
        width: int = 320,
        height: int = 240,
        fov_x_deg: float = 60.0,
        up=(0.0, 0.0, 1.0),
    ) -> "Camera":
        """A camera at ``eye`` whose optical axis passes through ``target``; square pixels."""
        if width < 1 or height < 1:
            raise InputError(f"camera size must be positive, got {width}x{height}")
        if not 1.0 <= fov_x_deg <= 170.0:
            raise InputError(f"fov_x_deg must lie in [1, 170], got {fov_x_deg}")
        eye = np.asarray(eye, dtype=np.float64)
        forward = np.asarray(target, dtype=np.float64) - eye
        if np.linalg.norm(forward) < 1e-9:
            raise InputError("look_at: eye and target coincide; move the camera")
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, np.asarray(up, dtype=np.float64))
        if np.linalg.norm(right) < 1e-9:
            raise InputError("look_at: viewing direction is parallel to `up`; pick another up")
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        pose = np.eye(4)
        pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
        focal = 0.5 * width / np.tan(np.deg2rad(fov_x_deg) / 2.0)
        return cls(width, height, focal, focal, width / 2.0, height / 2.0, pose)

    def resized(self, width: int, height: int) -> "Camera":
        """The same view at another resolution (intrinsics scaled)."""
        sx, sy = width / self.width, height / self.height
        return Camera(width, height, self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy,
                      self.world_from_camera.copy())

    def to_camera(self, points_world: np.ndarray) -> np.ndarray:
        """World points [N, 3] -> camera-frame points [N, 3]."""
        rotation, position = self.rotation, self.world_from_camera[:3, 3]
        return (np.asarray(points_world, dtype=np.float64) - position) @ rotation

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [N, 3] -> pixels [N, 2] (continuous, x right, y down), depth [N] (camera Z).

        Points at or behind the optical centre get NaN pixels.
        """
        p = self.to_camera(points_world)
        depth = p[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            safe = np.where(depth > 1e-9, depth, np.nan)
            pixels = np.stack([self.fx * p[:, 0] / safe + self.cx, self.fy * p[:, 1] / safe + self.cy], axis=1)
        return pixels, depth

    def unproject(self, pixels: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Pixels [N, 2] + depth along camera Z [N] -> world points [N, 3]."""
        pixels = np.asarray(pixels, dtype=np.float64)
        depth = np.asarray(depth, dtype=np.float64)
        x = (pixels[:, 0] - self.cx) / self.fx * depth
        y = (pixels[:, 1] - self.cy) / self.fy * depth
        p = np.stack([x, y, depth], axis=1)
        return p @ self.rotation.T + self.world_from_camera[:3, 3]

    def pixel_rays(self, x0: int = 0, y0: int = 0, x1: int | None = None, y1: int | None = None) -> np.ndarray:
        """World directions [h, w, 3] through the pixel centres of a window, scaled so their
        camera-Z component is 1: a hit at ray parameter t has depth t."""
        x1 = self.width if x1 is None else x1
        y1 = self.height if y1 is None else y1
        u = (np.arange(x0, x1) + 0.5 - self.cx) / self.fx
        v = (np.arange(y0, y1) + 0.5 - self.cy) / self.fy
        rays_camera = np.empty((y1 - y0, x1 - x0, 3))
        rays_camera[..., 0] = u[None, :]
        rays_camera[..., 1] = v[:, None]
        rays_camera[..., 2] = 1.0
        return rays_camera @ self.rotation.T

    def screen_window(self, center: np.ndarray, radius: float) -> tuple[int, int, int, int] | None:
        """Pixel window (x0, y0, x1, y1) that covers a world sphere, or None when it is out of
        view. Conservative: projects the corners of the sphere's bounding cube."""
        offsets = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        corners = np.asarray(center, dtype=np.float64) + radius * offsets
        camera_points = self.to_camera(corners)
        if np.all(camera_points[:, 2] <= 1e-6):
            return None
        if np.any(camera_points[:, 2] <= 1e-6):  # straddles the camera plane: take everything
            return 0, 0, self.width, self.height
        u = self.fx * camera_points[:, 0] / camera_points[:, 2] + self.cx
        v = self.fy * camera_points[:, 1] / camera_points[:, 2] + self.cy
        x0, x1 = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())) + 1, self.width)
        y0, y1 = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())) + 1, self.height)
        if x0 >= x1 or y0 >= y1:
            return None
        return x0, y0, x1, y1
