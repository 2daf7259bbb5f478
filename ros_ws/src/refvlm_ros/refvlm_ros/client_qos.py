"""The QoS a client of refvlm_node's ~/query service and ~/ground action needs.

A service's replies go to every client of that service in a participant, and each
client's reader keeps only its QoS history of them (rclpy's default: 10) before it
finds its own: a process with many requests outstanding at once loses replies the node
did send (12-23 of 60 with the default, none with a history of 100). Give every
client a history at least as deep as the requests it may have outstanding.
"""
from __future__ import annotations

from rclpy.qos import QoSProfile

REPLY_HISTORY = 100


def client_qos() -> QoSProfile:
    """For create_client(..., qos_profile=client_qos()) and ActionClient's service profiles."""
    return QoSProfile(depth=REPLY_HISTORY)


def action_client_qos() -> dict[str, QoSProfile]:
    """ActionClient(node, Ground, name, **action_client_qos())."""
    return {name: client_qos() for name in
            ("goal_service_qos_profile", "result_service_qos_profile", "cancel_service_qos_profile")}
