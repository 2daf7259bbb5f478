"""SimWorld: a deterministic procedural scene simulator with exact ground truth.

``SimWorld(config, split).scene(i)`` renders scene ``i`` (RGB, metric depth, instance
ids, boxes, masks, COCO keypoints, pinhole camera); ``language`` says true things about
what the camera sees. Both the training data (``refvlm_training.data.simworld``: scenes
as VT-Instruct samples and shards) and the ROS simulated camera use it; it imports only
numpy and ``refvlm_core.errors``.
"""
from .camera import Camera
from .figures import COCO_KEYPOINTS, COCO_SKELETON
from .generator import SimWorld
from .render import Scene
from .splits import HELD_OUT_COLOR_SHAPE, SPLITS
from .world import CATEGORIES, Layout, SceneObject, SimWorldConfig

__all__ = ["Camera", "COCO_KEYPOINTS", "COCO_SKELETON", "SimWorld", "Scene", "HELD_OUT_COLOR_SHAPE",
           "SPLITS", "CATEGORIES", "Layout", "SceneObject", "SimWorldConfig"]
