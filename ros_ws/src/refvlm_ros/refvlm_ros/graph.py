"""The node graph as data: `launch/graph.yaml` read into `GraphSpec`s.

The ROS 2 launch files (launch/*.launch.py) and `refvlm bringup` both build their nodes
from these specs, so a robot started with `ros2 launch` and a laptop started with
`refvlm bringup` run the same nodes with the same names, parameters and remappings.
This module imports neither rclpy nor launch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refvlm_core.errors import ConfigError

GRAPH_FILE_NAME = "graph.yaml"
SHARE_LAUNCH_DIR = Path("share") / "refvlm_bringup" / "launch"  # where refvlm_bringup installs launch/


@dataclass(frozen=True)
class NodeSpec:
    """One node of a graph, as launch_ros.actions.Node would be given it."""

    name: str
    package: str
    executable: str
    node_class: str                      # "module:Class" for in-process bringup
    namespace: str = ""
    lifecycle: bool = False
    params_files: tuple[Path, ...] = ()  # absolute, applied in order
    parameters: dict[str, Any] = field(default_factory=dict)  # applied after the files
    remappings: tuple[tuple[str, str], ...] = ()

    def ros_args(self) -> list[str]:
        """The `--ros-args` that `ros2 run` would get: name, namespace, remaps, files.

        Inline parameters are not included: bringup passes them as typed overrides."""
        args = ["--ros-args", "-r", f"__node:={self.name}"]
        if self.namespace:
            args += ["-r", f"__ns:=/{self.namespace.strip('/')}"]
        for source, target in self.remappings:
            args += ["-r", f"{source}:={target}"]
        for params_file in self.params_files:
            args += ["--params-file", str(params_file)]
        return args


@dataclass(frozen=True)
class GraphSpec:
    name: str
    description: str
    nodes: tuple[NodeSpec, ...]

    def node(self, name: str) -> NodeSpec:
        for spec in self.nodes:
            if spec.name == name:
                return spec
        raise ConfigError(f"graph '{self.name}' has no node '{name}'; "
                          f"it has {[spec.name for spec in self.nodes]}")


def checkout_root() -> Path | None:
    """The repository root when this module runs from a source checkout, else None."""
    parents = Path(__file__).resolve().parents  # refvlm_ros/, refvlm_ros pkg, src, ros_ws, root
    if len(parents) > 4 and (parents[3] / "src" / "refvlm_ros").is_dir():
        return parents[4]
    return None


def default_graph_file() -> Path:
    """launch/graph.yaml of a source checkout, else of an installed share/refvlm_bringup/launch."""
    root = checkout_root()
    candidates = [root / "launch" / GRAPH_FILE_NAME] if root else []
    prefixes = [sys.prefix] + os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)
    candidates += [Path(p) / SHARE_LAUNCH_DIR / GRAPH_FILE_NAME for p in prefixes if p]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"cannot find {GRAPH_FILE_NAME}; looked in {[str(c) for c in candidates]}. "
        "Run from a source checkout or install the refvlm package (make setup).")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def graph_names(graph_file: Path | None = None) -> list[str]:
    graph_file = Path(graph_file) if graph_file else default_graph_file()
    return sorted(_read_yaml(graph_file).get("graphs", {}))


def _node_spec(entry: dict, base_dir: Path, extra_params: tuple[Path, ...]) -> NodeSpec:
    required = ("name", "package", "executable", "node_class")
    missing = [key for key in required if not entry.get(key)]
    if missing:
        raise ConfigError(f"node entry {entry} lacks {missing} in the graph file")
    params_files = tuple((base_dir / f).resolve() for f in entry.get("params_files") or ())
    for params_file in params_files:
        if not params_file.is_file():
            raise ConfigError(f"node '{entry['name']}' names params file {params_file}, "
                              "which does not exist")
    remappings = entry.get("remappings") or {}
    return NodeSpec(
        name=str(entry["name"]),
        package=str(entry["package"]),
        executable=str(entry["executable"]),
        node_class=str(entry["node_class"]),
        namespace=str(entry.get("namespace") or ""),
        lifecycle=bool(entry.get("lifecycle", False)),
        params_files=params_files + extra_params,
        parameters=dict(entry.get("parameters") or {}),
        remappings=tuple((str(k), str(v)) for k, v in remappings.items()),
    )


def load_graph(name: str, graph_file: Path | str | None = None,
               params_file: Path | str | None = None) -> GraphSpec:
    """The graph `name` of the graph file. `params_file` (a user's ROS parameter file,
    keyed by node name) is applied to every node after the graph's own files, as the
    launch files' `params_file` argument is."""
    graph_file = Path(graph_file) if graph_file else default_graph_file()
    graphs = _read_yaml(graph_file).get("graphs") or {}
    if name not in graphs:
        raise ConfigError(f"no graph '{name}' in {graph_file}; choose one of {sorted(graphs)}")
    extra: tuple[Path, ...] = ()
    if params_file:
        params_path = Path(params_file).resolve()
        _read_yaml(params_path)  # fail early, with the file's name, on a bad file
        extra = (params_path,)
    entry = graphs[name]
    nodes = tuple(_node_spec(node, graph_file.parent, extra) for node in entry.get("nodes", ()))
    if not nodes:
        raise ConfigError(f"graph '{name}' in {graph_file} has no nodes")
    names = [spec.name for spec in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"graph '{name}' has duplicate node names {names}")
    return GraphSpec(name=name, description=str(entry.get("description", "")), nodes=nodes)


