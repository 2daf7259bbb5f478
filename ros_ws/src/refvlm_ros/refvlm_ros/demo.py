"""`refvlm demo`: a robot's view of the product.

Brings up the `sim` graph (SimWorld camera + perception node) in this process, asks the
node questions through its Query service as a robot would, prints each answer's 3D
positions next to the simulator's ground truth, and writes overlay PNGs.

Positions are in the robot's frame, as a robot would ask for them: the node runs with
target_frame:=base_link (the sim camera publishes its pose on /tf and base_link on
/tf_static), and the truth (camera frame, at the answer's stamp) is moved into base_link by
the demo's own tf2 Buffer.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from refvlm_core.errors import ConfigError, RefVLMError

QUERY_SERVICE = "/refvlm_node/query"
GOAL_ERROR_M = 0.15  # a referred object's 3D position within this of the truth counts as found
SIM_TOPICS = "/sim_camera"
TARGET_FRAME = "base_link"  # the frame the node answers in and the truth is compared in
TRUTH_KEY = f"surface_median_{TARGET_FRAME}"  # the truth object's visible-surface median there
TRAINED_MODEL_DIRS = ("models/nano",)  # relative to the checkout; REFVLM_MODEL_DIR wins


@dataclass(frozen=True)
class DemoQuestion:
    prompt: str
    target: str  # ground-truth object name it is about ("red cube", "person")


# Phrased as the shipped nano model was taught (SimWorld REC / RES / keypoint requests).
DEFAULT_QUESTIONS = (
    DemoQuestion("Locate the red cube.", "red cube"),
    DemoQuestion("Segment the person.", "person"),
    DemoQuestion("Estimate the pose of the person.", "person"),
)


@dataclass
class ModelChoice:
    parameters: dict          # refvlm_node parameters that select it
    description: str
    trained: bool


@dataclass
class DemoConfig:
    out_dir: Path = Path("outputs/demo")
    questions: tuple[DemoQuestion, ...] = DEFAULT_QUESTIONS
    width: int = 320
    height: int = 240
    split: str = "test"          # red cubes are held out of train/val: a compositional query
    layout_index: int | None = None   # None: the first layout showing every target
    model: ModelChoice | None = None  # None: the shipped default (default_model())
    timeout_s: float = 100.0     # the whole run (after the export, when one is made)
    query_timeout_s: float = 60.0
    runtime: str = "torch"       # the node's runtime; exported ones export the model on first use
    export_cache: Path | None = None  # None: refvlm_export.cache.default_cache_dir()


@dataclass
class DemoRow:
    question: str
    success: bool
    answer: str
    error: str = ""
    objects: list[dict] = field(default_factory=list)   # phrase, units, position, error_m
    truth: dict | None = None                           # the target's ground truth
    overlay: str = ""
    seconds: float = 0.0


# -- choosing the model and the scene ---------------------------------------------------
def default_model() -> ModelChoice:
    """The trained nano model when one is installed, else the tiny preset (untrained)."""
    from refvlm_ros.graph import checkout_root

    root = checkout_root() or Path.cwd()
    candidates = [os.environ.get("REFVLM_MODEL_DIR", "")] + [str(root / d) for d in TRAINED_MODEL_DIRS]
    for candidate in filter(None, candidates):
        if Path(candidate).is_dir() and any(Path(candidate).iterdir()):
            return ModelChoice({"model_path": str(Path(candidate).resolve())},
                               f"trained model {candidate}", trained=True)
    return ModelChoice({"model_preset": "tiny", "model_path": ""},
                       "tiny preset with RANDOM weights: the model is UNTRAINED, so its answers "
                       "and positions are arbitrary; this run shows the pipeline end to end",
                       trained=False)


def pick_layout(split: str, targets: set[str], width: int, height: int,
                max_index: int = 200, min_fraction: float = 0.002) -> int:
    """The first layout of `split` in which every target name covers at least
    `min_fraction` of the image."""
    min_pixels = min_fraction * width * height
    from refvlm_ros.sim_scenes import SimScenes, object_name

    from refvlm_simworld.world import SimWorldConfig, make_layout

    for index in range(max_index):
        layout = make_layout(SimWorldConfig(width=width, height=height), split, index)
        if not targets <= {object_name(obj) for obj in layout.objects}:
            continue
        scenes = SimScenes(split, index, width, height)
        truth = scenes.render(scenes.base_camera)[3]
        visible = {o["name"] for o in truth["objects"] if o["visible_pixels"] >= min_pixels}
        if targets <= visible:
            return index
    raise ConfigError(f"no {split} layout among the first {max_index} shows all of "
                      f"{sorted(targets)}; pick --layout explicitly")


def params_file_for(config: DemoConfig, model: ModelChoice, layout_index: int, path: Path) -> Path:
    """A ROS parameter file that sets the sim camera's scene and the node's model."""
    params = {
        "sim_camera": {"ros__parameters": {
            "width": config.width, "height": config.height, "split": config.split,
            "layout_index": layout_index, "motion": "static", "rate_hz": 5.0}},
        "refvlm_node": {"ros__parameters": dict(model.parameters, standing_prompt="", target_frame=TARGET_FRAME)},
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# -- comparing with ground truth --------------------------------------------------------
def find_truth(truth: dict, target: str) -> dict | None:
    """The most visible ground-truth object named `target`."""
    named = [o for o in truth.get("objects", []) if o["name"] == target]
    return max(named, key=lambda o: o["visible_pixels"]) if named else None


def object_rows(result, truth_object: dict | None) -> list[dict]:
    """Per referred object: phrase, units, predicted position and its distance to the
    target's visible-surface median (what depth can see; the same statistic the node uses),
    both in TARGET_FRAME."""
    reference = truth_object and truth_object.get(TRUTH_KEY)
    rows = []
    for obj in result.objects:
        row = {"phrase": obj.phrase, "units": list(obj.units), "position": None, "error_m": None,
               "box_xyxy": list(obj.box_xyxy) if obj.has_box else None,
               "position_status": obj.position_status}
        if obj.has_position:
            row["position"] = [obj.position.x, obj.position.y, obj.position.z]
            if reference:
                row["error_m"] = float(np.linalg.norm(np.subtract(row["position"], reference)))
        rows.append(row)
    return rows


def _xyz(values) -> str:
    return "-" if values is None else "({:+.2f}, {:+.2f}, {:.2f})".format(*values)


def format_table(rows: list[DemoRow]) -> str:
    """Answers next to ground truth, one line per referred object (metres, in TARGET_FRAME)."""
    header = (f"{'question':34s} {'referred':18s} {'units':14s} {'predicted xyz':22s} "
              f"{'truth xyz (surface)':22s} {'error':>7s}   (metres, {TARGET_FRAME})")
    lines = [header, "-" * len(header)]
    for row in rows:
        truth_xyz = _xyz(row.truth.get(TRUTH_KEY) if row.truth else None)
        if not row.success:
            lines.append(f"{row.question[:34]:34s} error: {row.error[:80]}")
            continue
        if not row.objects:
            lines.append(f"{row.question[:34]:34s} {'(nothing referred)':18s} {'':14s} {'-':22s} "
                         f"{truth_xyz:22s} {'-':>7s}")
        for i, obj in enumerate(row.objects):
            error = "-" if obj["error_m"] is None else f"{obj['error_m']:.2f} m"
            lines.append(f"{(row.question if i == 0 else '')[:34]:34s} {obj['phrase'][:18]:18s} "
                         f"{','.join(obj['units'])[:14]:14s} {_xyz(obj['position']):22s} "
                         f"{truth_xyz:22s} {error:>7s} {verdict(obj['error_m'])}")
        lines.append(f"{'':34s} answer: {row.answer.strip()[:80]!r}")
    found = sum(row_found(row) for row in rows)
    lines.append(f"found {found} of {len(rows)} asked objects within {GOAL_ERROR_M:.2f} m of the simulator's truth")
    return "\n".join(lines)


def verdict(error_m: float | None) -> str:
    if error_m is None:
        return "no 3D position"
    return "ok" if error_m <= GOAL_ERROR_M else f"OFF by more than {GOAL_ERROR_M:.2f} m"


def row_found(row: DemoRow) -> bool:
    """Some referred object of the answer lies within GOAL_ERROR_M of the question's target."""
    return any(obj["error_m"] is not None and obj["error_m"] <= GOAL_ERROR_M for obj in row.objects)


