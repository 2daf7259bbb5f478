"""Small synthetic samples for the model tests: boxes, masks, keypoints, depth."""
from __future__ import annotations

import numpy as np

from refvlm_core import trp
from refvlm_core.sample import RefTarget, Sample, Turn
from refvlm_core.visual_prompts import VisualPrompt


def _image(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image with two coloured rectangles; their masks [2, H, W]; a depth ramp."""
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    masks = np.zeros((2, height, width), dtype=bool)
    masks[0, 5:25, 8:30] = True
    masks[1, 30:50, 40:70] = True
    image[masks[0]] = (220, 40, 40)
    image[masks[1]] = (40, 40, 220)
    depth = np.tile(np.linspace(1.0, 5.0, width, dtype=np.float32), (height, 1))
    return image, masks, depth


def _boxes(masks: np.ndarray) -> np.ndarray:
    out = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(out, np.float32)


def _person_keypoints(box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    t = np.linspace(0, 1, 17)
    return np.stack([x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, np.full(17, 2.0)], -1).astype(np.float32)[None]


def mixed_samples(height: int = 60, width: int = 80) -> list[Sample]:
    """Four samples: box (2 instances), mask + region prompt, keypoint, depth."""
    image, masks, depth = _image(height, width, 0)
    boxes = _boxes(masks)
    box_answer = f"There are {trp.format_phrase('squares', ('box',), 2)}."
    mask_answer = f"It is {trp.format_phrase('the blue square', ('mask',), 1)}."
    kp_answer = trp.format_phrase("person", ("box", "keypoint"), 1)
    depth_answer = f"Here is {trp.format_phrase('the depth', ('depth',), 1)}."
    return [
        Sample("box", image, [Turn("user", "<image>\nFind the squares."),
                              Turn("assistant", box_answer, [RefTarget("squares", ("box",), boxes=boxes)])], "rec"),
        Sample("mask", image, [Turn("user", "What is <region>? Segment it."),
                               Turn("assistant", mask_answer,
                                    [RefTarget("the blue square", ("mask",), masks=masks[1:])])],
               "res", visual_prompts=[VisualPrompt.box(40, 30, 70, 50)]),
        Sample("kp", image, [Turn("user", "Where is the person?"),
                             Turn("assistant", kp_answer,
                                  [RefTarget("person", ("box", "keypoint"), boxes=boxes[:1],
                                             keypoints=_person_keypoints(boxes[0]))])], "pose"),
        Sample("depth", image, [Turn("user", "Estimate depth."),
                                Turn("assistant", depth_answer, [RefTarget("the depth", ("depth",))])],
               "depth", depth=depth),
    ]


def forced_answer_hook(tokenizer, text: str):
    """A Predictor logits hook that makes the LLM write ``text`` and then stop: the real
    model still runs, and the real decoders read the hidden states at its <REF>s."""
    import torch

    script = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def force(step, logits):
        forced = torch.full_like(logits, -1e9)
        forced[0, script[min(step, len(script) - 1)]] = 0
        return forced
    return force
