"""ROS 2 adapter of REF-VLM: the lifecycle perception node, image conversions, 3D
localisation, message conversions, the simulated camera and bringup.

Only the node and message modules import rclpy; ``image_conversions`` and
``localization`` are plain numpy so that they run (and are tested) anywhere.
"""
