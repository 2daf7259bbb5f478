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


# -- generate_launch_description() against the launch_ros API, recorded ---------------
class _Recorded:
    """Stands in for a launch / launch_ros class: keeps its keyword arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _recorder(name: str) -> type:
    return type(name, (_Recorded,), {})


def _launch_ros_class(name: str, required: tuple[str, ...], allowed: tuple[str, ...]):
    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(required) - set(allowed)
        missing = set(required) - set(kwargs)
        assert not unknown and not missing, (name, unknown, missing)
        _Recorded.__init__(self, **kwargs)
    return type(name, (_Recorded,), {"__init__": __init__})


class _LaunchConfiguration:
    """launch.substitutions.LaunchConfiguration, with values set by the test."""

    values: dict[str, str] = {}

    def __init__(self, name: str):
        self.name = name

    def perform(self, context) -> str:
        return self.values.get(self.name, "")


NODE_KWARGS = ("package", "executable", "name", "namespace", "exec_name", "parameters",
               "remappings", "ros_arguments", "arguments", "output", "respawn")


@pytest.fixture
def recorded_launch(monkeypatch):
    """Modules named like launch / launch_ros whose classes record how they are built,
    with the keyword names of launch_ros 0.26 (Jazzy), which cannot be installed here."""
    names = {
        "launch": {"LaunchDescription": _recorder("LaunchDescription")},
        "launch.actions": {n: _recorder(n) for n in ("DeclareLaunchArgument", "OpaqueFunction",
                                                      "EmitEvent", "RegisterEventHandler")},
        "launch.events": {"matches_action": lambda action: ("matches", action)},
        "launch.substitutions": {"LaunchConfiguration": _LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {
            "Node": _launch_ros_class("Node", ("executable",), NODE_KWARGS),
            "LifecycleNode": _launch_ros_class("LifecycleNode", ("name", "namespace", "executable"),
                                               NODE_KWARGS)},
        "launch_ros.event_handlers": {"OnStateTransition": _recorder("OnStateTransition")},
        "launch_ros.events": {},
        "launch_ros.events.lifecycle": {"ChangeState": _recorder("ChangeState")},
    }
    for module_name, members in names.items():
        module = types.ModuleType(module_name)
        module.__dict__.update(members)
        monkeypatch.setitem(sys.modules, module_name, module)
    return names


@pytest.mark.parametrize("graph_name", sorted(LAUNCH_FILES))
def test_generate_launch_description_builds_the_graph(recorded_launch, graph_name, tmp_path,
                                                    monkeypatch):
    lifecycle_msgs = pytest.importorskip("lifecycle_msgs.msg")
    description = load_launch_file(LAUNCH_FILES[graph_name]).generate_launch_description()
    declare, opaque = description.args[0]
    assert declare.args[0] == "params_file"

    user = tmp_path / "user.yaml"
    user.write_text("refvlm_node:\n  ros__parameters: {}\n")
    monkeypatch.setattr(_LaunchConfiguration, "values", {"params_file": str(user)})
    actions = opaque.kwargs["function"](None)

    graph = graph_module.load_graph(graph_name, params_file=user)
    nodes = [a for a in actions if type(a).__name__ in ("Node", "LifecycleNode")]
    assert [a.kwargs["name"] for a in nodes] == [spec.name for spec in graph.nodes]
    for action, spec in zip(nodes, graph.nodes):
        assert type(action).__name__ == ("LifecycleNode" if spec.lifecycle else "Node")
        assert action.kwargs["executable"] == spec.executable
        assert action.kwargs["remappings"] == list(spec.remappings)
        assert action.kwargs["parameters"][:len(spec.params_files)] == [str(p) for p in spec.params_files]
    transitions = [a.kwargs["event"].kwargs["transition_id"] for a in actions
                   if type(a).__name__ == "EmitEvent"]
    lifecycle_count = sum(spec.lifecycle for spec in graph.nodes)
    assert transitions == [lifecycle_msgs.Transition.TRANSITION_CONFIGURE] * lifecycle_count


# -- what `refvlm bringup` instantiates is what the launch files describe -------------
@pytest.mark.ros
@pytest.mark.parametrize("graph_name", sorted(LAUNCH_FILES))
def test_bringup_instantiates_what_the_launch_file_describes(graph_name, tmp_path):
    pytest.importorskip("refvlm_ros.node")
    from refvlm_ros.bringup import Bringup

    # The camera graph ships the trained nano model; the tiny preset keeps this test fast,
    # and exercises the user params file (`params_file:=` / `--params`) on the way.
    user = tmp_path / "user.yaml"
    user.write_text("refvlm_node:\n  ros__parameters:\n    model_preset: tiny\n    model_path: ''\n"
                    "sim_camera:\n  ros__parameters:\n    width: 64\n    height: 48\n")
    described = load_launch_file(LAUNCH_FILES[graph_name]).graph_spec(str(user))
    with Bringup(described, num_threads=2) as bringup:
        assert sorted(bringup.nodes) == sorted(spec.name for spec in described.nodes)
        for spec in described.nodes:
            node = bringup.node(spec.name)
            assert node.get_name() == spec.name
            assert node.get_namespace() == (spec.namespace or "/")
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
