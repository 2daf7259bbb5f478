"""The node's bounded hand-over buffers and statistics, without ROS: latest frame only,
dropped frames counted, depth matched by stamp, rate and latency over a window."""
from __future__ import annotations

import threading
import time

import pytest

frames = pytest.importorskip("refvlm_ros.frames", reason="refvlm_ros not installed: run 'make setup'")


def test_frame_slot_keeps_only_the_newest_and_counts_drops():
    slot = frames.FrameSlot()
    for i in range(5):
        slot.put(i)
    assert (slot.received, slot.dropped) == (5, 4)
    assert slot.take(timeout=0.0) == 4 and slot.take(timeout=0.0) is None
    assert slot.latest() == 4                      # queries still see the newest frame
    slot.put(5)
    assert slot.dropped == 4                       # the previous one was taken, not dropped
    slot.clear()
    assert slot.latest() is None and slot.take(timeout=0.0) is None


def test_frame_slot_take_wakes_on_put():
    slot = frames.FrameSlot()
    threading.Timer(0.05, slot.put, args=("frame",)).start()
    start = time.monotonic()
    assert slot.take(timeout=5.0) == "frame" and time.monotonic() - start < 2.0


def test_stamped_buffer_matches_closest_within_tolerance_and_stays_bounded():
    buffer = frames.StampedBuffer(size=3)
    for stamp in (1.0, 2.0, 3.0, 4.0):
        buffer.put(stamp, f"d{stamp}")
    assert buffer.match(3.02, tolerance=0.05) == "d3.0"
    assert buffer.match(1.0, tolerance=0.05) is None          # evicted: only 3 kept
    assert buffer.match(3.5, tolerance=0.1) is None
    threading.Timer(0.05, buffer.put, args=(5.0, "late")).start()
    assert buffer.match(5.0, tolerance=0.01, wait=2.0) == "late"  # waits for a lagging depth


def test_inference_stats_rate_and_latency():
    stats = frames.InferenceStats(window=4)
    now = [0.0]
    for i in range(6):
        now[0] = i * 0.5
        stats.record(0.1 * (i + 1), clock=lambda: now[0])
    assert stats.inferences == 6
    assert stats.rate_hz(clock=lambda: 2.5) == pytest.approx(3 / 1.5)   # last 4 ends: 1.0 .. 2.5
    assert stats.mean_latency_s() == pytest.approx((0.3 + 0.4 + 0.5 + 0.6) / 4)
