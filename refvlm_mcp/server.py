"""The MCP server: typed perception tools and two resources over a Perception (ROS or
library mode). Tools turn a short description into the prompt phrasing the model was
taught, validate every argument (the schemas carry the limits), and turn every failure
the agent can act on into a tool error (is_error with the message); the server keeps
serving.

Prompt safety: descriptions and prompts reach Predictor.predict in both modes (through
the node's ~/query in ROS mode), which neutralises TRP tags and the LLM's special tokens;
TRP tags are also neutralised here, so the text the node logs is the text the model read.
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import deque
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from refvlm_core import trp
from refvlm_mcp import pictures, schemas
from refvlm_mcp.observation import Found, Observation, Perception, PerceptionError

INSTRUCTIONS = (
    "Perception for a robot: a REF-VLM model looking through the robot's camera. Read the "
    "'refvlm://status' resource to see whether the perception node is up, and "
    "'refvlm://cameras' for the camera names. Use locate to find objects and their 3D "
    "positions (for grasping or navigating), segment for their exact outline, pose for a "
    "person's body keypoints, depth for the distance to an object, look to see the camera "
    "image yourself, ask for any other question about the view. Pixel coordinates are in the "
    "camera image; 3D positions are metres in the named TF frame.")

# Prompts phrased as the model was taught (SimWorld REC / RES / keypoint requests).
PROMPTS = {
    "locate": "Locate the {}.",
    "segment": "Segment the {}.",
    "pose": "Estimate the pose of the {}.",
}
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]*$"
NO_CONTROL_BUT_LINES = r"^[^\x00-\x08\x0b-\x1f\x7f]*$"  # newlines and tabs allowed

Description = Annotated[str, Field(
    min_length=1, max_length=200, pattern=NO_CONTROL_CHARACTERS,
    description="the object to find, in a few words, e.g. 'red cube' or 'mug left of the laptop'")]
Camera = Annotated[str | None, Field(
    max_length=100, pattern=r"^[A-Za-z0-9_/.\-]*$",
    description="camera name from the refvlm://cameras resource; omit for the default camera")]

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=False,
                            open_world_hint=False)


def prompt_for(tool: str, description: str) -> str:
    """'  the red cube. ' -> 'Locate the red cube.'"""
    text = re.sub(r"\s+", " ", description).strip().rstrip(".?!").strip()
    text = re.sub(r"^(the|a|an)\b\s*", "", text, flags=re.IGNORECASE)
    if not text:
        raise ToolError("the description is empty: name the object, e.g. 'red cube'")
    return PROMPTS[tool].format(trp.neutralize(text))


class CallTimes:
    """Wall time of the last tool calls (the latency an agent sees), for the status resource."""

    def __init__(self, keep: int = 50) -> None:
        self._times: deque[tuple[str, float]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def record(self, tool: str, seconds: float) -> None:
        with self._lock:
            self._times.append((tool, seconds))

    def summary(self) -> dict[str, Any]:
        with self._lock:
            times = [s for _, s in self._times]
        return {"tool_calls": len(times),
                "mean_tool_call_ms": round(1e3 * sum(times) / len(times), 1) if times else None}


def _tool_error(error: PerceptionError) -> ToolError:
    message = str(error)
    if error.retry_after_s is not None:
        message += f" Retry in about {error.retry_after_s:.0f} s."
    return ToolError(message)


def _nothing_matched(description: str, obs: Observation, what: str) -> ToolError:
    said = f" (the model answered: {obs.answer.strip()[:200]!r})" if obs.answer.strip() else ""
    return ToolError(f"nothing matched {description!r} with {what} in the image from camera "
                     f"{obs.camera!r}{said}. Check the description, or call look to see what the "
                     "camera sees.")


def _with_content(structured: BaseModel, images: list[tuple[bytes, str]]) -> CallToolResult:
    """A result with both the typed structured content and image blocks (a JSON text
    block first, for clients that only read text)."""
    payload = structured.model_dump(mode="json")
    content: list[Any] = [TextContent(text=json.dumps(payload))]
    content += [ImageContent(data=base64.b64encode(data).decode("ascii"), mime_type=mime)
                for data, mime in images]
    return CallToolResult(content=content, structured_content=payload)


def build_server(perception: Perception, name: str = "refvlm") -> MCPServer:
    server = MCPServer(name=name, instructions=INSTRUCTIONS)
    last_answer: dict[str, Observation] = {}  # per camera, for look(annotate=True)
    times = CallTimes()

    def observe(tool: str, prompt: str, camera: str | None) -> Observation:
        start = time.perf_counter()
        try:
            obs = perception.ask(prompt, camera)
        except PerceptionError as error:
            raise _tool_error(error) from None
        finally:
            times.record(tool, time.perf_counter() - start)
        last_answer[obs.camera] = obs
        return obs

    def with_(obs: Observation, description: str, what: str, keep) -> list[Found]:
        found = [f for f in obs.objects if keep(f)]
        if not found:
            raise _nothing_matched(description, obs, what)
        return found

    @server.tool(annotations=READ_ONLY, description=(
        "Find objects described in words in the robot's current camera view. Returns each match's "
        "bounding box (pixels), confidence and, when the camera has depth, its 3D position in metres "
        "with the TF frame: what a grasp or navigation goal needs. Use for 'where is X', 'pick up X', "
        "'go to X'. Describe one kind of object, e.g. 'red cube'."))
    def locate(description: Description, camera: Camera = None) -> schemas.LocateResult:
        obs = observe("locate", prompt_for("locate", description), camera)
        found = with_(obs, description, "a box", lambda f: f.box_xyxy is not None)
        return schemas.LocateResult(objects=[schemas.located(f) for f in found], answer=obs.answer,
                                    image=schemas.frame_info(obs), model_ms=obs.model_ms)

    @server.tool(annotations=READ_ONLY, description=(
        "Outline objects described in words: each one's pixel mask as a PNG image (white = object, "
        "camera image size), its area in pixels, bounding box and, with depth, 3D position. Use when "
        "the exact shape matters (grasp points, free space); for positions locate is enough."))
    def segment(description: Description, camera: Camera = None
                ) -> Annotated[CallToolResult, schemas.SegmentResult]:
        obs = observe("segment", prompt_for("segment", description), camera)
        found = with_(obs, description, "a mask", lambda f: f.mask is not None and f.mask.any())
        objects = [schemas.SegmentedObject(
            phrase=f.phrase, area_px=int(f.mask.sum()), box=schemas.mask_box(f.mask), score=schemas.number(f.score),
            position=schemas.position_of(f), mask_image=k, track_id=f.track_id) for k, f in enumerate(found)]
        result = schemas.SegmentResult(objects=objects, answer=obs.answer, image=schemas.frame_info(obs),
                                       model_ms=obs.model_ms)
        return _with_content(result, [(pictures.mask_png(f.mask), "image/png") for f in found])

    @server.tool(annotations=READ_ONLY, description=(
        "Body keypoints of the described person(s) (COCO-17: nose, eyes, ears, shoulders, elbows, "
        "wrists, hips, knees, ankles), in pixels with a visibility probability. Use for gestures, "
        "where a person points, faces or stands."))
    def pose(description: Description = "person", camera: Camera = None) -> schemas.PoseResult:
        obs = observe("pose", prompt_for("pose", description), camera)
        found = with_(obs, description, "keypoints", lambda f: bool(f.keypoints))
        return schemas.PoseResult(
            objects=[schemas.PosedObject(phrase=f.phrase, keypoints=schemas.keypoints_of(f), box=schemas.box_of(f),
                                         track_id=f.track_id) for f in found],
            answer=obs.answer, image=schemas.frame_info(obs), model_ms=obs.model_ms)

    @server.tool(annotations=READ_ONLY, description=(
        "Distance in metres from the camera to the described object: from the camera's depth image "
        "(source 'sensor', with the 3D position) or, where the node has no depth camera, the model's "
        "own depth estimate when it gave one (source 'model')."))
    def depth(description: Description, camera: Camera = None) -> schemas.DepthResult:
        obs = observe("depth", prompt_for("locate", description), camera)
        if not obs.objects:
            raise _nothing_matched(description, obs, "a box")
        objects = []
        for f in obs.objects:
            position = schemas.position_of(f)
            if position is not None:
                objects.append(schemas.DepthObject(phrase=f.phrase, distance_m=position.distance_m, source="sensor",
                                                   position=position, box=schemas.box_of(f), track_id=f.track_id))
            elif f.depth_median_m is not None:
                objects.append(schemas.DepthObject(phrase=f.phrase, distance_m=round(f.depth_median_m, 4),
                                                   source="model", position=None, box=schemas.box_of(f),
                                                   track_id=f.track_id))
        if not objects:
            reasons = "; ".join(sorted({f.position_status for f in obs.objects if f.position_status}))
            raise ToolError(f"found {len(obs.objects)} object(s) for {description!r} but no distance: "
                            f"{reasons or 'no depth for them'}. The camera needs a depth image and "
                            "CameraInfo; locate still gives the box.")
        return schemas.DepthResult(objects=objects, answer=obs.answer, image=schemas.frame_info(obs),
                                   model_ms=obs.model_ms)

    @server.tool(annotations=READ_ONLY, description=(
        "Any question about the camera view in words (describe the scene, is there X, what is left of "
        "Y, count Z). Returns the model's answer, the raw answer in TRP markup and every object it "
        "referred to (box, mask area, keypoints, 3D position). Use when locate, segment, pose and "
        "depth do not fit."))
    def ask(prompt: Annotated[str, Field(min_length=1, max_length=1000, pattern=NO_CONTROL_BUT_LINES,
                description="the question or instruction, e.g. 'What is on the table?'")],
            camera: Camera = None) -> schemas.AskResult:
        if not prompt.strip():
            raise ToolError("the prompt is empty: ask a question about the camera view")
        obs = observe("ask", trp.neutralize(prompt.strip()), camera)
        return schemas.AskResult(answer=obs.answer, trp_text=obs.trp_text,
                                 objects=[schemas.asked(f) for f in obs.objects], errors=obs.errors,
                                 image=schemas.frame_info(obs), model_ms=obs.model_ms)

    @server.tool(annotations=READ_ONLY, description=(
        "The latest camera image (JPEG), to see the scene yourself. annotate=true draws the last "
        "answer of the other tools on the image it was about (boxes, masks, keypoints, labels) to "
        "check what they found. Costs image tokens: use the other tools for positions."))
    def look(camera: Camera = None,
             annotate: Annotated[bool, Field(description="draw the last answer on its image")] = False,
             max_side: Annotated[int, Field(ge=64, le=4096,
                                            description="longest side of the returned image, pixels")] = 640,
             ) -> Annotated[CallToolResult, schemas.LookResult]:
        start = time.perf_counter()
        try:
            frame = perception.latest_frame(camera)
        except PerceptionError as error:
            raise _tool_error(error) from None
        drawn = None
        obs = last_answer.get(frame.camera) if annotate else None
        if annotate and obs is None:
            raise ToolError(f"no answer to draw yet for camera {frame.camera!r}: call locate, segment, "
                            "pose, depth or ask first, or look without annotate")
        if obs is not None and obs.frame is not None:
            frame, drawn = obs.frame, obs.prompt  # the image the answer is about
            rgb = pictures.draw(frame.rgb(), obs)
        elif obs is not None:  # that image is gone: draw on the latest one
            rgb, drawn = pictures.draw(frame.rgb(), obs), f"{obs.prompt} (drawn on a later image)"
        else:
            rgb = frame.rgb()
        small, scale = pictures.shrink(rgb, max_side)
        times.record("look", time.perf_counter() - start)
        info = schemas.FrameInfo(camera=frame.camera, frame_id=frame.frame_id, stamp_s=frame.stamp_s,
                                 width=frame.width, height=frame.height)
        return _with_content(schemas.LookResult(image=info, drawn_answer=drawn, scale=round(scale, 4)),
                             [(pictures.encode(small, "jpeg"), "image/jpeg")])

    @server.resource("refvlm://cameras", name="cameras", mime_type="application/json", description=(
        "The cameras the perception node serves: name (the tools' camera argument), image topic, "
        "whether depth and CameraInfo arrive (3D positions need both)."))
    def cameras() -> str:
        try:
            return json.dumps({"cameras": perception.cameras()})
        except PerceptionError as error:
            raise ResourceError(str(error)) from None

    @server.resource("refvlm://status", name="status", mime_type="application/json", description=(
        "Whether perception is ready and how fast: mode (ros or library), node state, model, "
        "runtime, the model's mean latency, the latency of tool calls as an agent sees it."))
    def status() -> str:
        return json.dumps({**perception.status(), **times.summary()})

    return server
