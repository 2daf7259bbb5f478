"""CI runs the launch_testing tests of sim.launch.py and sim_cameras.launch.py with the
`launch_test` command (its pytest plugin breaks pytest 9, so it cannot run in this pytest
process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(500)]

LAUNCH_TEST = Path(sys.executable).parent / "launch_test"
LAUNCH_TESTS = Path(__file__).with_name("launch_tests")
# test file -> a test it must have run
CASES = {
    "sim_launch.py": "test_active_answers_and_reports",               # target_frame:=base_link, /tf
    "sim_cameras_launch.py": "test_one_node_answers_each_camera",     # three cameras, one node
}


@pytest.mark.parametrize("test_file", sorted(CASES))
def test_launch_test_passes(test_file, tmp_path):
    assert LAUNCH_TEST.is_file(), f"{LAUNCH_TEST} is missing: run make setup (ros_ws/build.sh)"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=f"{LAUNCH_TEST.parent}{os.pathsep}{os.environ['PATH']}",
               AMENT_PREFIX_PATH=os.pathsep.join(filter(None, [sys.prefix, os.environ.get("AMENT_PREFIX_PATH")])))
    out = subprocess.run([sys.executable, str(LAUNCH_TEST), str(LAUNCH_TESTS / test_file),
                          "--junit-xml", str(tmp_path / "launch_test.xml")],
                         capture_output=True, text=True, timeout=480, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert CASES[test_file] in log and "process has finished cleanly" in log
    assert (tmp_path / "launch_test.xml").is_file()
