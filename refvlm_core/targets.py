"""Decoder ground truth: what the processor builds for each unit of each image.

A unit's decoder encodes its own targets (``UnitDecoder.encode_target`` /
``collate_targets``), so the processor holds no per-unit code: it hands each decoder the
sample's ``TargetFrame`` and collects one ``UnitTargets`` per unit and image.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from refvlm_core.geometry import Letterbox
from refvlm_core.sample import Sample

DENSE_STRIDE = 4  # dense targets (masks, depth) at S/4, the resolution the pixel decoders work at


@dataclass(frozen=True)
class TargetFrame:
    """One sample and the letterbox that takes its original pixels into the model frame."""

    sample: Sample
    letterbox: Letterbox

    @property
    def size(self) -> int:
        """S, the model frame's side."""
        return self.letterbox.size

    @property
    def dense_size(self) -> int:
        """Side of dense targets (masks, depth maps)."""
        return self.letterbox.size // DENSE_STRIDE


@dataclass
class UnitTargets:
    """Ground truth of one unit for one image, in the normalised model frame.

    ``group_ids[i]`` is the unit-block index of instance i: instances are matched only to
    <REF>s of the same block (grouped Hungarian matching). ``value`` is what the unit's
    decoder encoded (e.g. boxes [M, 4] cx, cy, w, h in [0, 1]; masks [M, h, w]; keypoints
    [M, 17, 3]; one depth map [h, w] for every depth <REF> of the image), None when the
    image has no instance of the unit.
    """

    group_ids: Tensor           # [M] long
    value: Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.group_ids.shape[0])
