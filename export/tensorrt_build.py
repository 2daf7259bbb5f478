"""TensorRT engines from the exported ONNX graphs, with the TensorRT Python API.

Works with the full ``tensorrt`` module (robots: JetPack, NGC containers) and with
``tensorrt_rtx`` (installs from PyPI and builds without a GPU: CI uses it to check
that every graph parses and builds with its optimisation profiles).

Profiles come from named dims (:class:`ProfileConfig`): ``batch``, ``L`` (REF queries
per unit group), ``size`` (image side; pyramid levels are ``size/stride``) and ``tokens``
(projector input length), each ``min/opt/max``. Every builder message is captured; an
error, or a warning that the profile is not self-consistent, fails the build.

Engines are cached under a key of GPU model, compute capability, TensorRT version, ONNX
sha256, precision and profile. A sidecar ``<part>.engine.json`` records the key; an
engine whose key does not match what is needed (:func:`ensure_engines`: this machine,
this ONNX, this profile) is rebuilt (when its ONNX is at hand) or refused with the
command that builds it, never loaded blindly. :meth:`ProfileConfig.for_node` is the
profile the node feeds: batch 1, L = the model's router_length, the model frame S.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_export.manifest import Manifest, PartSpec, export_command, file_sha256, resolve_shape

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"
# Builder messages that mean the engine would be wrong for some allowed shape.
FATAL_WARNINGS = ("not self-consistent", "profile", "invalid", "failed")


class EngineBuildError(CheckpointError):
    """The ONNX graph did not parse or the engine did not build (message has the builder log)."""


def import_tensorrt(prefer: str | None = None) -> ModuleType:
    """The ``tensorrt`` module, else ``tensorrt_rtx``; ConfigError when neither is installed."""
    names = [prefer] if prefer else ["tensorrt", "tensorrt_rtx"]
    for name in names:
        try:
            module = importlib.import_module(name)
            module.Builder  # the PyPI placeholder of `tensorrt` imports but has no API
            return module
        except (ImportError, AttributeError, OSError) as error:
            log.debug("%s unavailable: %s", name, error)
    raise ConfigError(f"no usable TensorRT module ({' or '.join(names)}): install TensorRT from the machine's "
                      "own install (JetPack, NGC) or `pip install .[tensorrt-rtx]` for CPU engine builds")


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__.startswith("tensorrt_rtx")


# ---- profiles -----------------------------------------------------------------------

@dataclass
class DimRange:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, name: str) -> "DimRange":
        try:
            low, opt, high = (int(v) for v in text.split("/"))
        except ValueError:
            raise ConfigError(f"profile {name}={text!r}: write min/opt/max, e.g. {name}=1/8/100") from None
        if not 1 <= low <= opt <= high:
            raise ConfigError(f"profile {name}={text}: need 1 <= min <= opt <= max")
        return cls(low, opt, high)


@dataclass
class ProfileConfig:
    """min/opt/max of every named dim of the exported graphs."""
    batch: DimRange = field(default_factory=lambda: DimRange(1, 1, 1))
    L: DimRange = field(default_factory=lambda: DimRange(1, 8, 100))
    size: DimRange = field(default_factory=lambda: DimRange(64, 64, 64))
    tokens: DimRange = field(default_factory=lambda: DimRange(1, 16, 16))

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> "ProfileConfig":
        """Defaults from the export: L up to max(100, router_length), the model's image side."""
        size = manifest.image_size
        tokens = next((p.outputs[0].shape[1] for p in manifest.parts if p.part == "vit"), manifest.router_length)
        return cls(L=DimRange(1, manifest.router_length, max(100, manifest.router_length)),
                   size=DimRange(size, size, size), tokens=DimRange(1, int(tokens), int(tokens)))

    @classmethod
    def for_node(cls, manifest: Manifest) -> "ProfileConfig":
        """What the node feeds the graphs: one image, every unit group padded to exactly L =
        router_length REFs (inference keeps the export contract's fixed L), the model frame S
        (a camera image of any size is letterboxed to S x S before the encoders), and 1 to
        all ViT tokens into the projector (pooled image tokens, region tokens)."""
        size, length = manifest.image_size, manifest.router_length
        tokens = int(next((p.outputs[0].shape[1] for p in manifest.parts if p.part == "vit"), length))
        return cls(batch=DimRange(1, 1, 1), L=DimRange(length, length, length),
                   size=DimRange(size, size, size), tokens=DimRange(1, tokens, tokens))

    def to_text(self) -> str:
        """The ``--profiles`` text that gives this profile back (``override`` reads it)."""
        return ",".join(f"{name}={r.min}/{r.opt}/{r.max}"
                        for name, r in ((n, getattr(self, n)) for n in ("batch", "L", "size", "tokens")))

    def override(self, text: str | None) -> "ProfileConfig":
        """Apply ``batch=1/1/4,L=1/32/100,size=64/64/128`` (any subset)."""
        for item in filter(None, (text or "").split(",")):
            name, _, value = item.partition("=")
            if not hasattr(self, name.strip()):
                raise ConfigError(f"--profiles: unknown dim {name!r}; use batch, L, size, tokens")
            setattr(self, name.strip(), DimRange.parse(value.strip(), name.strip()))
        return self

    def shapes(self, spec: PartSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
        """input name -> (min, opt, max) shapes."""
        picks = {which: {name: getattr(getattr(self, name), which) for name in ("batch", "L", "size", "tokens")}
                 for which in ("min", "opt", "max")}
        return {t.name: tuple(resolve_shape(t.shape, picks[w]) for w in ("min", "opt", "max")) for t in spec.inputs}


# ---- builder log --------------------------------------------------------------------

def make_logger(trt: ModuleType) -> Any:
    """An ILogger that keeps every message (severity name, text)."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((str(severity).split(".")[-1], msg))

        def problems(self) -> list[str]:
            bad = []
            for severity, text in self.messages:
                fatal = severity in ("ERROR", "INTERNAL_ERROR")
                if severity == "WARNING" and any(w in text.lower() for w in FATAL_WARNINGS):
                    fatal = True
                if fatal:
                    bad.append(f"{severity}: {text}")
            return bad

    return CapturingLogger()


# ---- engine key ---------------------------------------------------------------------

def device_identity(trt: ModuleType, target: str | None = None) -> dict[str, str]:
    """GPU model and compute capability of this machine; a CPU-only build names its target."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    if not is_rtx(trt):
        raise ConfigError("TensorRT needs a CUDA GPU to build engines; on a CPU-only machine install "
                          "tensorrt-rtx and pass a target compute capability (e.g. --target SM89)")
    return {"gpu": "none (CPU build)", "compute_capability": target or "SM89"}


def engine_key(trt: ModuleType, identity: dict[str, str], onnx_sha: str, fp16: bool,
               shapes: dict[str, Any]) -> dict[str, Any]:
    key = {**identity, "tensorrt": f"{trt.__name__} {trt.__version__}", "onnx_sha256": onnx_sha,
           "fp16": fp16, "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}
    key["digest"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return key


def engine_paths(out: Path, part: str) -> tuple[Path, Path]:
    return out / f"{part}{ENGINE_SUFFIX}", out / f"{part}{ENGINE_SUFFIX}.json"


# ---- profile check against the graph's symbolic dims -----------------------------------

def check_profile(onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]]) -> None:
    """Raise EngineBuildError unless every symbolic dim of the graph gets one min/opt/max.

    The exporter names each dynamic dim (``batch``, ``L``, ``h0``, ``32*side32``); inputs that
    share a name must share its range, and ``k*name`` must be a multiple of k. TensorRT itself
    accepts some such profiles and only fails at run time, so the check is done here.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    seen: dict[str, tuple[tuple[int, int, int], str]] = {}
    problems = []
    for tensor in graph.input:
        for axis, dim in enumerate(tensor.type.tensor_type.shape.dim):
            ranges = tuple(int(shape[axis]) for shape in shapes[tensor.name])  # (min, opt, max)
            if dim.dim_value and any(r != dim.dim_value for r in ranges):
                problems.append(f"{tensor.name} axis {axis} is fixed at {dim.dim_value}, profile gives {ranges}")
            if not dim.dim_param:
                continue
            factor, _, symbol = dim.dim_param.rpartition("*")
            if factor.isdigit():
                if any(r % int(factor) for r in ranges):
                    problems.append(f"{tensor.name} axis {axis} must be a multiple of {factor}, profile gives {ranges}")
                ranges = tuple(r // int(factor) for r in ranges)
            else:
                symbol = dim.dim_param
            if symbol in seen and seen[symbol][0] != ranges:
                problems.append(f"dim {symbol!r}: {seen[symbol][1]} gives {seen[symbol][0]}, "
                                f"{tensor.name} axis {axis} gives {ranges}")
            seen.setdefault(symbol, (ranges, f"{tensor.name} axis {axis}"))
    if problems:
        raise EngineBuildError(f"{onnx_path}: profile values are not self-consistent: {problems}")


# ---- build --------------------------------------------------------------------------

def build_engine(trt: ModuleType, onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]],
                 fp16: bool = False, target: str | None = None, workspace_mb: int = 1024) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with one optimisation profile."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode left (TRT >= 10)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}; re-export it with "
                               f"`{export_command('M', 'DIR')}`")
    check_profile(onnx_path, shapes)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ConfigError(f"{trt.__name__} is strongly typed (no FP16 builder flag): build fp32, or export "
                              "an fp16 ONNX graph")
        config.set_flag(trt.BuilderFlag.FP16)
    if is_rtx(trt) and target:  # CPU build: name the GPU generation the engine is for
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0)
    profile = builder.create_optimization_profile()
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = names - set(shapes)
    if missing:
        raise EngineBuildError(f"{onnx_path}: no profile for inputs {sorted(missing)}")
    for name in names:
        profile.set_shape(name, *shapes[name])
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"{onnx_path}: TensorRT rejected the profile {shapes}: {logger.problems()}")
    serialized = builder.build_serialized_network(network, config)
    problems = logger.problems()
    if serialized is None or problems:
        raise EngineBuildError(f"building an engine from {onnx_path} failed with profile {shapes}: "
                               f"{problems or 'no engine returned'}")
    return bytes(serialized)


def build_engines(onnx_dir: str | Path, out_dir: str | Path, profiles: ProfileConfig | None = None,
                  fp16: bool = False, parts: list[str] | None = None, target: str | None = None,
                  trt: ModuleType | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or reuse from the cache) one engine per exported part; part -> engine path."""
    trt = trt or import_tensorrt()
    return ensure_engines(onnx_dir, out_dir, profiles, parts, trt=trt, identity=device_identity(trt, target),
                          fp16=fp16, build=True, force=force)


def tensorrt_command(onnx_dir: str | Path, engine_dir: str | Path, profiles: ProfileConfig,
                     parts: list[str] | None, fp16: bool, identity: dict[str, str]) -> str:
    """The `refvlm export tensorrt` command that builds engines with exactly this key."""
    command = f"refvlm export tensorrt --onnx {onnx_dir} --out {engine_dir} --profiles {profiles.to_text()}"
    if parts:
        command += f" --parts {','.join(parts)}"
    if fp16:
        command += " --fp16"
    if identity["gpu"].startswith("none"):  # a CPU build names the GPU generation it targets
        command += f" --target {identity['compute_capability']}"
    return command


def ensure_engines(onnx_dir: str | Path, engine_dir: str | Path, profiles: ProfileConfig | None,
                   parts: list[str] | None, *, trt: ModuleType, identity: dict[str, str], fp16: bool = False,
                   build: bool = True, force: bool = False) -> dict[str, Path]:
    """part -> engine path, each engine built for ``identity`` (GPU, compute capability), this
    TensorRT, the part's ONNX file as it is now, ``fp16`` and ``profiles``. A missing or stale
    engine is built into ``engine_dir`` when ``build`` (``force``: every engine), else refused
    with a CheckpointError that says why and which command builds it."""
    manifest = Manifest.load(onnx_dir)
    profiles = profiles or ProfileConfig.for_manifest(manifest)
    specs = [spec for spec in manifest.parts if not parts or spec.part in parts]
    command = tensorrt_command(onnx_dir, engine_dir, profiles, parts, fp16, identity)
    out = Path(engine_dir)
    engines = {}
    for spec in specs:
        onnx_path = Path(onnx_dir) / spec.file
        if not onnx_path.is_file():
            raise CheckpointError(f"{onnx_path} is missing: re-run `{export_command('M', onnx_dir)}`")
        shapes = profiles.shapes(spec)
        key = engine_key(trt, identity, file_sha256(onnx_path), fp16, shapes)
        engine_path, key_path = engine_paths(out, spec.part)
        problem = "a rebuild was asked for" if force else engine_problem(engine_path, key_path, key)
        if problem is None:
            log.info("%s: cached engine matches (%s)", spec.part, key["digest"][:12])
        elif not build:
            raise CheckpointError(f"the TensorRT engine {engine_path} cannot be used: {problem}; build it with "
                                  f"`{command}`")
        else:
            log.info("%s: building an engine (%s)", spec.part, problem)
            _write_engine(trt, onnx_path, spec, shapes, key, fp16, identity, engine_path, key_path, command)
        engines[spec.part] = engine_path
    return engines


def _write_engine(trt: ModuleType, onnx_path: Path, spec: PartSpec, shapes: dict[str, Any], key: dict[str, Any],
                  fp16: bool, identity: dict[str, str], engine_path: Path, key_path: Path, command: str) -> None:
    target = identity["compute_capability"] if is_rtx(trt) and identity["gpu"].startswith("none") else None
    engine = build_engine(trt, onnx_path, shapes, fp16, target)
    try:
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(engine)
        key_path.write_text(json.dumps({**key, "part": spec.part, "onnx": spec.file}, indent=2))
    except OSError as error:
        raise CheckpointError(f"cannot write the engine cache {engine_path.parent} ({error}): build the engines "
                              f"where they can be written with `{command}`") from error
    log.info("%s: built %s (%.1f kB)", spec.part, engine_path, len(engine) / 1024)


def engine_problem(engine_path: Path, key_path: Path, wanted: dict[str, Any]) -> str | None:
    """Why the cached engine cannot stand in for one built with key ``wanted`` (None: it can)."""
    if not engine_path.is_file():
        return "there is no engine"
    key = cached_key(key_path)
    if key is None:
        return f"its key file {key_path.name} is missing or corrupt"
    if key.get("digest") == wanted["digest"] and key == wanted:
        return None
    labels = {"onnx_sha256": "another ONNX graph", "profile": "another optimisation profile",
              "fp16": f"fp16={key.get('fp16')} (needed fp16={wanted['fp16']})"}
    reasons = [labels.get(name) or f"{name} {key.get(name)!r} (here {value!r})"
               for name, value in wanted.items() if name != "digest" and key.get(name) != value]
    return "it was built for " + ", ".join(reasons or ["another key"])


def cached_key(key_path: Path) -> dict[str, Any] | None:
    if not key_path.is_file():
        return None
    try:
        data = json.loads(key_path.read_text())
    except json.JSONDecodeError:
        return None
    return {k: v for k, v in data.items() if k not in ("part", "onnx")}


def check_engine(engine_dir: str | Path, part: str, trt: ModuleType, identity: dict[str, str]) -> Path:
    """The engine of ``part`` if it was built for this GPU and TensorRT; CheckpointError otherwise."""
    engine_path, key_path = engine_paths(Path(engine_dir), part)
    rebuild = f"`refvlm export tensorrt --onnx ONNX_DIR --out {engine_dir}`"
    if not engine_path.is_file() or not key_path.is_file():
        raise CheckpointError(f"{engine_path} (or its {key_path.name}) is missing: build it with {rebuild}")
    key = cached_key(key_path)
    if key is None:
        raise CheckpointError(f"{key_path} is corrupt: rebuild the engine with {rebuild}")
    here = {**identity, "tensorrt": f"{trt.__name__} {trt.__version__}"}
    stale = {k: (key.get(k), v) for k, v in here.items() if key.get(k) != v}
    if stale:
        raise CheckpointError(f"{engine_path} was built for another machine or TensorRT ({stale}: engine vs "
                              f"here): rebuild it on this machine with {rebuild}")
    return engine_path
