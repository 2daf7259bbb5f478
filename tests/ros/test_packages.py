"""The ROS packages declare what they need, and the venv needs nothing but activating:

- every package.xml lists what its code imports at run time (the imports found by
  parsing the code, mapped to ROS package names and rosdep keys);
- refvlm_bringup (launch files, graph, params) depends on refvlm_ros, which depends on
  the library (refvlm) and the interfaces; nothing depends back (colcon refuses cycles);
- after `make setup`, `source .venv/bin/activate` is enough for `ros2 pkg` / `ros2 launch`
  to find the packages (AMENT_PREFIX_PATH)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "ros_ws" / "src"
# Python import name -> the ROS package or rosdep key that provides it (where they differ).
PROVIDER = {
    "refvlm_core": "refvlm", "refvlm_simworld": "refvlm", "refvlm_export": "refvlm",
    "refvlm_training": "refvlm", "refvlm_cli": "refvlm",
    "tf2_ros": "tf2_ros_py", "numpy": "python3-numpy", "yaml": "python3-yaml",
    "cv2": "python3-opencv", "scipy": "python3-scipy", "tqdm": "python3-tqdm",
}
LIBRARY_FOLDERS = ("refvlm_core", "simworld", "training", "export")  # no ROS imports at all
ROS_MODULES = ("rclpy", "launch", "launch_ros", "tf2_ros", "refvlm_ros", "refvlm_interfaces")


def imported_roots(files) -> set[str]:
    """Top-level modules imported anywhere in ``files`` (also inside functions), without the
    standard library."""
    roots = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots - set(sys.stdlib_module_names)


def exec_depends(package_xml: Path) -> set[str]:
    root = ET.parse(package_xml).getroot()
    return {e.text.strip() for tag in ("exec_depend", "depend") for e in root.findall(tag)}


def test_each_package_xml_lists_what_its_code_imports():
    node_code = imported_roots((SRC / "refvlm_ros" / "refvlm_ros").glob("*.py")) - {"refvlm_ros"}
    needed = {PROVIDER.get(name, name) for name in node_code}
    missing = needed - exec_depends(SRC / "refvlm_ros" / "package.xml")
    assert not missing, f"refvlm_ros imports {sorted(missing)} without an exec_depend in its package.xml"

    launch_code = imported_roots((REPO / "launch").rglob("*.py"))
    assert launch_code <= {"refvlm_ros"}, launch_code  # the launch files go through refvlm_ros
    bringup = exec_depends(SRC / "refvlm_bringup" / "package.xml")
    assert {"refvlm_ros", "launch", "launch_ros", "lifecycle_msgs"} <= bringup
    assert "refvlm_bringup" not in exec_depends(SRC / "refvlm_ros" / "package.xml")

    for folder in LIBRARY_FOLDERS:  # refvlm_core and the rest of the library never import ROS
        ros = imported_roots((REPO / folder).rglob("*.py")) & set(ROS_MODULES + ("sensor_msgs", "std_msgs"))
        assert not ros, f"{folder}/ imports {sorted(ros)}"
    library = {PROVIDER.get(name, name) for name in imported_roots(
        p for folder in LIBRARY_FOLDERS for p in (REPO / folder).rglob("*.py"))}
    declared = exec_depends(REPO / "package.xml")
    assert {k for k in library if k.startswith("python3-")} <= declared, library - declared


def test_the_bringup_package_holds_the_launch_files():
    linked = SRC / "refvlm_bringup" / "launch"
    assert linked.resolve() == (REPO / "launch").resolve()
    assert {"sim.launch.py", "refvlm.launch.py", "graph.yaml"} <= {p.name for p in linked.iterdir()}
    share = Path(sys.prefix) / "share" / "refvlm_bringup"
    assert (share / "launch" / "sim.launch.py").is_file(), "run make setup (ros_ws/build.sh registers refvlm_bringup)"
    assert not (Path(sys.prefix) / "share" / "refvlm" / "launch").exists()  # one home for them


def test_activating_the_venv_is_all_ros2_needs():
    env = {k: v for k, v in os.environ.items() if k not in ("AMENT_PREFIX_PATH", "VIRTUAL_ENV")}
    script = (f"source {Path(sys.prefix) / 'bin' / 'activate'} && ros2 pkg prefix refvlm_bringup "
              "&& ros2 pkg executables refvlm_ros")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=100, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.split("\n")
    assert Path(lines[0]).resolve() == Path(sys.prefix).resolve()
    assert "refvlm_ros refvlm_node" in out.stdout and "refvlm_ros refvlm_sim" in out.stdout
