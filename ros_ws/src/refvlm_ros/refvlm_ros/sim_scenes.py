"""SimWorld scenes for the simulated camera: render a layout from a camera, and describe
the ground truth in the camera frame as JSON-ready data. No rclpy here."""
from __future__ import annotations

import numpy as np

MIN_VISIBLE_PIXELS = 1


def object_name(obj) -> str:
    """'red cube', 'large blue metal sphere' style name; people are 'person'."""
    if obj.category == "person":
        return "person"
    return f"{obj.color} {obj.category}"


def surface_median(points_mask: np.ndarray, depth: np.ndarray, camera) -> list[float] | None:
    """Median camera-frame point [3] of the visible surface under a mask: what a depth
    camera can see of the object (its centre lies behind that surface)."""
    rows, cols = np.nonzero(points_mask & np.isfinite(depth))
    if len(rows) == 0:
        return None
    z = depth[rows, cols].astype(np.float64)
    x = (cols + 0.5 - camera.cx) / camera.fx * z
    y = (rows + 0.5 - camera.cy) / camera.fy * z
    return [float(np.median(x)), float(np.median(y)), float(np.median(z))]


def ground_truth(scene) -> dict:
    """The scene's objects with boxes (pixels) and 3D centres in the camera frame."""
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
            "surface_median_camera": (surface_median(scene.masks(obj.instance_id), scene.depth, camera)
                                      if visible else None),
        }
        if obj.category == "person":
            entry["keypoints"] = scene.keypoints(obj.instance_id).tolist()
        objects.append(entry)
    return {
        "split": scene.layout.split,
        "layout_index": scene.layout.index,
        "width": camera.width,
        "height": camera.height,
        "K": camera.K.tolist(),
        "world_from_camera": camera.world_from_camera.tolist(),
        "objects": objects,
    }


class SimScenes:
    """One SimWorld layout, rendered from any camera."""

    def __init__(self, split: str, layout_index: int, width: int, height: int, seed: int = 0) -> None:
        from refvlm_training.simworld.world import SimWorldConfig, make_layout

        self.layout = make_layout(SimWorldConfig(seed=seed, width=width, height=height),
                                  split, layout_index)
        self.base_camera = self.layout.default_camera(width, height)
        self.target = np.asarray(self.layout.camera_target, dtype=np.float64)

    def render(self, camera):
        """(rgb [H, W, 3] uint8, depth [H, W] float32 metres with NaN for no surface,
        camera, ground truth dict)."""
        from refvlm_training.simworld.render import render_layout

        scene = render_layout(self.layout, camera)
        depth = scene.depth.astype(np.float32, copy=True)
        depth[~np.isfinite(depth)] = np.nan  # no surface: unknown, as the node expects
        return scene.rgb, depth, camera, ground_truth(scene)
