"""SimWorld scenes for the simulated camera: render a layout from a camera, and describe
the ground truth in the camera frame as JSON-ready data. No rclpy here."""
from __future__ import annotations

import numpy as np

from refvlm_ros.localization import Intrinsics, localize

MIN_VISIBLE_PIXELS = 1


def object_name(obj) -> str:
    """'red cube', 'large blue metal sphere' style name; people are 'person'."""
    if obj.category == "person":
        return "person"
    return f"{obj.color} {obj.category}"


def ros_intrinsics(camera) -> Intrinsics:
    """SimWorld puts pixel i's centre at i + 0.5; ROS / OpenCV put it at i, so the
    principal point moves by half a pixel."""
    return Intrinsics(camera.fx, camera.fy, camera.cx - 0.5, camera.cy - 0.5)


def ros_k(camera) -> list[float]:
    """CameraInfo.k (row-major 3x3) of a SimWorld camera."""
    k = ros_intrinsics(camera)
    return [k.fx, 0.0, k.cx, 0.0, k.fy, k.cy, 0.0, 0.0, 1.0]


def visible_surface_position(mask: np.ndarray, depth: np.ndarray, camera) -> list[float] | None:
    """Where the node would place the object given a perfect mask: the same robust
    statistic over the visible surface (the object's centre lies behind it)."""
    location, _ = localize(mask, depth, ros_intrinsics(camera))
    return None if location is None else location.position.tolist()


def metric_depth(scene) -> np.ndarray:
    """[H, W] float32 metres along camera Z, NaN where no surface (as the node expects)."""
    depth = scene.depth.astype(np.float32, copy=True)
    depth[~np.isfinite(depth)] = np.nan
    return depth


def ground_truth(scene, depth: np.ndarray) -> dict:
    """The scene's objects with boxes (pixels) and 3D positions: the centre in the camera
    frame and in the world, and the position of the visible surface in the camera frame
    (see visible_surface_position)."""
    camera, boxes, counts = scene.camera, scene.boxes, scene.pixel_counts()
    objects = []
    for obj in scene.objects:
        visible = counts[obj.instance_id] >= MIN_VISIBLE_PIXELS
        entry = {
            "instance_id": obj.instance_id,
            "name": object_name(obj),
            "category": obj.category,
            "color": obj.color,
            "material": obj.material,
            "size": obj.size,
            "visible_pixels": counts[obj.instance_id],
            "box_xyxy": boxes[obj.instance_id].tolist() if obj.instance_id in boxes else None,
            "center_camera": camera.to_camera(obj.center_world[None])[0].tolist(),
            "center_world": np.asarray(obj.center_world, dtype=np.float64).tolist(),
            "surface_median_camera": (visible_surface_position(scene.masks(obj.instance_id), depth,
                                                               camera) if visible else None),
        }
        if obj.category == "person":
            entry["keypoints"] = scene.keypoints(obj.instance_id).tolist()
        objects.append(entry)
    return {
        "split": scene.layout.split,
        "layout_index": scene.layout.index,
        "width": camera.width,
        "height": camera.height,
        "K": ros_k(camera),
        "world_from_camera": camera.world_from_camera.tolist(),
        "objects": objects,
    }


class SimScenes:
    """One SimWorld layout, rendered from any camera."""

    def __init__(self, split: str, layout_index: int, width: int, height: int, seed: int = 0) -> None:
        from refvlm_simworld.world import SimWorldConfig, make_layout

        self.layout = make_layout(SimWorldConfig(seed=seed, width=width, height=height),
                                  split, layout_index)
        self.base_camera = self.layout.default_camera(width, height)
        self.target = np.asarray(self.layout.camera_target, dtype=np.float64)

    def render(self, camera):
        """(rgb [H, W, 3] uint8, depth [H, W] float32 metres with NaN for no surface,
        camera, ground truth dict)."""
        from refvlm_simworld.render import render_layout

        scene = render_layout(self.layout, camera)
        depth = metric_depth(scene)
        return scene.rgb, depth, camera, ground_truth(scene, depth)
