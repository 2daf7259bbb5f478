"""Three simulated cameras (three SimWorld scenes) and one perception node serving them all.

    ros2 launch refvlm_bringup sim_cameras.launch.py [params_file:=my_params.yaml]

Nodes, remappings and parameter files come from the `sim_cameras` graph of graph.yaml beside
this file. The node answers each camera on ~/front/..., ~/left/..., ~/right/... (parameter cameras).
"""
from pathlib import Path

GRAPH_NAME = "sim_cameras"
GRAPH_FILE = Path(__file__).resolve().with_name("graph.yaml")


def graph_spec(params_file=None):
    """The nodes this file launches (no `launch` import: tests call this)."""
    from refvlm_ros.graph import load_graph

    return load_graph(GRAPH_NAME, GRAPH_FILE, params_file)


def generate_launch_description():
    from refvlm_ros.launch_actions import launch_description

    return launch_description(graph_spec)
