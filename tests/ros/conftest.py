"""ROS test isolation and skips.

Every test session gets its own ROS domain, localhost-only discovery and a temporary
log folder, set before rclpy is imported, so that parallel runs on one machine (and
the node processes the tests start, which inherit the environment) never cross-talk.
Tests marked ``ros`` are skipped with the reason when rclpy or the built interfaces do
not import (run ``make setup``, which builds them with ros_ws/build.sh).
"""
from __future__ import annotations

import importlib
import os
import signal
import tempfile

import pytest

if "ROS_DOMAIN_ID" not in os.environ:
    os.environ["ROS_DOMAIN_ID"] = str(10 + os.getpid() % 90)
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="refvlm-ros-log-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


_modules_seen = 0


@pytest.fixture(autouse=True)
def _keep_signal_dispositions():
    """Restore SIGINT / SIGTERM handling after each test. Code run in the test process (a
    node's teardown, native libraries) may ignore or block SIGINT, and an ignored or blocked
    signal is inherited by every process a later test starts: `ros2 launch` would then
    never see its Ctrl-C."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the blocked set is inherited too
    yield
    for sig, handler in saved.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture(scope="module", autouse=True)
def _ros_domain_per_module():
    """A fresh ROS domain for every test module: a node left over by one module (or
    still shutting down) can never answer another module's service calls."""
    global _modules_seen
    _modules_seen += 1
    base = int(os.environ.setdefault("REFVLM_TEST_DOMAIN_BASE", os.environ["ROS_DOMAIN_ID"]))
    os.environ["ROS_DOMAIN_ID"] = str(1 + (base + _modules_seen) % 100)
    yield


def _missing_ros() -> str | None:
    for module in ("rclpy", "sensor_msgs.msg", "refvlm_interfaces.msg", "refvlm_ros"):
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 (any import failure means: skip)
            return f"{module} does not import ({error}); run 'make setup' (ros_ws/build.sh)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _scale_timeouts(items)
    ros_items = [item for item in items if item.get_closest_marker("ros")]
    if not ros_items:
        return
    reason = _missing_ros()
    if reason:
        for item in ros_items:
            item.add_marker(pytest.mark.skip(reason=reason))


def _scale_timeouts(items: list[pytest.Item]) -> None:
    """A test's pytest timeout grows with the machine's load like the waits inside it
    (``ros_client.scaled``), so a slow but progressing test is not cut off on busy cores."""
    from ros_client import scaled

    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and marker.args:
            item.add_marker(pytest.mark.timeout(scaled(marker.args[0]), *marker.args[1:], **marker.kwargs),
                            append=False)