# -- drawing -----------------------------------------------------------------------------
def result_from_msg(msg) -> "Result":
    """RefResult message -> refvlm_core Result (what the core overlay draws)."""
    from refvlm_core.results import ReferredObject, Result
    from refvlm_ros.image_conversions import image_to_array

    objects = []
    for obj in msg.objects:
        mask = image_to_array(obj.mask) > 0 if obj.mask.height and obj.mask.width else None
        keypoints = (np.stack([obj.keypoint_x, obj.keypoint_y, obj.keypoint_visibility], axis=1)
                     if len(obj.keypoint_x) else None)
        objects.append(ReferredObject(
            phrase=obj.phrase, units=tuple(obj.units), instance_index=obj.instance_index,
            ref_ordinal=obj.ref_ordinal, ref_span=(obj.ref_span_start, obj.ref_span_end),
            score=None if np.isnan(obj.score) else float(obj.score),
            box_xyxy=np.array(obj.box_xyxy) if obj.has_box else None,
            mask=mask, keypoints=keypoints))
    return Result(prompt=msg.prompt, answer=msg.answer, trp_text=msg.trp_text,
                  image_size=(msg.image_height, msg.image_width), objects=objects)


def draw_overlay(rgb: np.ndarray, result_msg, truth_object: dict | None) -> np.ndarray:
    """[H, W, 3] uint8 RGB picture: the answer as the node's overlay draws it, the
    ground-truth box of the question's target (white) and the answer text."""
    import cv2

    from refvlm_core.overlay import draw_result

    canvas = draw_result(rgb, result_from_msg(result_msg))
    if truth_object and truth_object.get("box_xyxy"):
        x0, y0, x1, y1 = (int(round(v)) for v in truth_object["box_xyxy"])
        cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    cv2.putText(canvas, result_msg.answer.strip()[:60], (4, canvas.shape[0] - 6),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
    return canvas


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "question"


# -- the robot's side: a client node -----------------------------------------------------
class DemoClient:
    """Keeps the sim camera's recent frames and ground truth by stamp; asks Query."""

    KEEP = 30

    def __init__(self, context) -> None:
        from rclpy.node import Node
        from rclpy.qos import (QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy,
                               qos_profile_sensor_data)
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from refvlm_interfaces.srv import Query
        from refvlm_ros.client_qos import client_qos

        self.node = Node("refvlm_demo", context=context)
        self._lock = threading.Lock()
        self.frames: OrderedDict = OrderedDict()   # (sec, nanosec) -> rgb
        self.truths: OrderedDict = OrderedDict()   # (sec, nanosec) -> dict
        latched = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                             durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(Image, f"{SIM_TOPICS}/image", self._on_image,
                                      qos_profile_sensor_data)
        self.node.create_subscription(String, f"{SIM_TOPICS}/ground_truth", self._on_truth, latched)
        self.query = self.node.create_client(Query, QUERY_SERVICE, qos_profile=client_qos())
        self._request_type = Query.Request
        from tf2_ros import Buffer, TransformListener
        self.tf = Buffer(node=self.node)
        self._tf_listener = TransformListener(self.tf, self.node, spin_thread=False)

    def in_target_frame(self, point: list[float], truth: dict) -> list[float] | None:
        """A truth point (camera frame, at the truth's stamp) in TARGET_FRAME, by tf2."""
        import tf2_geometry_msgs  # noqa: F401 (registers PointStamped with the Buffer)
        from geometry_msgs.msg import PointStamped
        from rclpy.duration import Duration

        stamped = PointStamped()
        stamped.header.frame_id = truth["frame_id"]
        stamped.header.stamp.sec, stamped.header.stamp.nanosec = truth["stamp"]["sec"], truth["stamp"]["nanosec"]
        stamped.point.x, stamped.point.y, stamped.point.z = (float(v) for v in point)
        try:
            out = self.tf.transform(stamped, TARGET_FRAME, timeout=Duration(seconds=2.0)).point
        except Exception as error:  # noqa: BLE001 (tf2's errors: no truth to compare with, said)
            self.node.get_logger().warning(f"truth not in {TARGET_FRAME}: {error}")
            return None
        return [out.x, out.y, out.z]

    def _keep(self, store: OrderedDict, key, value) -> None:
        with self._lock:
            store[key] = value
            while len(store) > self.KEEP:
                store.popitem(last=False)

    def _on_image(self, msg) -> None:
        from refvlm_ros.image_conversions import image_to_rgb

        self._keep(self.frames, (msg.header.stamp.sec, msg.header.stamp.nanosec), image_to_rgb(msg))

    def _on_truth(self, msg) -> None:
        truth = json.loads(msg.data)
        self._keep(self.truths, (truth["stamp"]["sec"], truth["stamp"]["nanosec"]), truth)

    def frame_and_truth(self, stamp) -> tuple[np.ndarray | None, dict | None]:
        """The frame and truth of `stamp`, else the latest ones (a static camera)."""
        with self._lock:
            rgb = self.frames.get(stamp, next(reversed(self.frames.values()), None))
            truth = self.truths.get(stamp, next(reversed(self.truths.values()), None))
        return rgb, truth

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.frames and self.truths and self.query.service_is_ready():
                return
            time.sleep(0.05)
        raise RefVLMError("the sim camera or the node's Query service did not come up in time; "
                          "check the log above")

    def ask(self, prompt: str, timeout_s: float):
        """Query.Response, retried while the node has no camera frame yet."""
        deadline = time.monotonic() + timeout_s
        while True:
            future = self.query.call_async(self._request_type(prompt=prompt))
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not future.done():
                raise RefVLMError(f"no answer to {prompt!r} within {timeout_s:.0f} s")
            response = future.result()
            if response.success or "frame" not in response.error.lower() or time.monotonic() > deadline:
                return response
            time.sleep(0.2)


def with_runtime(model: ModelChoice, runtime: str, export_cache: Path | None, log=print) -> ModelChoice:
    """``model`` run by ``runtime``; an exported runtime gets the model's export from the
    cache, exported now if this model (config and weights) was never exported."""
    if runtime == "torch":
        return model
    from refvlm_export.cache import cached_export

    model_arg = model.parameters.get("model_path") or model.parameters["model_preset"]
    export_dir = cached_export(model_arg, export_cache, say=log)
    return ModelChoice(dict(model.parameters, runtime=runtime, export_dir=str(export_dir)),
                       f"{model.description}; runtime {runtime}, export {export_dir}", model.trained)


def run_demo(config: DemoConfig, log=print) -> list[DemoRow]:
    """Run the demo; returns one row per question (also printed and written to out_dir)."""
    from refvlm_ros.bringup import Bringup
    from refvlm_ros.graph import load_graph

    model = with_runtime(config.model or default_model(), config.runtime, config.export_cache, log)
    start = time.monotonic()
    deadline = start + config.timeout_s
    targets = {q.target for q in config.questions if q.target} or {"red cube", "person"}
    layout_index = config.layout_index
    if layout_index is None:
        layout_index = pick_layout(config.split, targets, config.width, config.height)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"model: {model.description}")
    log(f"scene: SimWorld {config.split}[{layout_index}] at {config.width}x{config.height}, "
        f"static camera")

    rows: list[DemoRow] = []
    with tempfile.TemporaryDirectory(prefix="refvlm-demo-") as tmp:
        params = params_file_for(config, model, layout_index, Path(tmp) / "demo_params.yaml")
        with Bringup(load_graph("sim", params_file=params)) as bringup:
            log(f"up in {time.monotonic() - start:.1f} s: {', '.join(bringup.nodes)}")
            client = DemoClient(bringup.context)
            bringup.add_node(client.node)
            try:
                client.wait_ready(min(deadline, time.monotonic() + 30.0))
                for number, question in enumerate(config.questions):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RefVLMError(f"demo ran past {config.timeout_s:.0f} s")
                    overlay_path = out_dir / f"{number:02d}_{slug(question.prompt)}.png"
                    rows.append(_ask_one(client, question, min(config.query_timeout_s, remaining),
                                         overlay_path))
                    log(f"  asked {question.prompt!r} ({rows[-1].seconds:.1f} s)")
            finally:
                client.node.destroy_node()
    log("")
    log(format_table(rows))
    (out_dir / "answers.json").write_text(json.dumps(
        {"model": model.description, "trained": model.trained, "split": config.split,
         "layout_index": layout_index, "rows": [row.__dict__ for row in rows]}, indent=2))
    log(f"\noverlays and answers.json in {out_dir}/ ({time.monotonic() - start:.1f} s in all)")
    if not model.trained:
        log("NOTE: the model is untrained (random weights); answers and positions are "
            "arbitrary until a trained model is installed.")
    return rows


def _ask_one(client: DemoClient, question: DemoQuestion, timeout_s: float,
             overlay_path: Path) -> DemoRow:
    import cv2

    started = time.monotonic()
    response = client.ask(question.prompt, timeout_s)
    result = response.result
    stamp = (result.header.stamp.sec, result.header.stamp.nanosec)
    rgb, truth = client.frame_and_truth(stamp)
    truth_object = find_truth(truth or {}, question.target)
    if truth_object and truth_object.get("surface_median_camera"):
        truth_object = dict(truth_object, **{TRUTH_KEY: client.in_target_frame(
            truth_object["surface_median_camera"], truth)})
    row = DemoRow(question=question.prompt, success=response.success, answer=result.answer,
                  error=response.error, truth=truth_object,
                  objects=object_rows(result, truth_object) if response.success else [])
    if rgb is not None:
        overlay = draw_overlay(rgb, result, truth_object)
        cv2.imwrite(str(overlay_path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        row.overlay = str(overlay_path)
    row.seconds = time.monotonic() - started
    return row
