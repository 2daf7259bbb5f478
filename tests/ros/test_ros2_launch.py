"""`ros2 launch refvlm_bringup ...` as a user runs it: the real `ros2` command of the venv (make
setup installs launch, launch_ros and ros2cli, and registers the packages in the ament
index), the launch files' arguments, the graph over DDS, and Ctrl-C shutting it down.
This process is the client (real rclpy node)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ros_client import scaled
from test_node import Client

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]

BIN = Path(sys.executable).parent
ROS2 = BIN / "ros2"


def ros2_launch(log: Path, *arguments: str):
    if not ROS2.is_file():
        pytest.fail(f"{ROS2} is missing: run make setup (ros_ws/build.sh installs the ros2 command)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               AMENT_PREFIX_PATH=os.pathsep.join(filter(None, [sys.prefix, os.environ.get("AMENT_PREFIX_PATH")])))
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROS2), "launch", "refvlm_bringup", *arguments],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_default_signals)
    process.log = log
    return process


def _default_signals() -> None:
    """In the child before exec: Ctrl-C and SIGTERM delivered and handled by default, whatever
    the test process inherited or set (both are inherited across exec)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def child_pids(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"process started with pid \[(\d+)\]", log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def interrupt_and_check_clean(process) -> None:
    children = child_pids(process.log)
    assert children, process.log.read_text()[-3000:]
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=scaled(60))
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("ros2 launch did not exit on Ctrl-C: " + process.log.read_text()[-3000:])
    log = process.log.read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert not [pid for pid in children if alive(pid)], log[-3000:]
    assert log.count("process has finished cleanly") == len(children), log[-3000:]


def stop(process) -> None:
    """After a failed test: Ctrl-C, then kill what is left, the launched nodes included
    (killing `ros2 launch` alone would orphan them)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in child_pids(process.log):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def wait_for_state(client, wanted: str, timeout: float, process) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while client.state(timeout=timeout) != wanted:
        assert time.monotonic() < deadline and process.poll() is None, process.log.read_text()[-3000:]
        time.sleep(0.5)


def test_ros2_launch_sim_brings_up_the_graph_answers_and_shuts_down(tmp_path):
    namespace = "sim_test"
    process = ros2_launch(tmp_path / "launch.log", "sim.launch.py", f"namespace:={namespace}",
                          "use_sim_time:=false", "model_preset:=tiny")
    client = Client(node=f"{namespace}/refvlm_node")
    try:
        assert client.get_state.wait_for_service(timeout_sec=scaled(120)), process.log.read_text()[-3000:]
        wait_for_state(client, "active", 120, process)
        client.wait_for(lambda: client.diagnostics.get("frames_received", "0") != "0", 60,
                        "frames from the sim camera")
        reply = client.ask("where is the red cube?", timeout=60)
        assert reply.success, reply.error
        assert reply.result.header.frame_id == "sim_camera_optical_frame"
        assert (reply.result.image_height, reply.result.image_width) == (240, 320)
        client.wait_for(lambda: int(client.diagnostics.get("queries", "0")) >= 1, 10, "query count")
        assert client.diagnostics["state"] == "active"
        interrupt_and_check_clean(process)
    finally:
        client.close()
        stop(process)


def test_ros2_launch_camera_graph_on_a_test_camera_with_arguments(tmp_path):
    """refvlm.launch.py on topics named by launch arguments, a params file, and
    autostart:=false (a lifecycle manager brings the node up)."""
    params = tmp_path / "params.yaml"
    params.write_text("refvlm_node:\n  ros__parameters:\n    model_path: ''\n    rate_hz: 5.0\n")
    process = ros2_launch(tmp_path / "launch.log", "refvlm.launch.py", f"params_file:={params}",
                          "model_preset:=tiny", "autostart:=false", "image_topic:=/image",
                          "depth_topic:=/depth", "camera_info_topic:=/camera_info")
    client = Client()
    try:
        assert client.get_state.wait_for_service(timeout_sec=scaled(120)), process.log.read_text()[-3000:]
        # With autostart:=false the launch sends no transition, and the node's own autostart
        # would run before its executor answers: the first state it answers is what it keeps.
        assert client.state() == "unconfigured"
        client.transition("configure")
        client.transition("activate")
        client.start_camera(15.0)
        client.wait_for(lambda: client.diagnostics.get("frames_received", "0") != "0", 60, "frames")
        reply = client.ask("where is the red cube?", timeout=60)
        assert reply.success, reply.error
        assert reply.result.header.frame_id == "camera_optical"
        assert (reply.result.header.stamp.sec, reply.result.header.stamp.nanosec) in client.stamps
        interrupt_and_check_clean(process)
    finally:
        client.close()
        stop(process)


def ros2(*arguments: str, retries: int = 5) -> str:
    """Runs a `ros2` command (no daemon: none is left behind); retried while discovery
    has not yet seen the node. Its output."""
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix)
    for _ in range(retries):
        out = subprocess.run([sys.executable, str(ROS2), *arguments], capture_output=True,
                             text=True, timeout=90, env=env)
        if out.returncode == 0:
            return out.stdout
        time.sleep(1.0)
    raise AssertionError(f"ros2 {' '.join(arguments)} failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")


def test_ros2_command_line_drives_the_launched_graph(tmp_path):
    """What a user types: lifecycle set, param get, service call, action send_goal, topic echo."""
    process = ros2_launch(tmp_path / "launch.log", "sim.launch.py", "autostart:=false")
    try:
        node = "/refvlm_node"
        assert "unconfigured" in ros2("lifecycle", "get", "--no-daemon", node, retries=60)
        for transition in ("configure", "activate"):
            assert "Transitioning successful" in ros2("lifecycle", "set", "--no-daemon", node, transition)
        assert "active" in ros2("lifecycle", "get", "--no-daemon", node)
        assert "String value is: tiny" in ros2("param", "get", "--no-daemon", node, "model_preset")
        reply = ros2("service", "call", f"{node}/query", "refvlm_interfaces/srv/Query",
                     "{prompt: 'where is the red cube?'}")
        assert "success=True" in reply and "sim_camera_optical_frame" in reply
        goal = ros2("action", "send_goal", f"{node}/ground", "refvlm_interfaces/action/Ground",
                    "{prompt: 'where is the red cube?'}")
        assert "SUCCEEDED" in goal
        diagnostics = ros2("topic", "echo", "--once", "--no-daemon", "/diagnostics",
                           "diagnostic_msgs/msg/DiagnosticArray")
        assert "refvlm_node: inference" in diagnostics
        interrupt_and_check_clean(process)
    finally:
        stop(process)


def test_ros2_command_line_tools_work_in_the_venv():
    for command in (["pkg", "prefix", "refvlm"], ["pkg", "executables", "refvlm_ros"],
                    ["interface", "show", "refvlm_interfaces/srv/Query"]):
        out = subprocess.run([sys.executable, str(ROS2), *command], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, AMENT_PREFIX_PATH=sys.prefix))
        assert out.returncode == 0, (command, out.stderr[-2000:])
    assert shutil.which("ros2", path=str(BIN))
