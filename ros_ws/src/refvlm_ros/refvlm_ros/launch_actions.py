"""GraphSpec -> ROS 2 launch actions, for launch/*.launch.py.

`launch` and `launch_ros` come with a ROS install (apt), not from PyPI, so they are
imported inside the functions: importing this module needs neither.
"""
from __future__ import annotations

from refvlm_ros.graph import (GRAPH_ARGUMENTS, LAUNCH_FILE_ARGUMENTS, GraphSpec, NodeSpec, bool_argument,
                               with_arguments)

PARAMS_FILE_ARGUMENT = "params_file"
AUTOSTART_ARGUMENT = "autostart"


def node_parameters(spec: NodeSpec) -> list:
    """launch_ros `parameters=`: the files in order, then the inline dict."""
    parameters: list = [str(path) for path in spec.params_files]
    if spec.parameters:
        parameters.append(dict(spec.parameters))
    return parameters


def node_actions(spec: NodeSpec, autostart: bool = True) -> list:
    """A Node, or a LifecycleNode (configured then activated when it comes up, with
    ``autostart``)."""
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.events import matches_action
    from launch_ros.actions import LifecycleNode, Node
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    common = dict(package=spec.package, executable=spec.executable, name=spec.name,
                  namespace=spec.namespace, parameters=node_parameters(spec),
                  remappings=list(spec.remappings), output="screen")
    if not spec.lifecycle:
        return [Node(**common)]
    node = LifecycleNode(**common)
    if not autostart:
        return [node]

    def change_state(transition_id: int):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                           transition_id=transition_id))

    activate_when_inactive = RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, goal_state="inactive",
        entities=[change_state(Transition.TRANSITION_ACTIVATE)]))
    return [node, activate_when_inactive, change_state(Transition.TRANSITION_CONFIGURE)]


def launch_description(load_graph_spec, default_params_file: str = ""):
    """A LaunchDescription with the graph's launch arguments (params_file, autostart and
    graph.GRAPH_ARGUMENTS); the graph is loaded at launch time by
    `load_graph_spec(params_file_or_None) -> GraphSpec`."""
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration

    def build(context) -> list:
        values = {name: LaunchConfiguration(name).perform(context) for name in GRAPH_ARGUMENTS}
        params_file = LaunchConfiguration(PARAMS_FILE_ARGUMENT).perform(context)
        autostart = bool_argument(AUTOSTART_ARGUMENT, LaunchConfiguration(AUTOSTART_ARGUMENT).perform(context))
        graph: GraphSpec = with_arguments(load_graph_spec(params_file or None), values)
        return [action for spec in graph.nodes for action in node_actions(spec, autostart)]

    defaults = {name: default for name, (default, _) in LAUNCH_FILE_ARGUMENTS.items()}
    defaults[PARAMS_FILE_ARGUMENT] = default_params_file or defaults[PARAMS_FILE_ARGUMENT]
    arguments = [DeclareLaunchArgument(name, default_value=defaults[name], description=text)
                 for name, (_, text) in LAUNCH_FILE_ARGUMENTS.items()]
    arguments += [DeclareLaunchArgument(name, default_value="", description=text)
                  for name, text in GRAPH_ARGUMENTS.items()]
    return LaunchDescription([*arguments, OpaqueFunction(function=build)])
