"""Library mode: a Predictor in this process, no ROS. The camera is an image file, read
again on every call (so another program can keep overwriting it); with a depth file
aligned to it and the camera intrinsics, objects get 3D positions as in the node
(refvlm_ros.localization, plain numpy)."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from refvlm_core.errors import RefVLMError
from refvlm_mcp.observation import Found, Frame, Observation, PerceptionError

CAMERA = "default"


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise PerceptionError(f"cannot read the camera image {path}: {error}", retry_after_s=1.0) from None


def read_depth(path: Path, depth_scale: float) -> np.ndarray:
    """.npy metres (NaN unknown), or a 16-bit PNG in units of ``depth_scale`` metres (0 unknown)."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32)
    from PIL import Image

    with Image.open(path) as image:
        raw = np.asarray(image).astype(np.float32)
    return np.where(raw > 0, raw * depth_scale, np.nan).astype(np.float32)


class LocalPerception:
    mode = "library"

    def __init__(self, predictor: Any, image: Path, model_name: str, depth: Path | None = None,
                 intrinsics: tuple[float, float, float, float] | None = None, frame_id: str = "camera",
                 depth_scale: float = 0.001) -> None:
        if depth is not None and intrinsics is None:
            raise RefVLMError("a depth image needs the camera intrinsics (--intrinsics fx,fy,cx,cy)")
        self.predictor, self.image, self.model_name = predictor, Path(image), model_name
        self.depth, self.intrinsics, self.frame_id, self.depth_scale = depth, intrinsics, frame_id, depth_scale
        self._lock = threading.Lock()  # one prediction at a time
        self._latencies: list[float] = []

    def _check_camera(self, camera: str | None) -> None:
        if camera and camera != CAMERA:
            raise PerceptionError(f"there is one camera, {CAMERA!r} (the image file {self.image.name}); "
                                  f"no camera {camera!r}: leave camera empty")

    def latest_frame(self, camera: str | None) -> Frame:
        self._check_camera(camera)
        if not self.image.is_file():
            raise PerceptionError(f"no camera image yet: {self.image} does not exist", retry_after_s=1.0)
        rgb = read_rgb(self.image)
        return Frame(rgb=lambda: rgb, width=rgb.shape[1], height=rgb.shape[0],
                     stamp_s=self.image.stat().st_mtime, frame_id=self.frame_id, camera=CAMERA)

    def _locate(self, found: Found, obj: Any, depth: np.ndarray | None, shape: tuple[int, int]) -> None:
        if depth is None:
            found.position_status = "no depth image for this camera (start the server with --depth)"
            return
        from refvlm_ros.localization import Intrinsics, box_region, localize

        if depth.shape != shape:
            found.position_status = f"the depth image is {depth.shape[::-1]} but the image is {shape[::-1]}"
            return
        region = obj.mask if obj.mask is not None else (
            box_region(obj.box_xyxy, shape) if obj.box_xyxy is not None else None)
        if region is None:
            found.position_status = "the object has neither a mask nor a box"
            return
        location, reason = localize(np.asarray(region, bool), depth, Intrinsics(*self.intrinsics))
        if location is None:
            found.position_status = reason
        else:
            found.position, found.position_frame = tuple(float(v) for v in location.position), self.frame_id

    def ask(self, prompt: str, camera: str | None) -> Observation:
        from refvlm_simworld.figures import COCO_KEYPOINTS

        frame = self.latest_frame(camera)
        rgb = frame.rgb()
        depth = read_depth(self.depth, self.depth_scale) if self.depth is not None else None
        start = time.perf_counter()
        with self._lock:
            try:
                result = self.predictor.predict(rgb, prompt)
            except RefVLMError as error:  # bad input the caller can fix
                raise PerceptionError(str(error)) from None
        seconds = time.perf_counter() - start
        self._latencies = (self._latencies + [seconds])[-50:]
        objects = []
        for obj in result.objects:
            keypoints = [] if obj.keypoints is None else [
                (COCO_KEYPOINTS[k] if len(obj.keypoints) == len(COCO_KEYPOINTS) else f"keypoint_{k}",
                 float(x), float(y), float(v)) for k, (x, y, v) in enumerate(np.asarray(obj.keypoints))]
            model_depth = None
            if obj.depth is not None and np.isfinite(obj.depth).any():
                model_depth = float(np.nanmedian(obj.depth))
            found = Found(phrase=obj.phrase, units=tuple(obj.units), score=obj.score,
                          box_xyxy=None if obj.box_xyxy is None else tuple(float(v) for v in obj.box_xyxy),
                          mask=None if obj.mask is None else np.asarray(obj.mask, bool), keypoints=keypoints,
                          depth_median_m=model_depth)
            self._locate(found, obj, depth, rgb.shape[:2])
            objects.append(found)
        return Observation(prompt=result.prompt, answer=result.answer, trp_text=result.trp_text,
                           objects=objects, width=frame.width, height=frame.height, stamp_s=frame.stamp_s,
                           frame_id=self.frame_id, camera=CAMERA, model_ms=round(seconds * 1e3, 1),
                           errors=list(result.errors), frame=frame)

    def cameras(self) -> list[dict[str, Any]]:
        return [{"name": CAMERA, "image_file": str(self.image), "has_depth": self.depth is not None,
                 "frame_id": self.frame_id}]

    def status(self) -> dict[str, Any]:
        runtime = getattr(self.predictor, "runtime", None)
        times = self._latencies
        return {"mode": self.mode, "state": "ready", "model": self.model_name,
                "device": str(getattr(self.predictor, "device", "cpu")),
                "runtime": runtime.describe().get("runtime", "torch") if runtime is not None else "torch",
                "llm_weights": str(getattr(self.predictor, "quantize", "none")),
                "mean_model_latency_ms": round(1e3 * sum(times) / len(times), 1) if times else None}

    def close(self) -> None:
        pass


def load_predictor(model: str | None, preset: str | None, device: str, quantize: str) -> tuple[Any, str]:
    """(Predictor, its name) from a model folder or a preset; the load's prints go to
    stderr, since stdout carries the MCP stream."""
    with contextlib.redirect_stdout(sys.stderr):
        from refvlm_core.predictor import Predictor

        if model:
            return Predictor.from_pretrained(model, device=device, quantize=quantize), str(model)
        return Predictor.from_preset(preset or "tiny", device=device), f"preset {preset or 'tiny'}"
