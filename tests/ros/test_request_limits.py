"""What one request may cost (refvlm_ros.request_limits, no ROS): the memory a large
request freed goes back to the system; the deadline, and the node shutting down, end
generation from on_token."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from refvlm_ros import request_limits


LARGE_REQUEST = """
import sys
from refvlm_ros import request_limits
if sys.argv[1] == "untrimmed":
    request_limits._TRIM = None   # what glibc does on its own
before = request_limits.rss_mb()
with request_limits.returned_memory():
    # 300 MB of heap blocks freed (as a long prompt's activations are) between small
    # ones that live on (as caches do), so the heap cannot shrink from its top
    blocks, survivors = [], []
    for i in range(4800):
        blocks.append(bytearray(64 * 1024))
        survivors.append(bytearray(600))
    del blocks
print(request_limits.rss_mb() - before)
"""


def _kept_mb(mode: str) -> float:
    run = subprocess.run([sys.executable, "-c", LARGE_REQUEST, mode], capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or request_limits._TRIM is None,
                    reason="glibc's malloc_trim and /proc: Linux")
def test_memory_a_large_request_freed_goes_back():
    trimmed, untrimmed = _kept_mb("trimmed"), _kept_mb("untrimmed")
    print(f"after a 300 MB request the process kept {trimmed:.0f} MB ({untrimmed:.0f} MB without malloc_trim)")
    assert trimmed < 50.0 and untrimmed > 200.0


def test_the_deadline_ends_generation():
    seen = []
    on_token = request_limits.with_deadline(lambda token, text: seen.append(token), 0.2)
    on_token(1, "a")
    time.sleep(0.3)
    with pytest.raises(request_limits.RequestTimeout, match="max_request_s"):
        on_token(2, "ab")
    assert seen == [1] and request_limits.with_deadline(None, 0.0) is None


def test_shutting_down_ends_generation_at_the_next_token():
    seen, shutting_down = [], threading.Event()
    on_token = request_limits.until(shutting_down, lambda token, text: seen.append(token))
    on_token(1, "a")
    shutting_down.set()
    with pytest.raises(request_limits.ShuttingDown, match="shutting down"):
        on_token(2, "ab")
    assert seen == [1]
