"""The node graph as data: launch files, graph file and `refvlm bringup` agree."""
from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from refvlm_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO / "launch"
LAUNCH_FILES = {"sim": LAUNCH_DIR / "sim.launch.py", "camera": LAUNCH_DIR / "refvlm.launch.py"}

graph_module = pytest.importorskip("refvlm_ros.graph")
from refvlm_ros.bringup_command import parse_launch_arguments  # noqa: E402 (after the skip)


def load_launch_file(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("graph_name", sorted(LAUNCH_FILES))
def test_launch_file_imports_no_ros_launch_at_module_level(graph_name):
    """A robot has `launch`; this machine does not: only stdlib at the top level."""
    tree = ast.parse(LAUNCH_FILES[graph_name].read_text())
    top_imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = {alias.name.split(".")[0] for node in top_imports if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in top_imports if isinstance(node, ast.ImportFrom)}
    assert modules <= set(sys.stdlib_module_names), modules
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"generate_launch_description", "graph_spec"} <= functions


@pytest.mark.parametrize("graph_name", sorted(LAUNCH_FILES))
def test_launch_file_reads_the_graph_file(graph_name):
    launched = load_launch_file(LAUNCH_FILES[graph_name]).graph_spec()
    assert launched == graph_module.load_graph(graph_name)
    assert launched.name == graph_name == load_launch_file(LAUNCH_FILES[graph_name]).GRAPH_NAME
    for spec in launched.nodes:
        assert spec.package == "refvlm_ros"
        assert all(path.is_file() for path in spec.params_files)


def test_graphs_wire_the_sim_camera_into_the_node():
    sim = graph_module.load_graph("sim")
    node = sim.node("refvlm_node")
    camera = sim.node("sim_camera")
    assert node.lifecycle and not camera.lifecycle
    remaps = dict(node.remappings)
    for topic in ("image", "depth", "camera_info"):
        assert remaps[topic] == f"/{camera.name}/{topic}"
    assert graph_module.file_parameters(camera)["rate_hz"] > 0


