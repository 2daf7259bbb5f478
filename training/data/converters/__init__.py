"""Converters from public datasets to VT-Instruct shards, one module per dataset.

Each module reads the dataset's own published layout under ``root`` and provides
``TASKS`` (the tasks it builds) and ``iter_items(root, **options)``, yielding
``ImageItem`` (annotations + the original image file) or ``Skipped``. ``convert`` in
``common`` turns that into shards with a progress bar and a summary.
"""
from __future__ import annotations

CONVERTERS: dict[str, str] = {
    "coco_instances": "refvlm_training.data.converters.coco",
    "coco_keypoints": "refvlm_training.data.converters.coco",
    "coco_captions": "refvlm_training.data.converters.coco",
    "refcoco": "refvlm_training.data.converters.refcoco",
    "refcoco+": "refvlm_training.data.converters.refcoco",
    "refcocog": "refvlm_training.data.converters.refcoco",
    "flickr30k_entities": "refvlm_training.data.converters.flickr30k",
    "visual_genome": "refvlm_training.data.converters.visual_genome",
    "vqav2": "refvlm_training.data.converters.vqav2",
    "llava_instruct": "refvlm_training.data.converters.llava_instruct",
    "ade20k": "refvlm_training.data.converters.ade20k",
    "nyu_depth_v2": "refvlm_training.data.converters.nyu_depth",
}
