"""`refvlm_sim`: a camera that publishes SimWorld scenes, with their ground truth.

Topics (all of one frame share one header: stamp and frame_id):
    ~/image         sensor_msgs/Image rgb8                 sensor QoS
    ~/depth         sensor_msgs/Image 32FC1 metres (REP-118, NaN = no surface)
    ~/camera_info   sensor_msgs/CameraInfo (K, size, plumb_bob with zero distortion)
    ~/ground_truth  std_msgs/String JSON: the scene's objects, boxes, 3D centres in the
                    camera frame and in the world (reliable, depth 1, so a late
                    subscriber gets the last)
    /tf             world_frame -> frame_id: the camera's pose at each frame's stamp
    /tf_static      world_frame -> base_frame: a robot base on the ground below the
                    starting camera, x along its heading, z up (REP-103)

The camera looks at one layout; `motion` moves it (orbit around the point it looks at,
or dolly along its view axis) so the node sees a changing view.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String

from refvlm_core.errors import ConfigError
from refvlm_ros.image_conversions import array_to_image
from refvlm_ros.sim_scenes import SimScenes, ros_k
from refvlm_ros.transport import use_camera_profile
from refvlm_ros.transforms import transform_msg

MOTIONS = ("static", "orbit", "dolly")


@dataclass
class SimCameraConfig:
    """The node's parameters (names, defaults and descriptions are declared from this)."""

    rate_hz: float = 5.0         # frames per second
    width: int = 320             # image width, pixels
    height: int = 240            # image height, pixels
    split: str = "val"           # SimWorld split: train, val or test
    layout_index: int = 0        # which layout of the split
    motion: str = "static"       # static | orbit | dolly
    motion_speed: float = 0.2    # orbit: rad/s; dolly: m/s
    frame_id: str = "sim_camera_optical_frame"
    world_frame: str = "world"   # the scene's frame (z up, ground at z = 0)
    base_frame: str = "base_link"  # robot base below the starting camera; empty = none

    def validate(self) -> None:
        if not 0.0 < self.rate_hz <= 120.0:
            raise ConfigError(f"rate_hz must be in (0, 120], got {self.rate_hz}")
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096):
            raise ConfigError(f"width and height must be in [16, 4096], got "
                              f"{self.width}x{self.height}")
        if self.motion not in MOTIONS:
            raise ConfigError(f"motion must be one of {MOTIONS}, got '{self.motion}'")
        if self.layout_index < 0:
            raise ConfigError(f"layout_index must be >= 0, got {self.layout_index}")
        if not self.frame_id or not self.world_frame:
            raise ConfigError("frame_id and world_frame must not be empty")
        if len({self.frame_id, self.world_frame, self.base_frame}) != 3:
            raise ConfigError(f"frame_id, world_frame and base_frame must differ, got "
                              f"{self.frame_id!r}, {self.world_frame!r}, {self.base_frame!r}")


PARAMETER_DESCRIPTIONS = {
    "rate_hz": "frames published per second",
    "width": "image width in pixels",
    "height": "image height in pixels",
    "split": "SimWorld split the layout comes from: train, val or test",
    "layout_index": "index of the layout in the split (same index, same scene)",
    "motion": "camera motion: static, orbit (around the looked-at point) or dolly (along the view axis)",
    "motion_speed": "orbit: radians per second; dolly: metres per second",
    "frame_id": "frame_id of every published header (a REP-103 optical frame)",
    "world_frame": "frame of the scene (z up, ground at z = 0); /tf gives the camera's pose in it at every frame",
    "base_frame": "static frame of a robot base on the ground below the starting camera, x along its "
                  "heading, z up (/tf_static, child of world_frame); empty = none",
}


def base_pose(camera) -> np.ndarray:
    """World-from-base [4, 4]: on the ground below the camera, x along its horizontal heading."""
    forward = camera.rotation[:, 2]
    yaw = math.atan2(forward[1], forward[0])
    pose = np.eye(4)
    pose[:3, :3] = [[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]]
    pose[:2, 3] = camera.position[:2]
    return pose


# -- camera motion (pure functions of time) ---------------------------------------------
def moved_camera(base, target: np.ndarray, motion: str, speed: float, t: float):
    """The base camera moved for `t` seconds, still looking at `target` (world [3]):
    orbit about the vertical through it, or dolly back and forth (triangle wave, up to
    30% of the distance)."""
    from refvlm_simworld.camera import Camera

    if motion == "static" or t == 0.0:
        return base
    offset = base.position - target
    if motion == "orbit":
        angle = speed * t
        c, s = math.cos(angle), math.sin(angle)
        offset = np.array([c * offset[0] - s * offset[1], s * offset[0] + c * offset[1], offset[2]])
    else:  # dolly
        reach = 0.3 * float(np.linalg.norm(offset))  # metres of travel for triangle = 1
        phase = (speed * t / reach) % 4.0 if reach > 0 else 0.0
        triangle = phase if phase < 1 else (2 - phase if phase < 3 else phase - 4)  # [-1, 1]
        offset = offset * (1.0 - 0.3 * triangle)
    fov_x_deg = math.degrees(2.0 * math.atan(0.5 * base.width / base.fx))
    return Camera.look_at(target + offset, target, base.width, base.height, fov_x_deg)


