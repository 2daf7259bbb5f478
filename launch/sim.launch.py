"""The simulated camera (SimWorld scenes) and the perception node.

    ros2 launch refvlm_bringup sim.launch.py [params_file:=my_params.yaml]

Nodes, remappings and parameter files come from the `sim` graph of graph.yaml beside
this file; `refvlm bringup sim` runs the same graph without ROS launch.
"""
from pathlib import Path

GRAPH_NAME = "sim"
GRAPH_FILE = Path(__file__).resolve().with_name("graph.yaml")


def graph_spec(params_file=None):
    """The nodes this file launches (no `launch` import: tests call this)."""
    from refvlm_ros.graph import load_graph

    return load_graph(GRAPH_NAME, GRAPH_FILE, params_file)


def generate_launch_description():
    from refvlm_ros.launch_actions import launch_description

    return launch_description(graph_spec)
