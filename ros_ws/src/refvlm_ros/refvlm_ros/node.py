"""refvlm_node: the REF-VLM perception node (rclpy lifecycle node).

    (always)   - ~/query service, ~/ground action, /diagnostics
    configure  - read and validate parameters, load the Predictor on its runtime (torch, or
                 an export folder through ONNX Runtime / TensorRT), create publishers
    activate   - subscribe to the camera, depth, CameraInfo and prompts; start the worker
    deactivate - unsubscribe, stop and join the worker
    cleanup    - free the model, destroy what configure created

Threads: the executor (multi-threaded) only stores incoming messages; one worker thread
runs the standing prompt on the newest frame at most ``rate_hz`` times a second, so the
executor stays free to answer ~/query and ~/ground while a frame is processed. Queries
and goals wait in one bounded queue answered by its own worker (query_queue), so no
callback waits for the model on an executor thread. The model is guarded by a lock.
Camera input does not queue: one camera slot (frames replaced before the worker takes
them are counted as dropped), a few depth images for stamp matching.

Every output carries the source image's header. Bad input (encoding, sizes, prompts)
gives a logged error and an error reply; the node keeps serving.
"""
from __future__ import annotations

import functools
import gc
import signal
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from refvlm_core import load_timing, trp
from refvlm_core.errors import ConfigError, InputError, RefVLMError
from refvlm_core.overlay import draw_result
from refvlm_core.results import Result
from refvlm_interfaces.action import Ground
from refvlm_interfaces.msg import RefResult
from refvlm_interfaces.msg import VisualPrompt as VisualPromptMsg
from refvlm_interfaces.srv import Query
from refvlm_ros import messages, params, request_limits
from refvlm_ros.cameras import Cameras, CameraStream, parse_camera_names
from refvlm_ros.frames import InferenceStats
from refvlm_ros.image_conversions import array_to_image, compressed_to_rgb, depth_to_metres, image_to_rgb
from refvlm_ros.localization import Intrinsics, LocalizationConfig, check_alignment
from refvlm_ros.query_queue import QueryQueue
from refvlm_ros.transport import use_camera_profile
from refvlm_ros.tracking import Tracker, assign_track_ids
from refvlm_ros.transforms import TargetFrame

RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
WORKER_NAME = "refvlm-inference"
ERROR_PROMPT_ECHO = 200  # characters of a refused prompt echoed back in the reply


def input_qos(reliability: str, depth: int) -> QoSProfile:
    """QoS of a camera input; best effort (the default) also matches reliable publishers."""
    return QoSProfile(reliability=RELIABILITY[reliability], history=HistoryPolicy.KEEP_LAST, depth=depth)


def stamp_seconds(header: Any) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def _size(msg: Any) -> tuple[int, int]:
    """(height, width) of an Image or CameraInfo; (0, 0) where it has none (CompressedImage)."""
    return int(getattr(msg, "height", 0)), int(getattr(msg, "width", 0))


class GoalCanceled(Exception):
    """Raised inside generation to stop it when a ~/ground goal is canceled."""


def logged_transition(callback: Callable[[Any, State], TransitionCallbackReturn]) -> Callable:
    """rclpy turns an exception in a transition callback into ERROR without a word: log it."""
    @functools.wraps(callback)
    def logged(self: Any, state: State) -> TransitionCallbackReturn:
        try:
            return callback(self, state)
        except Exception:  # noqa: BLE001 (logged, then rclpy's error transition: on_error)
            self.get_logger().error(f"{callback.__name__} failed:\n{traceback.format_exc()}")
            return TransitionCallbackReturn.ERROR
    return logged


def load_predictor(p: params.NodeParams) -> Any:
    """The Predictor named by the parameters, its encoders, projector and decoders on the
    chosen runtime (imported here: torch loads on configure)."""
    with load_timing.phase("import_torch_and_core"):  # the node imports torch only here
        from refvlm_core.predictor import Predictor  # noqa: PLC0415
    if p.model_path:
        predictor = Predictor.from_pretrained(p.model_path, device=p.device, quantize=p.quantize)
    else:
        predictor = Predictor.from_preset(p.model_preset, device=p.device)
    if p.runtime != "torch":
        from refvlm_export.runtime import default_export_dir, select_runtime  # noqa: PLC0415
        runtime, reason = select_runtime(p.runtime, predictor.model, default_export_dir(p.export_dir, p.model_path),
                                         p.device, p.model_path or p.model_preset, p.build_engines)
        predictor.set_runtime(runtime, reason)
    return predictor