# Launch arguments (`ros2 launch refvlm_bringup sim.launch.py name:=value`), as peers name them.
# An empty value keeps what the graph and its params files say.
PERCEPTION_EXECUTABLE = "refvlm_node"
NODE_PARAMETER_ARGUMENTS = {
    "model_path": "folder of a saved model (config + weights); overrides model_preset",
    "model_preset": "model preset (tiny, nano, paper) used when model_path is empty",
    "device": "torch device of the model: cpu, cuda, cuda:1 ...",
    "runtime": "what runs the encoders, projector and decoders: torch, onnxruntime, tensorrt, auto",
    "target_frame": "frame of the perception node's 3D positions (tf2), e.g. base_link",
}
TOPIC_ARGUMENTS = {
    "image_topic": ("image", "camera image topic of the perception node"),
    "depth_topic": ("depth", "aligned depth topic of the perception node"),
    "camera_info_topic": ("camera_info", "CameraInfo topic of the perception node"),
}
GRAPH_ARGUMENTS = {
    "namespace": "namespace of every node (absolute remapped topics move under it too)",
    "use_sim_time": "true / false: every node uses /clock (empty: the nodes' default)",
    **NODE_PARAMETER_ARGUMENTS,
    **{name: text for name, (_, text) in TOPIC_ARGUMENTS.items()},
}


# Arguments of the launch files themselves (not applied to the graph's nodes): name ->
# (default, description).
LAUNCH_FILE_ARGUMENTS = {
    "params_file": ("", "extra ROS parameter file, applied after the graph's own (keys: node names)"),
    "autostart": ("true", "configure and activate lifecycle nodes at start "
                          "(false: leave them to a lifecycle manager)"),
}


def launch_arguments_table() -> str:
    """The README's launch argument table, generated from the declarations above."""
    rows = ["| launch argument | default | description |", "|---|---|---|"]
    rows += [f"| `{name}` | `{default!r}` | {text} |" for name, (default, text) in LAUNCH_FILE_ARGUMENTS.items()]
    rows += [f"| `{name}` | `''` (the graph's) | {text} |" for name, text in GRAPH_ARGUMENTS.items()]
    return "\n".join(rows)


def bool_argument(name: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"launch argument {name}:={value!r}: use true or false")


def _namespaced(target: str, namespace: str) -> str:
    return f"/{namespace}{target}" if namespace and target.startswith("/") else target


def _with_node_arguments(spec: NodeSpec, arguments: dict[str, str]) -> NodeSpec:
    namespace = (arguments.get("namespace") or spec.namespace).strip("/")
    parameters = dict(spec.parameters)
    if arguments.get("use_sim_time"):
        parameters["use_sim_time"] = bool_argument("use_sim_time", arguments["use_sim_time"])
    remappings = dict(spec.remappings)
    if arguments.get("namespace"):  # the graph's own wiring moves with its nodes
        remappings = {k: _namespaced(v, namespace) for k, v in remappings.items()}
    if spec.executable == PERCEPTION_EXECUTABLE:
        parameters.update({k: arguments[k] for k in NODE_PARAMETER_ARGUMENTS if arguments.get(k)})
        remappings.update({source: arguments[k] for k, (source, _) in TOPIC_ARGUMENTS.items()
                           if arguments.get(k)})
    return dataclasses.replace(spec, namespace=namespace, parameters=parameters,
                               remappings=tuple(remappings.items()))


def with_arguments(graph: GraphSpec, arguments: dict[str, str]) -> GraphSpec:
    """The graph with launch arguments applied (names of GRAPH_ARGUMENTS; empty values
    and unknown names are ignored): what `ros2 launch` and `refvlm bringup` both run."""
    nodes = tuple(_with_node_arguments(spec, arguments) for spec in graph.nodes)
    return dataclasses.replace(graph, nodes=nodes)


def file_parameters(spec: NodeSpec) -> dict[str, Any]:
    """The parameters the node's params files give it, later files winning, then the
    inline parameters: what the node should end up with. Sections match as in rcl: by
    fully qualified name (leading slash optional), `/**` and `/**/name`."""
    merged: dict[str, Any] = {}
    namespace = "/" + spec.namespace.strip("/") if spec.namespace.strip("/") else ""
    fqn = f"{namespace}/{spec.name}"
    for params_file in spec.params_files:
        data = _read_yaml(params_file)
        for key in ("/**", f"/**/{spec.name}", fqn, fqn.lstrip("/")):
            section = data.get(key) or {}
            merged.update(_flatten(section.get("ros__parameters") or {}))
    merged.update(_flatten(spec.parameters))
    return merged


def _flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """Nested YAML parameters to ROS dotted names ({a: {b: 1}} -> {'a.b': 1})."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
