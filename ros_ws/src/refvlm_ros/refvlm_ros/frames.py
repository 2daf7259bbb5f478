"""Bounded buffers between the executor (which receives messages) and the inference
worker, plus the statistics /diagnostics reports. No ROS imports.

Nothing here grows with the input rate: the camera slot holds one frame, the depth
buffer a few, the latency window a fixed number of samples.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


class FrameSlot:
    """Latest-frame-only hand-over. ``put`` replaces an unprocessed frame (counted as
    dropped); ``take`` hands the newest frame to the worker once; ``latest`` keeps the
    newest frame for queries whether or not the worker took it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: Any = None
        self._latest: Any = None
        self.received = 0
        self.dropped = 0

    def put(self, frame: Any) -> None:
        with self._cond:
            if self._pending is not None:
                self.dropped += 1
            self._pending = self._latest = frame
            self.received += 1
            self._cond.notify_all()

    def take(self, timeout: float) -> Any:
        """The pending frame (then none is pending), or None after ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None, timeout)
            frame, self._pending = self._pending, None
            return frame

    def latest(self) -> Any:
        with self._cond:
            return self._latest

    def clear(self) -> None:
        with self._cond:
            self._pending = self._latest = None


class StampedBuffer:
    """The last few messages with stamps (seconds); finds the one closest to a stamp,
    waiting briefly when the match has not arrived yet (depth often lags the image)."""

    def __init__(self, size: int = 4) -> None:
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[float, Any]] = collections.deque(maxlen=size)

    def put(self, stamp: float, item: Any) -> None:
        with self._cond:
            self._items.append((stamp, item))
            self._cond.notify_all()

    def _closest(self, stamp: float, tolerance: float) -> Any:
        best = min(self._items, key=lambda pair: abs(pair[0] - stamp), default=None)
        return best[1] if best is not None and abs(best[0] - stamp) <= tolerance else None

    def match(self, stamp: float, tolerance: float, wait: float = 0.0) -> Any:
        """The item whose stamp is within ``tolerance`` of ``stamp``, else None."""
        with self._cond:
            caught_up = lambda: any(s >= stamp for s, _ in self._items)  # noqa: E731
            self._cond.wait_for(caught_up, wait)
            return self._closest(stamp, tolerance)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()


@dataclass
class InferenceStats:
    """Counters and a fixed window of recent inference end times and latencies."""

    window: int = 50

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ends: collections.deque[float] = collections.deque(maxlen=self.window)
        self._latencies: collections.deque[float] = collections.deque(maxlen=self.window)
        self.inferences = 0
        self.errors = 0
        self.queries = 0

    def record(self, latency_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        with self._lock:
            self._ends.append(clock())
            self._latencies.append(latency_s)
            self.inferences += 1

    def count_error(self) -> None:
        with self._lock:
            self.errors += 1

    def count_query(self) -> None:
        with self._lock:
            self.queries += 1

    def rate_hz(self, clock: Callable[[], float] = time.monotonic) -> float:
        """Inferences per second over the window (0 when idle for longer than it spans)."""
        with self._lock:
            if len(self._ends) < 2:
                return 0.0
            span = clock() - self._ends[0]
            return (len(self._ends) - 1) / span if span > 0 else 0.0

    def mean_latency_s(self) -> float:
        with self._lock:
            return sum(self._latencies) / len(self._latencies) if self._latencies else 0.0
