"""Small annotated images for the data-pipeline tests (built, not hard-coded)."""
from __future__ import annotations

import random

import numpy as np

from refvlm_training.data.tasks import GroundedCaption, ImageAnnotations, ObjectAnnotation


def toy_annotations(image_id: str = "toy", seed: int = 0, height: int = 24, width: int = 32) -> ImageAnnotations:
    """Two balls and a cube with masks, a person with keypoints, captions, QA, depth."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    cube = np.zeros((height, width), bool)
    cube[2:10, 3:12] = True
    ball = np.zeros((height, width), bool)
    ball[12:20, 15:30] = True
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[:5] = [[20, 3, 2], [21, 4, 2], [22, 5, 1], [23, 6, 2], [24, 7, 2]]
    objects = [
        ObjectAnnotation("cube", mask=cube, expressions=["the red cube", "the cube on the left"]),
        ObjectAnnotation("ball", mask=ball, description="a big blue ball"),
        ObjectAnnotation("ball", box=np.array([1, 14, 6, 20], np.float32)),
        ObjectAnnotation("person", box=np.array([18, 1, 27, 11], np.float32), keypoints=keypoints),
    ]
    caption = "A cube next to two balls."
    grounded = GroundedCaption(caption, [(2, 6, [0]), (19, 24, [1, 2])])
    return ImageAnnotations(image_id, image, objects, captions=[caption], grounded_captions=[grounded],
                            qa=[("What colour is the cube?", "red")],
                            depth=np.linspace(1, 5, height * width, dtype=np.float32).reshape(height, width))


def toy_samples(n_images: int = 2, seed: int = 0):
    from refvlm_training.data.tasks import build_samples
    rng = random.Random(seed)
    samples = []
    for i in range(n_images):
        samples += build_samples(toy_annotations(f"toy{i}", seed + i), rng, conversations=2)
    return samples
