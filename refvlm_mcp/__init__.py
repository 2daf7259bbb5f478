"""The perception node as typed tools for robot agents: an MCP server (`refvlm mcp`).

    observation.py       what one answer or camera frame is, whichever mode produced it
    schemas.py           the tools' typed outputs (the JSON schemas an MCP client sees)
    pictures.py          frames, masks and drawn answers as PNG / JPEG bytes
    server.py            the tools and resources, their descriptions, validation, errors
    ros_perception.py    ROS mode: the running node's ~/query, camera and /diagnostics
    ros_cameras.py       ROS mode: which topics are the node's cameras, their recent frames
    local_perception.py  library mode: a Predictor in this process, an image file as camera
    mcp_command.py       `refvlm mcp`

Only ros_perception imports rclpy, and only when ROS mode is chosen.
"""
