"""What the Predictor returns: the answer and everything it referred to, in ORIGINAL
image pixels. JSON-serialisable (masks and depth as RLE/summary in JSON)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ReferredObject:
    """One <REF> of the answer, decoded by every unit of its <Unit> block."""

    phrase: str
    units: tuple[str, ...]
    instance_index: int                 # the [i] before its <REF>
    ref_ordinal: int                    # position among all <REF>s of the answer
    ref_span: tuple[int, int]           # character span of the <REF> in Result.trp_text
    score: float | None = None
    box_xyxy: np.ndarray | None = None  # [4] float pixels
    mask: np.ndarray | None = None      # [H, W] bool
    keypoints: np.ndarray | None = None # [17, 3]: x, y pixels, visibility probability
    depth: np.ndarray | None = None     # [H, W] float32 metres, NaN unknown
    # outputs of units without a field above (a plug-in decoder's), named by that decoder,
    # in original pixels where geometric, e.g. {"point_xy": [2]}
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: box and keypoints as lists, mask as COCO RLE, depth as a summary."""
        from refvlm_core import rle

        out: dict[str, Any] = {
            "phrase": self.phrase, "units": list(self.units), "instance_index": self.instance_index,
            "ref_ordinal": self.ref_ordinal, "ref_span": list(self.ref_span), "score": self.score,
        }
        if self.box_xyxy is not None:
            out["box_xyxy"] = [round(float(v), 2) for v in self.box_xyxy]
        if self.mask is not None:
            out["mask_rle"] = rle.encode(np.asarray(self.mask, dtype=bool))
            out["mask_area"] = int(np.count_nonzero(self.mask))
        if self.keypoints is not None:
            out["keypoints"] = np.round(np.asarray(self.keypoints, np.float64), 3).tolist()
        if self.depth is not None:
            known = self.depth[np.isfinite(self.depth)]
            out["depth"] = {"shape": list(self.depth.shape), "known_fraction": float(known.size / max(self.depth.size, 1)),
                            "min": float(known.min()) if known.size else None,
                            "median": float(np.median(known)) if known.size else None,
                            "max": float(known.max()) if known.size else None}
        if self.outputs:
            out["outputs"] = {name: np.asarray(value, np.float64).round(3).tolist()
                              for name, value in self.outputs.items()}
        return out


@dataclass
class Result:
    prompt: str
    answer: str                         # display text, tags removed
    trp_text: str                       # raw model output
    image_size: tuple[int, int]         # (height, width)
    objects: list[ReferredObject] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    errors: list[str] = field(default_factory=list)          # TRP parse or decoding problems
    diagnostics: dict[str, Any] = field(default_factory=dict)  # tokens, forward passes, load time...

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "trp_text": self.trp_text,
                "image_size": list(self.image_size), "objects": [o.to_dict() for o in self.objects],
                "timings": {k: round(float(v), 6) for k, v in self.timings.items()}, "errors": list(self.errors),
                "diagnostics": dict(self.diagnostics)}

    def to_json(self, **json_kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **json_kwargs)