def runtime_status(predictor: Any) -> dict[str, str]:
    """What runs the vision parts and why (a stand-in predictor without a runtime: torch)."""
    runtime = getattr(predictor, "runtime", None)
    described = runtime.describe() if runtime is not None else {"runtime": "torch"}
    return {**described, "runtime_reason": str(getattr(predictor, "runtime_reason", "default"))}


class RefVLMNode(LifecycleNode):
    def __init__(self, node_name: str = "refvlm_node",
                 predictor_factory: Callable[[params.NodeParams], Any] = load_predictor,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        params.declare(self)
        startup = params.read(self, validate=False)  # what construction reads; configure reads all
        self.autostart = startup.autostart
        self._predictor_factory = predictor_factory
        self.p: params.NodeParams | None = None
        self._predictor: Any = None
        self._runtime: dict[str, str] = {}  # what runs the vision parts and why (/diagnostics)
        self._load: dict[str, str] = {}  # how long configure's model load took, per phase (/diagnostics)
        self._model_lock = threading.Lock()
        self._cameras = Cameras([""])  # per camera: frames, depth, CameraInfo, tracker, outputs
        self._standing_prompt = ""
        self._standing_visual_prompts: list[VisualPromptMsg] = []
        self._stats = InferenceStats()
        self._target: TargetFrame | None = None  # target_frame set: positions moved there (tf2)
        self._stop = threading.Event()
        self._shutting_down = threading.Event()  # set: a running generation stops at its next token
        self._worker: threading.Thread | None = None
        self._outputs: dict[str, Any] = {}
        self._inputs: list[Any] = []
        self._io_group = MutuallyExclusiveCallbackGroup()
        self._request_group = ReentrantCallbackGroup()
        # Requests and diagnostics are served in every state: an agent asking an
        # unconfigured node gets an error it can act on, a monitor sees its state.
        self._queries = QueryQueue(self._run_request, self._refuse_request, startup.max_pending_queries)
        query_qos = QoSProfile(depth=startup.query_queue_depth)
        self._queries.install(self.create_service(
            Query, "~/query", self._queries.submit, qos_profile=query_qos,
            callback_group=self._request_group))
        self._guard_change_state()
        # A goal waits in the request queue, not on an executor thread (_queue_goal); the
        # executor only hands its finished result over (execute_callback, per goal).
        self._action = ActionServer(
            self, Ground, "~/ground", execute_callback=lambda goal_handle: Ground.Result(),
            handle_accepted_callback=self._queue_goal,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
            goal_service_qos_profile=query_qos, result_service_qos_profile=query_qos,
            callback_group=self._request_group)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics, self._io_group)

    # ---- lifecycle ------------------------------------------------------------------
    def _guard_change_state(self) -> None:
        """An invalid transition sent to ~/change_state (by id, e.g. activate while
        unconfigured) raises out of rclpy's handler and ends spin (rclpy#1209): refuse it."""
        service = self._service_change_state
        handle = service.callback

        def guarded(request: Any, response: Any) -> Any:
            try:
                return handle(request, response)
            except rclpy._rclpy_pybind11.RCLError as error:  # noqa: SLF001 (rclpy's only error type here)
                self.get_logger().warning(
                    f"refused lifecycle transition id={request.transition.id} "
                    f"label={request.transition.label!r} in state {self.lifecycle_state()!r}: {error}")
                response.success = False
                return response

        service.callback = guarded

    def lifecycle_state(self) -> str:
        return self._state_machine.current_state[1]

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            self.p = params.read(self)
            self._predictor, self._load = self._load_model()
            self._runtime = runtime_status(self._predictor)
            self._configure_frames_and_tracks()
            self.get_logger().info("runtime: " + ", ".join(f"{k}={v}" for k, v in self._runtime.items()))
            limit = getattr(getattr(self._predictor, "config", None), "max_prompt_chars", None)
            if limit is not None and self.p.max_prompt_chars > limit:  # the model refuses past its own limit
                self.get_logger().warning(f"max_prompt_chars={self.p.max_prompt_chars} is above the model's limit "
                                          f"({limit}, ModelConfig.max_prompt_chars): longer prompts are refused")
            if self.p.export_dir and self.p.runtime == "torch":
                self.get_logger().warning(f"export_dir={self.p.export_dir!r} is not read with runtime:=torch (the "
                                          "exported runtimes onnxruntime, tensorrt and auto read it)")
        except Exception as error:  # noqa: BLE001 (a failed configure must not kill the node)
            self.get_logger().error(f"configure failed: {error}")
            self._predictor = None
            return TransitionCallbackReturn.FAILURE
        self._diag_timer.timer_period_ns = int(self.p.diagnostics_period_s * 1e9)
        self._standing_prompt = self.p.standing_prompt
        self._create_outputs()
        return TransitionCallbackReturn.SUCCESS

    def _load_model(self) -> tuple[Any, dict[str, str]]:
        """(predictor, load report for /diagnostics): total seconds, each phase's, weights."""
        start = time.perf_counter()
        with load_timing.recording() as phases:
            predictor = self._predictor_factory(self.p)
        total = time.perf_counter() - start
        slowest = sorted(phases.items(), key=lambda item: -item[1])
        self.get_logger().info(f"model loaded in {total:.1f} s ({self.p.model_path or self.p.model_preset}, "
                               f"{self.p.device}): " + ", ".join(f"{k} {v:.1f} s" for k, v in slowest))
        report = {"load_s": f"{total:.2f}", **{f"load_{k}_s": f"{v:.2f}" for k, v in phases.items()},
                  "llm_weights": str(getattr(predictor, "quantize", "none"))}
        return predictor, report

    @logged_transition
    def on_activate(self, state: State) -> TransitionCallbackReturn:
        before = set(self.subscriptions)
        try:
            self._create_inputs()
        except Exception as error:  # noqa: BLE001 (e.g. an invalid topic name: stay inactive)
            for sub in set(self.subscriptions) - before:  # the inputs made before the failure
                self.destroy_subscription(sub)
            self._inputs = []
            self.get_logger().error(f"activate failed, the node stays inactive (model loaded): {error}")
            return TransitionCallbackReturn.FAILURE
        self._stop.clear()
        self._worker = threading.Thread(target=self._worker_loop, name=WORKER_NAME, daemon=True)
        self._worker.start()
        return super().on_activate(state)

    @logged_transition
    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_inputs()
        return super().on_deactivate(state)

    def _stop_inputs(self) -> None:
        self._stop_worker()
        for sub in self._inputs:
            self.destroy_subscription(sub)
        self._inputs = []
        self._cameras.clear()

    @logged_transition
    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        """A transition raised (logged by logged_transition): free everything and go to
        unconfigured, so the state says what the node holds (a second configure loads one
        model, not two)."""
        self.get_logger().error(f"lifecycle error from state {state.label!r}: releasing the model, "
                                "the node is unconfigured")
        self._stop_inputs()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    @logged_transition
    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._stop_worker()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def _configure_frames_and_tracks(self) -> None:
        """The cameras, tf2 for target_frame (its subscriptions run on this node's
        executor) and a tracker per camera, as the parameters say."""
        self._cameras = Cameras(parse_camera_names(self.p.cameras))
        if self.p.target_frame:
            self._target = TargetFrame(self, self.p.target_frame, self.p.transform_timeout_s)
        if self.p.track_max_age_s > 0:
            for stream in self._cameras.streams:
                stream.tracker = Tracker(self.p.track_max_age_s, self.p.track_min_iou)

    def _release(self) -> None:
        """Destroy configure's outputs and free the model (waits for a running request)."""
        if self._target is not None:
            self._target.close()
        self._target = None
        for stream in self._cameras.streams:
            for pub in stream.outputs.values():
                self.destroy_publisher(pub)
            stream.outputs, stream.tracker = {}, None
        self._outputs = {}
        with self._model_lock:
            self._predictor = None
        gc.collect()

    def shutdown_cleanly(self) -> None:
        """Stops the workers (before rclpy goes; a running answer stops at its next token)
        and destroys the node."""
        self._shutting_down.set()
        self._queries.close()
        self._stop_worker()
        self._action.destroy()
        self.destroy_node()

    @property
    def active(self) -> bool:
        return self._worker is not None and not self._stop.is_set()

    # ---- wiring -----------------------------------------------------------------------
    def _create_outputs(self) -> None:
        """Every camera's publishers (~/result ..., or ~/<camera>/result ... with `cameras`);
        ``_outputs`` are the first camera's."""
        pub = self.create_publisher
        for stream in self._cameras.streams:
            out = stream.output
            stream.outputs = {
                "result": pub(RefResult, out("result"), 10),
                "masks": pub(Image, out("masks"), 10),
                "depth": pub(Image, out("depth"), 10),
            }
            if self.p.publish_overlay:
                stream.outputs["overlay"] = pub(Image, out("overlay"), 10)
            if messages.vision_msgs_available():
                from vision_msgs.msg import Detection2DArray, Detection3DArray  # noqa: PLC0415
                stream.outputs["detections"] = pub(Detection2DArray, out("detections"), 10)
                stream.outputs["detections_3d"] = pub(Detection3DArray, out("detections_3d"), 10)
        self._outputs = self._cameras.streams[0].outputs

    def _create_inputs(self) -> None:
        sub, p = self.create_subscription, self.p
        group = self._io_group
        self._inputs = [
            sub(String, p.prompt_topic, self._on_prompt, 10, callback_group=group),
            sub(VisualPromptMsg, p.visual_prompt_topic, self._on_visual_prompt, 10, callback_group=group),
        ]
        for stream in self._cameras.streams:
            self._inputs += self._camera_inputs(stream)

    def _camera_inputs(self, stream: CameraStream) -> list[Any]:
        """One camera's image, CameraInfo and depth subscriptions (under its namespace)."""
        sub, p, group = self.create_subscription, self.p, self._io_group
        image_qos = input_qos(p.image_reliability, p.image_qos_depth)
        on_frame = lambda m: self._cameras.put(stream, m)  # noqa: E731
        if p.image_transport == "compressed":
            image = sub(CompressedImage, stream.topic(f"{p.image_topic}/compressed"), on_frame, image_qos,
                        callback_group=group)
        else:
            image = sub(Image, stream.topic(p.image_topic), on_frame, image_qos, callback_group=group)
        inputs = [image, sub(CameraInfo, stream.topic(p.camera_info_topic), lambda m: setattr(stream, "info", m),
                             input_qos(p.camera_info_reliability, p.camera_info_qos_depth), callback_group=group)]
        if p.depth_topic:
            inputs.append(sub(
                Image, stream.topic(p.depth_topic), lambda m: stream.depths.put(stamp_seconds(m.header), m),
                input_qos(p.depth_reliability, p.depth_qos_depth), callback_group=group))
        return inputs

    def _on_prompt(self, msg: String) -> None:
        self._standing_prompt = msg.data
        self.get_logger().info(f"standing prompt: {msg.data[:80]!r}")

    def _on_visual_prompt(self, msg: VisualPromptMsg) -> None:
        self._standing_visual_prompts = [msg] if msg.kind else []

    # ---- inference ---------------------------------------------------------------------
    def _check_image_size(self, image: Any) -> None:
        """Bounds the work per image before it is converted (a 1x100000 image is 300 KB)."""
        height, width = int(getattr(image, "height", 0)), int(getattr(image, "width", 0))
        if height <= 0 or width <= 0:
            return  # compressed: its size is known once decoded (checked then)
        if height * width > self.p.max_image_pixels:
            raise InputError(f"the image is {width}x{height} = {height * width} pixels; the limit is "
                             f"{self.p.max_image_pixels} (parameter max_image_pixels): send a smaller image")
        ratio = max(height, width) / min(height, width)
        if ratio > self.p.max_aspect_ratio:
            raise InputError(f"the image is {width}x{height} (aspect ratio {ratio:.0f}); the limit is "
                             f"{self.p.max_aspect_ratio:g} (parameter max_aspect_ratio)")

    def _to_rgb(self, image: Any) -> np.ndarray:
        self._check_image_size(image)
        if isinstance(image, CompressedImage):
            rgb = compressed_to_rgb(image)
            self._check_image_size(Image(height=rgb.shape[0], width=rgb.shape[1]))
            return rgb
        return image_to_rgb(image, self._image_backend())

    def _depth_context(self, image: Image, stream: CameraStream) -> messages.DepthContext | None:
        """The camera's depth frame paired with ``image`` by stamp, with its latest CameraInfo."""
        info = stream.info
        if not self.p.depth_topic or info is None:
            return None
        depth = stream.depths.match(stamp_seconds(image.header), self.p.sync_tolerance_s,
                                    wait=self.p.sync_tolerance_s)
        if depth is None:
            return None
        try:
            check_alignment(_size(image), _size(depth), _size(info))
            return self._make_depth_context(depth, info)
        except InputError as error:  # the answer stands; only its 3D part is missing
            return messages.DepthContext.missing(f"no 3D: {error}")

    def _make_depth_context(self, depth: Image, info: CameraInfo) -> messages.DepthContext:
        intrinsics = Intrinsics.from_k(info.k).check_plausible(depth.width, depth.height)
        metres = depth_to_metres(depth, self.p.depth_scale, self._image_backend())
        return messages.DepthContext(metres, intrinsics)

    def _request_depth_context(self, image: Image, depth: Image, info: CameraInfo
                               ) -> messages.DepthContext | None:
        """Depth sent with a request image: None when absent, InputError when it cannot fit."""
        if not depth.data:
            return None
        if len(info.k) != 9 or info.k[0] <= 0 or info.k[4] <= 0:
            raise InputError("the request has depth but its camera_info has no intrinsics (k): "
                             "send the image's CameraInfo with the depth")
        check_alignment(_size(image), _size(depth), _size(info), sent=True)
        return self._make_depth_context(depth, info)

    def _image_backend(self) -> str | None:
        return None if self.p.image_backend == "auto" else self.p.image_backend

    def answer(self, image: Image, prompt: str, visual_prompts: list[VisualPromptMsg],
               depth: Callable[[], messages.DepthContext | None], on_token: Callable | None = None,
               camera: CameraStream | None = None) -> tuple[Result, RefResult, np.ndarray]:
        """One question on one image -> (Result, RefResult message, RGB [H, W, 3] uint8).
        ``depth()`` gives the image's depth context (called once the inputs are valid).
        Positions are moved to target_frame; objects of a ``camera``'s frame get its track
        IDs (an image sent with a request has no camera).
        Raises RefVLMError for input the caller can fix."""
        t0 = time.perf_counter()
        rgb = self._to_rgb(image)
        core_prompts = [messages.visual_prompt_from_msg(m, self._image_backend()) for m in visual_prompts]
        predictor = self._predictor
        if predictor is None:
            raise InputError("no model loaded: configure the node first")
        # the library's rules (the Predictor also neutralises tags and special tokens)
        predictor.check_inputs(rgb, prompt, core_prompts, self.p.max_prompt_chars, "parameter max_prompt_chars")
        context = depth()
        with self._model_lock, request_limits.returned_memory():
            if self._predictor is None:
                raise InputError("no model loaded: configure the node first")
            request_limits.check_prompt_tokens(self._predictor, prompt, self.p.max_prompt_tokens)
            on_token = request_limits.until(self._shutting_down,
                                            request_limits.with_deadline(on_token, self.p.max_request_s))
            result = self._predictor.predict(rgb, prompt, visual_prompts=core_prompts, on_token=on_token)
        config = LocalizationConfig(min_pixels=self.p.localization_min_pixels, max_depth_m=self.p.max_depth_m)
        msg = messages.result_to_msg(result, image.header, context, config)
        if self._target is not None:
            self._target.apply(msg)
        tracker = camera.tracker if camera is not None else None
        if tracker is not None:
            assign_track_ids(tracker, result, msg, stamp_seconds(image.header))
        latency = time.perf_counter() - t0
        msg.stage_names.append("node_total")
        msg.stage_seconds.append(latency)
        self._stats.record(latency)
        return result, msg, rgb

    def _worker_loop(self) -> None:
        period = 1.0 / self.p.rate_hz
        next_start = 0.0
        while not self._stop.is_set():
            delay = next_start - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
                continue
            taken = self._cameras.take(timeout=0.1)  # the cameras' new frames in turn
            prompt = self._standing_prompt
            if taken is None or not prompt:
                continue
            stream, frame = taken
            next_start = time.monotonic() + period
            try:
                result, msg, rgb = self.answer(frame, prompt, self._standing_visual_prompts,
                                               lambda: self._depth_context(frame, stream), camera=stream)
            except request_limits.ShuttingDown:
                return
            except Exception as error:  # noqa: BLE001 (log, count, keep running)
                self._stats.count_error()
                self.get_logger().error(f"standing prompt failed: {error}")
                stream.outputs["result"].publish(messages.error_result(
                    frame.header, prompt[:ERROR_PROMPT_ECHO], str(error)))
                continue
            self._publish(result, msg, rgb, stream)

    def _publish(self, result: Result, msg: RefResult, rgb: np.ndarray, stream: CameraStream) -> None:
        pubs, header = stream.outputs, msg.header
        pubs["result"].publish(msg)
        if "detections" in pubs:
            pubs["detections"].publish(messages.detections_2d(msg))
            pubs["detections_3d"].publish(messages.detections_3d(msg))
        ids = messages.instance_mask(result)
        if ids is not None:
            pubs["masks"].publish(array_to_image(ids, "mono8", header))
        depth = messages.predicted_depth(result)
        if depth is not None:
            pubs["depth"].publish(array_to_image(depth, "32FC1", header))
        if "overlay" in pubs:
            pubs["overlay"].publish(array_to_image(draw_result(rgb, result), "rgb8", header))

    # ---- requests ----------------------------------------------------------------------
    def _request_frame(self, request: Any
                       ) -> tuple[Image, Callable[[], messages.DepthContext | None], CameraStream | None]:
        """The image a request is about, how to get its depth context, and its camera: the
        request's own image with the depth sent along (no camera), or the latest frame of
        the camera it names (``camera``; empty = the first) with its paired depth."""
        if getattr(request, "use_image", False):
            image = request.image
            return image, lambda: self._request_depth_context(image, request.depth, request.camera_info), None
        stream = self._cameras.get(getattr(request, "camera", ""))
        if not self.active:
            raise InputError("the node is not active: configure and activate it, "
                             "or send the image in the request (use_image)")
        frame = stream.frames.latest()
        if frame is None:
            raise InputError(f"no camera frame received yet on '{stream.topic(self.p.image_topic)}': "
                             "publish images there or send one in the request (use_image)")
        return frame, lambda: self._depth_context(frame, stream), stream

    def _run_request(self, request: Any, reply: Any, on_token: Callable | None = None) -> Any:
        """Answers a Query request or Ground goal: fills reply.success/error/result; every
        failure becomes an error reply."""
        self._stats.count_query()
        prompt = request.prompt
        header = request.image.header if getattr(request, "use_image", False) else Image().header
        try:
            if self.p is None:
                raise InputError("the node is not configured: configure it (lifecycle) first")
            frame, depth, camera = self._request_frame(request)
            header = frame.header
            _, reply.result, _ = self.answer(frame, prompt, list(request.visual_prompts), depth, on_token,
                                             camera=camera)
            reply.success = True
        except GoalCanceled:
            raise
        except RefVLMError as error:
            self._refuse(reply, header, prompt, str(error))
        except Exception as error:  # noqa: BLE001 (a model failure must not take the node down)
            self.get_logger().error(traceback.format_exc())
            self._refuse(reply, header, prompt, f"internal error: {type(error).__name__}: {error}")
        return reply

    def _refuse_request(self, request: Any, reply: Any, error: str) -> None:
        header = request.image.header if getattr(request, "use_image", False) else Image().header
        self._refuse(reply, header, request.prompt, error)

    def _refuse(self, reply: Any, header: Any, prompt: str, error: str) -> None:
        self._stats.count_error()
        self.get_logger().error(f"request refused: {error}")
        reply.success, reply.error = False, error
        reply.result = messages.error_result(header, prompt[:ERROR_PROMPT_ECHO], error)

    @staticmethod
    def _streamer(goal_handle: Any, every: int = 4) -> Callable[[int, str], None]:
        """The Predictor's on_token callback for a ~/ground goal: the partial answer as
        feedback every ``every`` tokens; a cancel request stops generation."""
        count = 0

        def on_token(token_id: int, answer_so_far: str) -> None:
            nonlocal count
            if goal_handle.is_cancel_requested:
                raise GoalCanceled()
            count += 1
            if count % every == 0:
                goal_handle.publish_feedback(Ground.Feedback(
                    stage="decode", partial_answer=trp.plain_text(answer_so_far)))

        return on_token

    def _queue_goal(self, goal_handle: Any) -> None:
        """A ~/ground goal joins the ~/query queue (same order, same limit); the queue's
        worker answers it, streaming feedback, then ``execute`` hands the finished result
        to the action server. A cancel stops it while queued or generating."""
        goal_handle.publish_feedback(Ground.Feedback(stage="waiting for the model"))
        reply, outcome = Ground.Result(), {"canceled": False}

        def finish(handle: Any) -> Ground.Result:  # on an executor thread: no waiting here
            if outcome["canceled"]:
                handle.canceled()
                return Ground.Result(success=False, error="canceled")
            handle.publish_feedback(Ground.Feedback(stage="done", partial_answer=reply.result.answer))
            handle.succeed() if reply.success else handle.abort()
            return reply

        def hand_over() -> None:  # the queue's worker must outlive a goal it cannot return
            try:
                goal_handle.execute(finish)
            except Exception as error:  # noqa: BLE001 (e.g. the executor is gone at shutdown)
                self.get_logger().warning(f"~/ground: a goal's result could not be returned: {error}")

        def run() -> None:
            try:
                if goal_handle.is_cancel_requested:
                    raise GoalCanceled()
                self._run_request(goal_handle.request, reply, self._streamer(goal_handle))
            except GoalCanceled:
                outcome["canceled"] = True
            hand_over()

        def refuse(reason: str) -> None:
            self._refuse_request(goal_handle.request, reply, reason)
            hand_over()

        self._queries.submit_call(run, refuse)

    # ---- diagnostics -------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        stats, frames = self._stats, self._cameras.counts()
        values = {
            # The lifecycle's own state ("inactive" is called "configured" here).
            "state": {"inactive": "configured"}.get(self.lifecycle_state(), self.lifecycle_state()),
            "rate_hz": f"{stats.rate_hz():.2f}",
            "latency_ms": f"{stats.mean_latency_s() * 1e3:.1f}",
            "frames_received": str(frames["received"]),
            "frames_dropped": str(frames["dropped"]),
            "cameras": ",".join(stream.label for stream in self._cameras.streams),
            "inferences": str(stats.inferences),
            "queries": str(stats.queries),
            "queries_waiting": str(self._queries.pending),
            "busy_replies": str(self._queries.busy_replies),
            "errors": str(stats.errors),
            "python_threads": str(threading.active_count()),
            # Without the executor's pool (it grows on demand up to its bound).
            "own_threads": str(sum(not t.name.startswith("ThreadPoolExecutor")
                                   for t in threading.enumerate())),
            "inference_threads": str(sum(t.name == WORKER_NAME for t in threading.enumerate())),
            "rss_mb": f"{request_limits.rss_mb():.1f}",
            **(self._runtime if self._predictor is not None else {}),
            **(self._load if self._predictor is not None else {}),
            **(self._target.diagnostics() if self._target is not None else {}),
            "live_tracks": str(sum(s.tracker.live_tracks for s in self._cameras.streams if s.tracker is not None)),
        }
        transform_error = values.get("last_transform_error", "")
        status = DiagnosticStatus(level=DiagnosticStatus.WARN if transform_error else DiagnosticStatus.OK,
                                  name=f"{self.get_name()}: inference", hardware_id=self.get_name(),
                                  message=transform_error or values["state"],
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)


def main(args: list[str] | None = None) -> None:
    use_camera_profile()  # whole frames through Fast DDS's shared memory
    rclpy.init(args=args)
    run(RefVLMNode())


def run(node: RefVLMNode) -> None:
    """Spins a node on a multi-threaded executor until shutdown (rclpy initialised).
    Ctrl-C at any moment (even during the autostart configure) ends it cleanly."""
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        if node.autostart:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except rclpy._rclpy_pybind11.RCLError:  # noqa: SLF001
        # Ctrl-C during the autostart configure shuts the context down under the transition,
        # which then cannot publish its state: a shutdown, not an error. Anything else is one.
        if rclpy.ok(context=node.context):
            raise
    finally:
        # A second Ctrl-C must not interrupt the teardown half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        node.shutdown_cleanly()
        executor.shutdown(timeout_sec=5.0)
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
