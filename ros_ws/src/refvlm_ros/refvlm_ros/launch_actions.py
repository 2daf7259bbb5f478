"""GraphSpec -> ROS 2 launch actions, for launch/*.launch.py.

`launch` and `launch_ros` come with a ROS install (apt), not from PyPI, so they are
imported inside the functions: importing this module needs neither.
"""
from __future__ import annotations

from refvlm_ros.graph import GraphSpec, NodeSpec

PARAMS_FILE_ARGUMENT = "params_file"


def node_parameters(spec: NodeSpec) -> list:
    """launch_ros `parameters=`: the files in order, then the inline dict."""
    parameters: list = [str(path) for path in spec.params_files]
    if spec.parameters:
        parameters.append(dict(spec.parameters))
    return parameters


def node_actions(spec: NodeSpec) -> list:
    """A Node, or a LifecycleNode that is configured then activated when it comes up."""
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

    def change_state(transition_id: int):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                           transition_id=transition_id))

    activate_when_inactive = RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, goal_state="inactive",
        entities=[change_state(Transition.TRANSITION_ACTIVATE)]))
    return [node, activate_when_inactive, change_state(Transition.TRANSITION_CONFIGURE)]


def launch_description(load_graph_spec, default_params_file: str = ""):
    """A LaunchDescription with a `params_file` argument; the graph is loaded at launch
    time by `load_graph_spec(params_file_or_None) -> GraphSpec`."""
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration

    def build(context) -> list:
        params_file = LaunchConfiguration(PARAMS_FILE_ARGUMENT).perform(context)
        graph: GraphSpec = load_graph_spec(params_file or None)
        return [action for spec in graph.nodes for action in node_actions(spec)]

    return LaunchDescription([
        DeclareLaunchArgument(PARAMS_FILE_ARGUMENT, default_value=default_params_file,
                              description="extra ROS parameter file, applied after the "
                                          "graph's own (keys: node names)"),
        OpaqueFunction(function=build),
    ])
