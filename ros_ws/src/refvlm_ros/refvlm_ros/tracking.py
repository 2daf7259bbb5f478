"""Track IDs for referred objects: the same object keeps its ID from frame to frame
while it stays referred. Pure numpy (no ROS).

The model answers every frame afresh, so identity comes from association: an object
of this frame continues a track when it has the same phrase (case and spaces aside)
and overlaps the track's last box (or mask, when both have one) by at least
``min_iou``; the best overlaps are matched first, one object per track. A track that
has not been matched for more than ``max_age_s`` (image time) ends; an unmatched
object starts a new track. IDs count up from 1 and are never reused, so a new ID
always means another object (or the same one lost for longer than ``max_age_s``).
Objects with neither a box nor a mask are not tracked (ID 0).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class Observation:
    """One referred object of a frame, in that frame's pixels."""

    phrase: str
    box_xyxy: np.ndarray | None        # [4] pixels, or None
    mask: np.ndarray | None = None     # [H, W] bool, or None


@dataclass
class Track:
    track_id: int
    phrase: str
    box_xyxy: np.ndarray | None
    mask: np.ndarray | None
    last_seen_s: float


def normalized_phrase(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def overlap(track: Track, obs: Observation) -> float:
    """Mask IoU when both have a mask of one size, else box IoU, else 0."""
    if track.mask is not None and obs.mask is not None and track.mask.shape == obs.mask.shape:
        return mask_iou(track.mask, obs.mask)
    if track.box_xyxy is not None and obs.box_xyxy is not None:
        return box_iou(track.box_xyxy, obs.box_xyxy)
    return 0.0


class Tracker:
    """Assigns track IDs to the objects of successive frames of one camera (thread-safe)."""

    def __init__(self, max_age_s: float, min_iou: float) -> None:
        self.max_age_s, self.min_iou = max_age_s, min_iou
        self._tracks: list[Track] = []
        self._next_id = 1
        self._lock = threading.Lock()

    @property
    def live_tracks(self) -> int:
        with self._lock:
            return len(self._tracks)

    def assign(self, observations: list[Observation], stamp_s: float) -> list[int]:
        """Track IDs for ``observations`` (one frame, stamped ``stamp_s``), in their order;
        0 for an observation with neither a box nor a mask."""
        with self._lock:
            self._tracks = [t for t in self._tracks if abs(stamp_s - t.last_seen_s) <= self.max_age_s]
            pairs = []
            for i, obs in enumerate(observations):
                for j, track in enumerate(self._tracks):
                    if track.phrase == normalized_phrase(obs.phrase):
                        score = overlap(track, obs)
                        if score >= self.min_iou:
                            pairs.append((score, i, j))
            ids: list[int | None] = [None] * len(observations)
            used: set[int] = set()
            for _, i, j in sorted(pairs, key=lambda pair: -pair[0]):
                if ids[i] is None and j not in used:
                    ids[i] = self._tracks[j].track_id
                    used.add(j)
                    self._update(self._tracks[j], observations[i], stamp_s)
            for i, obs in enumerate(observations):
                if ids[i] is None and obs.box_xyxy is None and obs.mask is None:
                    ids[i] = 0  # nothing to follow it by (e.g. a depth map): not tracked
                elif ids[i] is None:
                    track = Track(self._next_id, normalized_phrase(obs.phrase), None, None, stamp_s)
                    self._update(track, obs, stamp_s)
                    self._tracks.append(track)
                    ids[i] = self._next_id
                    self._next_id += 1
            return [int(i) for i in ids]

    @staticmethod
    def _update(track: Track, obs: Observation, stamp_s: float) -> None:
        track.box_xyxy = None if obs.box_xyxy is None else np.asarray(obs.box_xyxy, np.float64)
        track.mask = None if obs.mask is None else np.asarray(obs.mask, bool)
        track.last_seen_s = max(track.last_seen_s, stamp_s)

    def clear(self) -> None:
        with self._lock:
            self._tracks = []


def assign_track_ids(tracker: Tracker, result: object, msg: object, stamp_s: float) -> None:
    """Sets ``track_id`` of each object of ``msg`` (the RefResult built from ``result``,
    one message object per result object) from ``result``'s pixel boxes and masks."""
    observations = [Observation(obj.phrase, obj.box_xyxy, obj.mask) for obj in result.objects]
    for out, track_id in zip(msg.objects, tracker.assign(observations, stamp_s)):
        out.track_id = track_id
