"""ROS mode: the running perception node's ~/query, its cameras' image topics (for look)
and its /diagnostics and parameters (for the resources), from a client node spun in a
background thread with its own rclpy context.

The client's ~/query QoS keeps 100 requests, so replies to many outstanding calls are not
dropped (the default depth of 10 loses them). Fields the interface gains are used when
they are there: a ``camera`` in the Query request (the node's cameras are the labels in
its /diagnostics), a ``track_id`` on objects and the ``position_frame`` of a result (else
positions are in the image's frame).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from refvlm_mcp.observation import Found, Frame, Observation, PerceptionError
from refvlm_mcp.ros_cameras import DEFAULT_CAMERA, CameraFeed, camera_topics, stamp_s

QUERY_QOS_DEPTH = 100


def _track_id(obj: Any) -> str | None:
    """The object's track id where the interface has one (``track_id``, 0 = not tracked)."""
    value = getattr(obj, "track_id", getattr(obj, "id", None))
    if value is None or value == "" or (isinstance(value, int) and value <= 0):
        return None
    return str(value)


def found_from_msg(obj: Any, frame_id: str) -> Found:
    """refvlm_interfaces/ReferredObject -> Found; ``frame_id``: the frame of its position."""
    from refvlm_ros.image_conversions import image_to_array

    mask = image_to_array(obj.mask) > 0 if obj.mask.height and obj.mask.width else None
    names = list(obj.keypoint_names) or [f"keypoint_{k}" for k in range(len(obj.keypoint_x))]
    keypoints = [(str(n), float(x), float(y), float(v)) for n, x, y, v in
                 zip(names, obj.keypoint_x, obj.keypoint_y, obj.keypoint_visibility)]
    position = (obj.position.x, obj.position.y, obj.position.z) if obj.has_position else None
    return Found(
        phrase=obj.phrase, units=tuple(obj.units), score=None if np.isnan(obj.score) else float(obj.score),
        box_xyxy=tuple(float(v) for v in obj.box_xyxy) if obj.has_box else None, mask=mask,
        keypoints=keypoints, depth_median_m=float(obj.depth_median) if obj.has_depth else None,
        position=position, position_frame=frame_id,
        position_status=obj.position_status, track_id=_track_id(obj))