# -- messages ---------------------------------------------------------------------------
def camera_info_message(camera, header: Header) -> CameraInfo:
    """CameraInfo in the ROS pixel convention (pixel centres at integers)."""
    k = ros_k(camera)
    fx, cx, fy, cy = k[0], k[2], k[4], k[5]
    return CameraInfo(
        header=header, width=camera.width, height=camera.height,
        distortion_model="plumb_bob", d=[0.0] * 5, k=k,
        r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        p=[fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0])


class SimCameraNode(Node):
    """Publishes one SimWorld layout as a moving RGB-D camera."""

    def __init__(self, **kwargs) -> None:
        super().__init__("sim_camera", **kwargs)
        try:
            self.config = self._declare_config()
            self.config.validate()
            self.scenes = SimScenes(self.config.split, self.config.layout_index,
                                    self.config.width, self.config.height)
        except Exception:
            self.destroy_node()  # do not leave a half-made node on the graph
            raise
        self._image_pub = self.create_publisher(Image, "~/image", qos_profile_sensor_data)
        self._depth_pub = self.create_publisher(Image, "~/depth", qos_profile_sensor_data)
        self._info_pub = self.create_publisher(CameraInfo, "~/camera_info", qos_profile_sensor_data)
        latched = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                             durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        self._truth_pub = self.create_publisher(String, "~/ground_truth", latched)
        from tf2_ros import StaticTransformBroadcaster, TransformBroadcaster  # noqa: PLC0415
        self._tf = TransformBroadcaster(self)
        self._tf_static = StaticTransformBroadcaster(self)
        if self.config.base_frame:
            self._tf_static.sendTransform(transform_msg(
                self.config.world_frame, self.config.base_frame, self.get_clock().now().to_msg(),
                base_pose(self.scenes.base_camera)))
        self._start = self.get_clock().now()
        self._cached = None  # (rgb, depth, camera, truth) of a static camera: render once
        self.frames_published = 0
        self._timer = self.create_timer(1.0 / self.config.rate_hz, self.publish_frame)
        self.get_logger().info(
            f"SimWorld {self.config.split}[{self.config.layout_index}] at "
            f"{self.config.width}x{self.config.height}, {self.config.rate_hz} Hz, "
            f"motion {self.config.motion}")

    def _declare_config(self) -> SimCameraConfig:
        defaults = asdict(SimCameraConfig())
        values = {}
        for name, default in defaults.items():
            descriptor = ParameterDescriptor(description=PARAMETER_DESCRIPTIONS[name])
            values[name] = self.declare_parameter(name, default, descriptor).value
        return SimCameraConfig(**values)

    def render(self, t: float):
        """(rgb [H, W, 3] uint8, depth [H, W] float32, camera, truth dict) at time t."""
        if self.config.motion == "static" and self._cached is not None:
            return self._cached
        camera = moved_camera(self.scenes.base_camera, self.scenes.target, self.config.motion,
                              self.config.motion_speed, t)
        frame = self.scenes.render(camera)
        if self.config.motion == "static":
            self._cached = frame
        return frame

    def publish_frame(self) -> None:
        now = self.get_clock().now()
        t = (now - self._start).nanoseconds * 1e-9
        rgb, depth, camera, truth = self.render(t)
        header = Header(stamp=now.to_msg(), frame_id=self.config.frame_id)
        truth = dict(truth, stamp={"sec": header.stamp.sec, "nanosec": header.stamp.nanosec},
                     frame_id=header.frame_id, world_frame=self.config.world_frame)
        # The pose first: a node that sees the image can look its transform up at once.
        self._tf.sendTransform(transform_msg(self.config.world_frame, self.config.frame_id, header.stamp,
                                             camera.world_from_camera))
        self._truth_pub.publish(String(data=json.dumps(truth)))
        self._info_pub.publish(camera_info_message(camera, header))
        self._depth_pub.publish(array_to_image(depth.astype(np.float32), "32FC1", header))
        self._image_pub.publish(array_to_image(rgb, "rgb8", header))
        self.frames_published += 1


def main(args: list[str] | None = None) -> None:
    """Entry point `refvlm_sim` (ros2 run refvlm_ros refvlm_sim)."""
    use_camera_profile()  # whole frames through Fast DDS's shared memory
    rclpy.init(args=args)
    node = None
    try:
        node = SimCameraNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    except rclpy._rclpy_pybind11.RCLError:  # noqa: SLF001 (rclpy's only error type here)
        # Ctrl-C between a frame's publishes: the context is gone under the callback. A
        # shutdown, not an error; anything else still is one.
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