def test_user_params_file_comes_last(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("sim_camera:\n  ros__parameters:\n    rate_hz: 2.5\n")
    spec = graph_module.load_graph("sim", params_file=user).node("sim_camera")
    assert spec.params_files[-1] == user.resolve()
    assert graph_module.file_parameters(spec)["rate_hz"] == 2.5
    args = spec.ros_args()
    assert args[:3] == ["--ros-args", "-r", "__node:=sim_camera"]
    assert args[-2:] == ["--params-file", str(user.resolve())]


@pytest.mark.parametrize("content, message", [
    ("graphs: {sim: {nodes: []}}", "no nodes"),
    ("graphs: {sim: {nodes: [{name: a, package: p, executable: e}]}}", "node_class"),
    ("graphs: [", "not valid YAML"),
])
def test_bad_graph_files_say_what_is_wrong(tmp_path, content, message):
    graph_file = tmp_path / "graph.yaml"
    graph_file.write_text(content)
    with pytest.raises(ConfigError, match=message):
        graph_module.load_graph("sim", graph_file)


def test_unknown_graph_and_missing_params_file():
    with pytest.raises(ConfigError, match="choose one of"):
        graph_module.load_graph("moon")
    with pytest.raises(ConfigError, match="does not exist"):
        graph_module.load_graph("sim", params_file="no/such/file.yaml")


# -- generate_launch_description() with the real launch / launch_ros -------------------
def launched_actions(graph_name: str, arguments: dict[str, str]) -> list:
    """The actions the launch file's OpaqueFunction returns for these launch arguments."""
    launch = pytest.importorskip("launch")
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    description = load_launch_file(LAUNCH_FILES[graph_name]).generate_launch_description()
    context = launch.LaunchContext()
    context.launch_configurations.update(arguments)
    declared = [e for e in description.entities if isinstance(e, DeclareLaunchArgument)]
    for argument in declared:
        argument.execute(context)  # fills in the defaults
    names = {argument.name for argument in declared}
    assert {"params_file", "autostart", "namespace", "model_path", "model_preset", "device",
            "runtime", "image_topic", "depth_topic", "camera_info_topic", "use_sim_time"} <= names
    [opaque] = [e for e in description.entities if isinstance(e, OpaqueFunction)]
    return opaque.execute(context), context


def remappings_of(action, context) -> list[tuple[str, str]]:
    from launch.utilities import perform_substitutions
    return [(perform_substitutions(context, list(a)), perform_substitutions(context, list(b)))
            for a, b in action._Node__remappings]  # noqa: SLF001 (launch_ros keeps them private)


@pytest.mark.parametrize("graph_name", sorted(LAUNCH_FILES))
@pytest.mark.parametrize("autostart", ["true", "false"])
def test_generate_launch_description_builds_the_graph(graph_name, autostart, tmp_path):
    lifecycle_msgs = pytest.importorskip("lifecycle_msgs.msg")
    from launch.actions import EmitEvent
    from launch_ros.actions import LifecycleNode, Node

    user = tmp_path / "user.yaml"
    user.write_text("refvlm_node:\n  ros__parameters: {}\n")
    arguments = {"params_file": str(user), "autostart": autostart, "namespace": "robot1",
                 "image_topic": "/my_camera/image"}
    actions, context = launched_actions(graph_name, arguments)
    graph = graph_module.with_arguments(graph_module.load_graph(graph_name, params_file=user), arguments)
    nodes = [a for a in actions if isinstance(a, Node)]
    assert [a.node_executable for a in nodes] == [spec.executable for spec in graph.nodes]
    for action, spec in zip(nodes, graph.nodes):
        assert isinstance(action, LifecycleNode) == spec.lifecycle
        assert action.node_package == spec.package
        assert remappings_of(action, context) == list(spec.remappings)
        assert spec.namespace == "robot1"
    transitions = [a.event.transition_id for a in actions if isinstance(a, EmitEvent)]
    lifecycle_count = sum(spec.lifecycle for spec in graph.nodes)
    expected = [lifecycle_msgs.Transition.TRANSITION_CONFIGURE] * lifecycle_count
    assert transitions == (expected if autostart == "true" else [])


def test_launch_arguments_apply_to_the_perception_node_and_the_namespace_to_all():
    graph = graph_module.load_graph("sim")
    changed = graph_module.with_arguments(graph, {
        "namespace": "/robot1/", "model_path": "models/x", "device": "cuda", "use_sim_time": "true",
        "image_topic": "/cam/image", "model_preset": "", "runtime": ""})
    camera, node = changed.node("sim_camera"), changed.node("refvlm_node")
    assert camera.namespace == node.namespace == "robot1"
    assert camera.parameters == {"use_sim_time": True}
    assert node.parameters == {"use_sim_time": True, "model_path": "models/x", "device": "cuda"}
    remaps = dict(node.remappings)
    assert remaps["image"] == "/cam/image"                       # a user's topic is taken as given
    assert remaps["depth"] == "/robot1/sim_camera/depth"         # the graph's wiring moves along
    assert graph_module.with_arguments(graph, {}) == graph
    with pytest.raises(ConfigError, match="use_sim_time"):
        graph_module.with_arguments(graph, {"use_sim_time": "maybe"})


def test_bringup_arguments_are_the_launch_arguments():
    assert parse_launch_arguments(["model_preset:=tiny", "image_topic:=/a/b"]) == {
        "model_preset": "tiny", "image_topic": "/a/b"}
    for bad in ("autostart:=true", "model_preset=tiny", "nosuch:=1"):
        with pytest.raises(ConfigError, match="NAME:=VALUE"):
            parse_launch_arguments([bad])


# -- what `refvlm bringup` instantiates is what the launch files describe -------------
@pytest.mark.ros
@pytest.mark.parametrize("graph_name", sorted(LAUNCH_FILES))
def test_bringup_instantiates_what_the_launch_file_describes(graph_name, tmp_path):
    pytest.importorskip("refvlm_ros.node")
    from refvlm_ros.bringup import Bringup

    # The camera graph ships the trained nano model; the tiny preset keeps this test fast,
    # and exercises the user params file (`params_file:=` / `--params`) on the way.
    user = tmp_path / "user.yaml"
    # Keyed /**/NAME: a section keyed by the bare node name applies only outside a namespace.
    user.write_text("/**/refvlm_node:\n  ros__parameters:\n    model_preset: tiny\n    model_path: ''\n"
                    "/**/sim_camera:\n  ros__parameters:\n    width: 64\n    height: 48\n")
    described = graph_module.with_arguments(
        load_launch_file(LAUNCH_FILES[graph_name]).graph_spec(str(user)),
        parse_launch_arguments(["namespace:=bringup_test", "use_sim_time:=false"]))
    with Bringup(described, num_threads=2) as bringup:
        assert sorted(bringup.nodes) == sorted(spec.name for spec in described.nodes)
        for spec in described.nodes:
            node = bringup.node(spec.name)
            assert node.get_name() == spec.name
            assert node.get_namespace() == "/bringup_test" == f"/{spec.namespace}"
            expected = graph_module.file_parameters(spec)
            assert expected, spec.name
            for name, value in expected.items():
                assert node.has_parameter(name), f"{spec.name} does not declare '{name}'"
                assert node.get_parameter(name).value == value, name
            for source, target in spec.remappings:
                assert node.resolve_topic_name(source) == target
        node = bringup.node("refvlm_node")
        assert node.get_parameter("model_preset").value == "tiny"
        assert node.active  # configured and activated


def test_readme_launch_argument_table_is_generated_from_the_declarations():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert graph_module.launch_arguments_table() in readme, \
        "regenerate the README's launch argument table with refvlm_ros.graph.launch_arguments_table()"


def test_target_frame_argument_reaches_only_the_perception_node():
    graph = graph_module.with_arguments(graph_module.load_graph("sim"), {"target_frame": "base_link"})
    assert graph.node("refvlm_node").parameters["target_frame"] == "base_link"
    assert "target_frame" not in graph.node("sim_camera").parameters


def test_the_three_camera_graph_feeds_each_camera_of_one_node():
    graph = graph_module.load_graph("sim_cameras")
    node = graph.node("refvlm_node")
    cameras = node.parameters["cameras"].split(",")
    assert {f"{camera}/{topic}": f"/sim_{camera}/{topic}" for camera in cameras
            for topic in ("image", "camera_info", "depth")} == dict(node.remappings)
    assert sorted(spec.name for spec in graph.nodes if spec.executable == "refvlm_sim") == \
        sorted(f"sim_{camera}" for camera in cameras)