class RosPerception:
    mode = "ros"

    def __init__(self, node: str = "/refvlm_node", image_topic: str | None = None,
                 timeout_s: float = 60.0, connect_timeout_s: float = 5.0) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import QoSProfile

        from refvlm_interfaces.srv import Query

        self.node_name = "/" + node.strip("/")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.context = rclpy.Context()
        rclpy.init(args=["refvlm_mcp"], context=self.context)
        self.node = rclpy.create_node(f"refvlm_mcp_{os.getpid()}", context=self.context)
        self._query = self.node.create_client(Query, f"{self.node_name}/query",
                                              qos_profile=QoSProfile(depth=QUERY_QOS_DEPTH))
        self._request_type = Query.Request
        self._camera_field = "camera" in Query.Request.get_fields_and_field_types()
        self._image_topic = image_topic  # the first camera's, when given
        self._feeds: dict[str, CameraFeed] = {}
        self._diagnostics: dict[str, str] = {}
        self._parameters: dict[str, Any] = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self._executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._executor.spin, name="refvlm-mcp-ros", daemon=True)
        self._thread.start()

    # ---- inputs ------------------------------------------------------------------------
    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.hardware_id == self.node_name.rsplit("/", 1)[-1]:
                self._diagnostics = {kv.key: kv.value for kv in status.values}

    def _node_subscriptions(self) -> list[tuple[str, list[str]]]:
        namespace, _, name = self.node_name.rpartition("/")
        try:
            return self.node.get_subscriber_names_and_types_by_node(name, namespace or "/")
        except Exception:  # noqa: BLE001 (rclpy raises a bare error for an unknown node)
            return []

    def camera_names(self) -> list[str]:
        """The node's cameras as it labels them (its /diagnostics 'cameras'), the first one
        answering when a call names none; one 'default' camera for a node without several."""
        names = [n for n in self._diagnostics.get("cameras", "").split(",") if n]
        return names if self._camera_field and names else [DEFAULT_CAMERA]

    def _topics(self, name: str) -> dict[str, str | None]:
        names = self.camera_names()
        several = len(names) > 1 or names[0] != DEFAULT_CAMERA
        topics = camera_topics(self._node_subscriptions(), name if several else "")
        if self._image_topic and name == names[0]:
            topics["image"] = self._image_topic
        return topics

    def _feed(self, name: str) -> CameraFeed:
        """The camera's frames, subscribed to on first use."""
        if name not in self._feeds:
            from rclpy.qos import qos_profile_sensor_data
            from sensor_msgs.msg import CompressedImage, Image

            topic = self._topics(name)["image"]
            if topic is None:
                raise PerceptionError(
                    f"cannot find the image topic of camera {name!r} of {self.node_name}: the node subscribes "
                    f"to none ({self._state_hint()}). Start the node (and activate it), or start this server "
                    "with --image-topic.", retry_after_s=2.0)
            feed = CameraFeed(name, topic)
            kind = CompressedImage if topic.endswith("/compressed") else Image
            self.node.create_subscription(kind, topic, feed.put, qos_profile_sensor_data)
            self._feeds[name] = feed
        return self._feeds[name]

    def _state_hint(self) -> str:
        state = self._diagnostics.get("state")
        return f"its state is {state}" if state else "no /diagnostics from it yet"

    # ---- frames ------------------------------------------------------------------------
    @staticmethod
    def _frame(msg: Any, camera: str) -> Frame:
        from refvlm_ros.image_conversions import compressed_to_rgb, image_to_rgb

        if hasattr(msg, "encoding"):
            convert, (height, width) = (lambda: image_to_rgb(msg)), (msg.height, msg.width)
        else:  # CompressedImage: its size is known once decoded
            convert, (height, width) = (lambda: compressed_to_rgb(msg)), compressed_to_rgb(msg).shape[:2]
        return Frame(rgb=convert, width=width, height=height, stamp_s=stamp_s(msg.header),
                     frame_id=msg.header.frame_id, camera=camera)

    def _camera(self, camera: str | None) -> str:
        """The camera a call names (the first when it names none); a name the node does not
        have is refused here when the node's cameras are known, else by the node."""
        names = self.camera_names()
        if not camera:
            return names[0]
        if camera not in names and (not self._camera_field or "cameras" in self._diagnostics):
            raise PerceptionError(f"no camera {camera!r}: this node's cameras are {names}; leave camera "
                                  f"empty for {names[0]!r}")
        return camera

    def latest_frame(self, camera: str | None) -> Frame:
        feed = self._feed(self._camera(camera))
        deadline = time.monotonic() + self.connect_timeout_s
        while (latest := feed.latest()) is None:
            if time.monotonic() > deadline:
                raise PerceptionError(f"no camera frame yet on {feed.topic} ({self._state_hint()}): "
                                      "the camera may not be publishing", retry_after_s=2.0)
            time.sleep(0.05)
        return self._frame(latest, feed.name)

    # ---- asking ------------------------------------------------------------------------
    def _call(self, request: Any) -> Any:
        if not self._query.wait_for_service(timeout_sec=self.connect_timeout_s):
            raise PerceptionError(
                f"the perception node is not up: its service {self.node_name}/query did not appear within "
                f"{self.connect_timeout_s:g} s. Start it (e.g. `refvlm bringup sim`), or "
                "check that this server uses its --node name and ROS_DOMAIN_ID.",
                retry_after_s=10.0)
        future = self._query.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(self.timeout_s):
            self._query.remove_pending_request(future)
            raise PerceptionError(f"the node did not answer within {self.timeout_s:g} s (it may be "
                                  "overloaded or stuck)", retry_after_s=10.0)
        return future.result()

    def _retry_after(self, error: str) -> float | None:
        if error.startswith("busy"):
            latency_ms = float(self._diagnostics.get("latency_ms", "nan") or "nan")
            waiting = int(self._diagnostics.get("queries_waiting", "1") or 1)
            return max(1.0, latency_ms * max(waiting, 1) / 1e3) if np.isfinite(latency_ms) else 2.0
        if "no camera frame" in error:
            return 1.0
        if "not active" in error or "not configured" in error:
            return 5.0  # a node starting up (loading its model) becomes active by itself
        return None

    def ask(self, prompt: str, camera: str | None) -> Observation:
        name = self._camera(camera)
        try:  # subscribe early, so look can draw this answer on its own frame
            feed = self._feed(name)
        except PerceptionError:
            feed = None  # the node will say what is wrong
        request = self._request_type(prompt=prompt)
        if self._camera_field:
            request.camera = "" if name == DEFAULT_CAMERA else name
        response = self._call(request)
        if not response.success:
            raise PerceptionError(response.error, retry_after_s=self._retry_after(response.error))
        msg = response.result
        stages = dict(zip(msg.stage_names, msg.stage_seconds))
        stamp = stamp_s(msg.header)
        frame = feed.at(stamp) if feed is not None else None
        return Observation(
            prompt=msg.prompt, answer=msg.answer, trp_text=msg.trp_text,
            objects=[found_from_msg(obj, getattr(msg, "position_frame", "") or msg.header.frame_id)
                     for obj in msg.objects],
            width=msg.image_width, height=msg.image_height, stamp_s=stamp, frame_id=msg.header.frame_id,
            camera=name, model_ms=round(stages["node_total"] * 1e3, 1) if "node_total" in stages else None,
            errors=list(msg.errors), frame=None if frame is None else self._frame(frame, name))

    # ---- resources ---------------------------------------------------------------------
    def _node_parameters(self) -> dict[str, Any]:
        """The node's model parameters (asked once, when the node answers)."""
        if self._parameters:
            return self._parameters
        from rcl_interfaces.srv import GetParameters

        names = ["model_path", "model_preset", "device", "runtime", "quantize"]
        client = self.node.create_client(GetParameters, f"{self.node_name}/get_parameters")
        try:
            if client.wait_for_service(timeout_sec=1.0):
                future = client.call_async(GetParameters.Request(names=names))
                done = threading.Event()
                future.add_done_callback(lambda _: done.set())
                if done.wait(2.0) and future.result() is not None:
                    values = [v.string_value for v in future.result().values]
                    self._parameters = dict(zip(names, values))
        finally:
            self.node.destroy_client(client)
        return self._parameters

    def cameras(self) -> list[dict[str, Any]]:
        listed = []
        for name in self.camera_names():
            try:  # start receiving frames, so the list says whether they arrive
                latest = self._feed(name).latest()
            except PerceptionError:
                latest = None  # not up yet: listed without frames
            topics = self._topics(name)
            listed.append({
                "name": name, "image_topic": topics["image"], "depth_topic": topics["depth"],
                "camera_info_topic": topics["camera_info"],
                "has_depth": bool(topics["depth"] and self.node.count_publishers(topics["depth"])),
                "last_frame_stamp_s": None if latest is None else stamp_s(latest.header), "node": self.node_name})
        return listed

    def status(self) -> dict[str, Any]:
        ready = self._query.service_is_ready()
        diagnostics = dict(self._diagnostics)
        parameters = self._node_parameters() if ready else {}
        return {
            "mode": self.mode, "node": self.node_name, "node_up": ready,
            "state": diagnostics.get("state", "unknown: no /diagnostics from the node yet" if ready
                                     else "not running"),
            "model": parameters.get("model_path") or parameters.get("model_preset"),
            "device": parameters.get("device"),
            "runtime": diagnostics.get("runtime", parameters.get("runtime")),
            "llm_weights": diagnostics.get("llm_weights"),
            "mean_model_latency_ms": float(diagnostics["latency_ms"]) if "latency_ms" in diagnostics else None,
            "queries_waiting": int(diagnostics["queries_waiting"]) if "queries_waiting" in diagnostics else None,
        }

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        self.context.try_shutdown()
