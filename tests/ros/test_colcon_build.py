"""`colcon build` of the workspace's Python packages gives the install layout ROS
expects: ament index entries, launch files and params under share/, executables under
lib/<pkg>/. (refvlm_interfaces, an ament_cmake package, is built by ros_ws/build.sh the
same way colcon builds it.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
COLCON = Path(sys.executable).parent / "colcon"


def test_colcon_build_installs_the_ros_layout(tmp_path):
    assert COLCON.is_file(), f"{COLCON} is missing: run make setup (requirements/ros.txt)"
    source = tmp_path / "src"  # a copy: colcon and setuptools write next to the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "install", "log", "runs", "outputs", "models", "*.egg-info",
        "__pycache__", ".pytest_cache", ".hypothesis"))
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix, PATH=f"{COLCON.parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(
        [str(COLCON), "--log-base", str(tmp_path / "log"), "build", "--base-paths", ".", "ros_ws/src",
         "--packages-ignore", "refvlm_interfaces", "--build-base", str(tmp_path / "build"),
         "--install-base", str(tmp_path / "install")],
        cwd=source, capture_output=True, text=True, timeout=280, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    install = tmp_path / "install"
    for package in ("refvlm", "refvlm_ros", "refvlm_bringup"):
        assert (install / package / "share/ament_index/resource_index/packages" / package).is_file()
        assert (install / package / "share" / package / "package.xml").is_file()
    # package.xml dependencies order the build: refvlm, then refvlm_ros, then refvlm_bringup
    listed = subprocess.run([str(COLCON), "--log-base", str(tmp_path / "log"), "list", "--topological-order",
                             "--names-only", "--base-paths", ".", "ros_ws/src"],
                            cwd=source, capture_output=True, text=True, timeout=60, env=env)
    order = listed.stdout.split()
    assert order.index("refvlm") < order.index("refvlm_ros") < order.index("refvlm_bringup"), order
    assert order.index("refvlm_interfaces") < order.index("refvlm_ros"), order
    launch = install / "refvlm_bringup/share/refvlm_bringup/launch"
    assert {"sim.launch.py", "refvlm.launch.py", "graph.yaml"} <= {p.name for p in launch.iterdir()}
    assert {"sim.yaml", "camera.yaml"} <= {p.name for p in (launch / "params").iterdir()}
    for executable in ("refvlm_node", "refvlm_sim"):
        assert os.access(install / "refvlm_ros/lib/refvlm_ros" / executable, os.X_OK)
    [site] = (install / "refvlm").glob("lib/python*/*-packages")
    for name in ("refvlm_core", "refvlm_simworld", "refvlm_training", "refvlm_export", "refvlm_cli"):
        assert (site / name / "__init__.py").is_file(), f"{name} is not installed by colcon"
