"""Parameters of refvlm_node: one dataclass, each field with the description that is
declared to ROS (``ros2 param describe``) and listed in the README, and one check.

``NodeParams.validate`` raises ConfigError naming the parameter and the fix, so a bad
value fails ``configure`` with a message instead of a traceback later.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from refvlm_core.config import QUANT_KINDS, RUNTIME_KINDS
from refvlm_core.errors import ConfigError
from refvlm_ros.cameras import parse_camera_names

IMAGE_BACKENDS = ("auto", "numpy", "cv_bridge")
RELIABILITIES = ("best_effort", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")
# Parameters that were renamed: still declared (empty), so that a launch file or a params
# file with the old name fails configure with the new name instead of being ignored.
RENAMED = {"backend": "runtime"}


def _describe(text: str) -> dict[str, str]:
    return {"description": text}


@dataclass
class NodeParams:
    model_preset: str = field(default="nano", metadata=_describe(
        "Model preset (tiny, nano, paper) used when model_path is empty"))
    model_path: str = field(default="", metadata=_describe(
        "Folder of a saved model (config + weights); overrides model_preset"))
    device: str = field(default="cpu", metadata=_describe("Torch device: cpu, cuda, cuda:1 ..."))
    runtime: str = field(default="torch", metadata=_describe(
        "What runs the image encoders, projector and decoders (the LLM is always torch): "
        "torch, onnxruntime (CUDA provider when device is cuda), tensorrt, or auto "
        "(tensorrt, else onnxruntime CUDA, else onnxruntime CPU, else torch; the choice "
        "and its reason go to the log and /diagnostics)"))
    export_dir: str = field(default="", metadata=_describe(
        "Folder written by `refvlm export onnx` for the exported runtimes; empty = "
        "<model_path>/export"))
    quantize: str = field(default="auto", metadata=_describe(
        "LLM weights of a model_path model: auto (int8 on a CPU, float on a GPU), int8 "
        "(CPU only, ~1.9x faster answers; the README gives its measured parity with float), "
        "none (float)"))
    build_engines: bool = field(default=True, metadata=_describe(
        "runtime tensorrt (and auto's TensorRT attempt): a missing or stale TensorRT engine "
        "(another GPU, TensorRT version, ONNX file or profile) is built at configure into "
        "<export_dir>/engines for the node's profile (batch 1, the model's L and image side); "
        "false: configure fails naming the `refvlm export tensorrt` command that builds it"))
    standing_prompt: str = field(default="", metadata=_describe(
        "Prompt re-run on new camera frames at rate_hz; empty = only answer queries. "
        "The prompt topic replaces it at run time"))
    rate_hz: float = field(default=2.0, metadata=_describe(
        "Most standing-prompt inferences per second; newer frames replace unprocessed ones"))
    cameras: str = field(default="", metadata=_describe(
        "Several cameras on one model: their namespaces, comma-separated (front,left,right). "
        "Each subscribes to the topics below under its namespace (front/image ...), answers "
        "on ~/<camera>/result ... with its own headers and track IDs; the standing prompt "
        "takes the cameras' new frames in turn (rate_hz in total); Query.camera picks one "
        "(empty = the first). Empty = one camera on the topics as given"))
    image_topic: str = field(default="image", metadata=_describe(
        "Camera image (sensor_msgs/Image; with image_transport=compressed, "
        "sensor_msgs/CompressedImage on <image_topic>/compressed)"))
    image_transport: str = field(default="raw", metadata=_describe(
        "raw (sensor_msgs/Image) or compressed (JPEG/PNG sensor_msgs/CompressedImage)"))
    image_reliability: str = field(default="best_effort", metadata=_describe(
        "QoS reliability of the image subscription: best_effort (sensor data, matches "
        "any publisher) or reliable (only reliable publishers)"))
    image_qos_depth: int = field(default=1, metadata=_describe(
        "QoS history depth of the image subscription (the newest frame is what counts)"))
    camera_info_topic: str = field(default="camera_info", metadata=_describe(
        "CameraInfo of the image (intrinsics for 3D positions)"))
    camera_info_reliability: str = field(default="best_effort", metadata=_describe(
        "QoS reliability of the CameraInfo subscription: best_effort or reliable"))
    camera_info_qos_depth: int = field(default=1, metadata=_describe(
        "QoS history depth of the CameraInfo subscription"))
    depth_topic: str = field(default="depth", metadata=_describe(
        "Depth aligned to the image (32FC1 metres or 16UC1 millimetres); empty = no depth"))
    depth_reliability: str = field(default="best_effort", metadata=_describe(
        "QoS reliability of the depth subscription: best_effort or reliable"))
    depth_qos_depth: int = field(default=4, metadata=_describe(
        "QoS history depth of the depth subscription (depth is paired with images by stamp)"))
    prompt_topic: str = field(default="prompt", metadata=_describe(
        "Operator prompt (std_msgs/String): becomes the standing prompt; empty string stops it"))
    visual_prompt_topic: str = field(default="visual_prompt", metadata=_describe(
        "Standing visual prompt (refvlm_interfaces/VisualPrompt); an empty kind clears it"))
    max_prompt_chars: int = field(default=0, metadata=_describe(
        "Longer prompts are refused with an error reply; 0 = the model's own limit "
        "(ModelConfig.max_prompt_chars), which a larger value cannot raise"))
    max_prompt_tokens: int = field(default=1000, metadata=_describe(
        "Prompts of more LLM tokens are refused with an error reply before they reach the "
        "model (an emoji or a rare character costs several tokens, so max_prompt_chars alone "
        "does not bound the work)"))
    max_request_s: float = field(default=30.0, metadata=_describe(
        "A query, goal or standing-prompt answer still generating after this many seconds "
        "is stopped with an error reply, so one request cannot hold the model; 0 = no limit"))
    max_image_pixels: int = field(default=16_000_000, metadata=_describe(
        "Images with more pixels (width x height) are refused with an error reply"))
    max_aspect_ratio: float = field(default=20.0, metadata=_describe(
        "Images longer than this many times their width (or the reverse) are refused"))
    max_pending_queries: int = field(default=8, metadata=_describe(
        "~/query requests and ~/ground goals waiting for the model beyond this get a quick "
        "'busy, retry' reply (a goal: aborted with it) (read at start-up)"))
    query_queue_depth: int = field(default=100, metadata=_describe(
        "QoS history depth of the ~/query service, so bursts of callers are not dropped "
        "before they are seen (read at start-up)"))
    depth_scale: float = field(default=0.001, metadata=_describe(
        "Metres per unit of 16UC1 depth (0.001: millimetres)"))
    sync_tolerance_s: float = field(default=0.1, metadata=_describe(
        "Depth is paired with an image when their stamps differ by at most this"))
    publish_overlay: bool = field(default=True, metadata=_describe(
        "Publish ~/overlay (rgb8 picture of the answer) for humans"))
    image_backend: str = field(default="auto", metadata=_describe(
        "Image conversion: auto (cv_bridge when a working one is installed), numpy, cv_bridge"))
    localization_min_pixels: int = field(default=20, metadata=_describe(
        "Fewer valid depth pixels on an object -> no 3D position"))
    max_depth_m: float = field(default=20.0, metadata=_describe(
        "Depth readings farther than this (metres) are unknown, not positions (a 16UC1 "
        "reading of 65535 is a sensor's 'no return', not 65.5 m); position_status counts them"))
    target_frame: str = field(default="", metadata=_describe(
        "Frame of the 3D positions and Detection3D poses (tf2, at the image's stamp), e.g. "
        "base_link or map; empty = the camera's frame. A missing or too old transform gives "
        "has_position=false with both frames named, and /diagnostics counts it"))
    transform_timeout_s: float = field(default=0.2, metadata=_describe(
        "Longest wait for the image's transform to target_frame before answering without positions"))
    track_max_age_s: float = field(default=2.0, metadata=_describe(
        "Track IDs: a track ends when its object has not been referred for this long "
        "(image time); 0 = no tracking (track_id 0, empty Detection ids)"))
    track_min_iou: float = field(default=0.3, metadata=_describe(
        "Track IDs: least overlap (mask IoU when both have a mask, else box IoU) for an "
        "object with the same phrase to keep a track's ID"))
    autostart: bool = field(default=False, metadata=_describe(
        "Configure and activate at start-up (without a lifecycle manager)"))
    diagnostics_period_s: float = field(default=1.0, metadata=_describe(
        "Period of /diagnostics messages (rate, latency, dropped frames)"))

    def validate(self) -> "NodeParams":
        if not self.model_path and not self.model_preset:
            raise ConfigError("set model_preset (tiny, nano, paper) or model_path")
        if self.runtime not in RUNTIME_KINDS:
            raise ConfigError(f"runtime={self.runtime!r}: use one of {', '.join(RUNTIME_KINDS)}")
        if self.quantize not in QUANT_KINDS:
            raise ConfigError(f"quantize={self.quantize!r}: use one of {', '.join(QUANT_KINDS)}")
        if self.image_backend not in IMAGE_BACKENDS:
            raise ConfigError(f"image_backend={self.image_backend!r}: use one of {', '.join(IMAGE_BACKENDS)}")
        if not 0.0 < self.rate_hz <= 100.0:
            raise ConfigError(f"rate_hz={self.rate_hz}: use a rate in (0, 100]")
        if self.max_prompt_chars < 0:
            raise ConfigError(f"max_prompt_chars={self.max_prompt_chars}: must be >= 0 (0: the model's limit)")
        if self.depth_scale <= 0.0:
            raise ConfigError(f"depth_scale={self.depth_scale}: must be > 0 (0.001 for millimetres)")
        if self.sync_tolerance_s < 0.0 or self.diagnostics_period_s <= 0.0:
            raise ConfigError("sync_tolerance_s must be >= 0 and diagnostics_period_s > 0")
        if self.localization_min_pixels < 1:
            raise ConfigError("localization_min_pixels must be >= 1")
        if self.max_prompt_tokens < 1 or self.max_request_s < 0.0 or not self.max_depth_m > 0.0:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1, max_request_s="
                              f"{self.max_request_s} >= 0 (0: no limit), max_depth_m={self.max_depth_m} > 0")
        if self.target_frame.startswith("/") or self.transform_timeout_s < 0.0:
            raise ConfigError(f"target_frame={self.target_frame!r} must not start with '/' (tf2 frame "
                              f"names do not) and transform_timeout_s={self.transform_timeout_s} must be >= 0")
        if self.track_max_age_s < 0.0 or not 0.0 < self.track_min_iou <= 1.0:
            raise ConfigError(f"track_max_age_s={self.track_max_age_s} must be >= 0 and "
                              f"track_min_iou={self.track_min_iou} in (0, 1]")
        self._validate_inputs()
        parse_camera_names(self.cameras)  # ConfigError naming a bad or repeated camera
        for name in ("image_topic", "camera_info_topic", "prompt_topic", "visual_prompt_topic"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: give a topic name")
        return self

    def _validate_inputs(self) -> None:
        if self.image_transport not in IMAGE_TRANSPORTS:
            raise ConfigError(f"image_transport={self.image_transport!r}: use one of "
                              f"{', '.join(IMAGE_TRANSPORTS)}")
        for name in ("image", "camera_info", "depth"):
            reliability, depth = getattr(self, f"{name}_reliability"), getattr(self, f"{name}_qos_depth")
            if reliability not in RELIABILITIES:
                raise ConfigError(f"{name}_reliability={reliability!r}: use one of {', '.join(RELIABILITIES)}")
            if depth < 1:
                raise ConfigError(f"{name}_qos_depth={depth}: must be >= 1")
        if self.max_image_pixels < 1 or self.max_aspect_ratio < 1.0:
            raise ConfigError("max_image_pixels must be >= 1 and max_aspect_ratio >= 1")
        if self.max_pending_queries < 1 or self.query_queue_depth < 1:
            raise ConfigError("max_pending_queries and query_queue_depth must be >= 1")


def declare(node: Any) -> None:
    """Declares every field as a ROS parameter with its description and default."""
    from rcl_interfaces.msg import ParameterDescriptor  # noqa: PLC0415
    for f in dataclasses.fields(NodeParams):
        node.declare_parameter(f.name, f.default,
                               ParameterDescriptor(description=f.metadata["description"]))
    for old, new in RENAMED.items():
        node.declare_parameter(old, "", ParameterDescriptor(description=f"renamed to {new}"))


def read(node: Any, validate: bool = True) -> NodeParams:
    """Current parameter values -> NodeParams, validated (ConfigError when invalid) unless
    ``validate`` is False (construction: the rest is validated, and refused, at configure)."""
    values = {f.name: node.get_parameter(f.name).value for f in dataclasses.fields(NodeParams)}
    if validate:
        for old, new in RENAMED.items():
            value = node.get_parameter(old).value
            if value:
                raise ConfigError(f"{old}:={value} is not read: the parameter is now {new} ({new}:={value})")
    return NodeParams(**values).validate() if validate else NodeParams(**values)


def markdown_table() -> str:
    """The README's parameter table, generated from the fields (tests keep them in sync)."""
    rows = ["| parameter | default | description |", "|---|---|---|"]
    for f in dataclasses.fields(NodeParams):
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['description']} |")
    return "\n".join(rows)
