"""SimWorld: a deterministic procedural scene generator with exact ground truth.

``SimWorld(config, split).scene(i)`` renders scene ``i`` (RGB, metric depth, instance
ids, boxes, masks, COCO keypoints, pinhole camera); ``.samples(i)`` turns it into
VT-Instruct samples of every task; ``write_split`` writes a split as tar shards.
"""
from .camera import Camera
from .figures import COCO_KEYPOINTS, COCO_SKELETON
from .generator import SimWorld, write_split
from .render import Scene
from .splits import HELD_OUT_COLOR_SHAPE, SPLITS
from .world import CATEGORIES, Layout, SceneObject, SimWorldConfig

__all__ = ["Camera", "COCO_KEYPOINTS", "COCO_SKELETON", "SimWorld", "write_split", "Scene", "HELD_OUT_COLOR_SHAPE",
           "SPLITS", "CATEGORIES", "Layout", "SceneObject", "SimWorldConfig"]
