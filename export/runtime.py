"""Exported runtimes for the Predictor (the ``refvlm_core.runtime.Runtime`` interface): the
ViT, the ConvNeXt pyramid, the projector and every unit decoder from one export folder. The
LLM stays in torch; the ViT token pooling (``config.llm_image_pool``) stays in torch too
(RefVLM.image_tokens), so the graphs are the same whatever the pool.

``select_runtime(kind, model, export_dir, device, model_arg, build_engines)`` is what the
node, the demo and the benchmarks call: a kind of ``RUNTIME_KINDS`` (``torch``,
``onnxruntime``, ``tensorrt`` or ``auto``: tensorrt, else ONNX Runtime CUDA, else ONNX
Runtime CPU, else torch), and the reason for its choice; ``Predictor.set_runtime`` runs it.
Each runtime first runs ``refvlm_export.manifest.check_export``: an export that is missing or stale
(another config, other weights, parts missing) is refused with the command that rebuilds
it; so is a missing or stale TensorRT engine (another GPU, TensorRT, ONNX file or profile)
unless ``build_engines``, which builds it into ``<export>/engines`` for the node's profile
(``ProfileConfig.for_node``). ``auto`` logs each refusal and moves on.

The runtimes' decoders are ``OnnxRuntimeDecoders`` and ``TensorRTDecoders``:
``run(unit, ref_embeddings, ref_valid, pyramid)`` for one unit (parity checks and
benchmarks use them alone, also on a decoders-only export) and ``run_decoders(routed,
pyramid)`` like ``RefVLM.run_decoders``. Every ONNX Runtime session asserts the provider
actually in use (onnxruntime-gpu falls back to CPU silently: that is refused).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from refvlm_core.config import RUNTIME_KINDS
from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_core.features import ImageFeatures
from refvlm_core.runtime import TorchRuntime
from refvlm_export.manifest import VISION_PARTS, Manifest, PartSpec, check_export, export_command, resolve_shape

log = logging.getLogger(__name__)

__all__ = ["RUNTIME_KINDS", "ORT_PROVIDERS", "select_runtime", "OnnxRuntimeVision",
           "TensorRTVision", "OnnxRuntimeDecoders", "TensorRTDecoders"]

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
ENGINE_DIR = "engines"  # the TensorRT engine cache inside an export folder


def ort_session(ort: Any, path: Path, options: Any, provider: str) -> Any:
    """An ONNX Runtime session of ``path`` on ``provider`` (an ORT_PROVIDERS value), refused
    when the file is missing or corrupt, or when ONNX Runtime fell back to another provider."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: rebuild it with `{export_command('M', path.parent)}`")
    try:
        session = ort.InferenceSession(str(path), options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
    except Exception as error:  # onnxruntime raises its own untyped errors for corrupt files
        raise CheckpointError(f"{path} cannot be loaded ({str(error)[:200]}): rebuild it with "
                              f"`{export_command('M', path.parent)}`") from error
    in_use = session.get_providers()
    if in_use[0] != provider:  # silent fallback: refuse it
        raise ConfigError(f"onnxruntime fell back to {in_use} instead of {provider} for {path.name}: check the "
                          "CUDA/TensorRT install, or pick provider 'cpu'")
    return session


def _session_options(ort: Any, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class _Decoders:
    """Runs the exported decoders of each unit; ``run_decoders`` as ``RefVLM.run_decoders``."""

    units: tuple[str, ...] = ()

    def run(self, unit: str, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def run_decoders(self, routed: dict[str, Any], pyramid: Sequence[Tensor]) -> dict[str, dict[str, Tensor]]:
        """routed: unit -> RoutedRefs (embeddings [B, L, D], valid [B, L] bool)."""
        return {unit: self.run(unit, refs.embeddings, refs.valid, pyramid) for unit, refs in routed.items()}


class OnnxRuntimeDecoders(_Decoders):
    """The exported decoder graphs under ONNX Runtime (``units``: only these)."""

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", config: Any | None = None,
                 units: Sequence[str] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        if provider not in ORT_PROVIDERS:
            raise ConfigError(f"onnxruntime provider {provider!r}: use one of {list(ORT_PROVIDERS)}")
        self.folder = Path(onnx_dir)
        self.manifest = check_export(self.folder, config=config)
        wanted = ORT_PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise ConfigError(f"onnxruntime here has no {wanted} (has {ort.get_available_providers()}): install "
                              "onnxruntime-gpu (extra ort-gpu) or pick provider 'cpu'")
        options = _session_options(ort, threads)
        self.sessions: dict[str, Any] = {}
        self.specs: dict[str, PartSpec] = {}
        for spec in self.manifest.parts:
            if spec.unit is None or (units and spec.unit not in units):
                continue
            self.sessions[spec.unit] = ort_session(ort, self.folder / spec.file, options, wanted)
            self.specs[spec.unit] = spec
        self.units = tuple(self.sessions)
        self.provider = wanted

    def run(self, unit: str, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        if unit not in self.sessions:
            raise ConfigError(f"the export in {self.folder} has no decoder for unit {unit!r} (has {list(self.units)})")
        spec = self.specs[unit]
        arrays = [ref_embeddings, ref_valid.float(), *pyramid]
        feeds = {t.name: a.detach().float().cpu().numpy() for t, a in zip(spec.inputs, arrays)}
        outputs = self.sessions[unit].run([t.name for t in spec.outputs], feeds)
        device = ref_embeddings.device
        return {t.name: torch.from_numpy(np.asarray(o)).to(device) for t, o in zip(spec.outputs, outputs)}


class TensorRTDecoders(_Decoders):
    """Native TensorRT engines; torch CUDA tensors bound by address on the current stream
    (no host copies)."""

    def __init__(self, engine_dir: str | Path, onnx_dir: str | Path, config: Any | None = None,
                 trt: Any | None = None) -> None:
        from refvlm_export.tensorrt_build import check_engine, device_identity, import_tensorrt

        if not torch.cuda.is_available():
            raise ConfigError("TensorRT needs a CUDA GPU: pick onnxruntime or torch")
        self.trt = trt or import_tensorrt()
        self.manifest = check_export(onnx_dir, config=config)
        identity = device_identity(self.trt)
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engines, self.contexts, self.specs = {}, {}, {}
        for spec in self.manifest.parts:
            if spec.unit is None:
                continue
            path = check_engine(engine_dir, spec.part, self.trt, identity)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise CheckpointError(f"{path} is corrupt: rebuild it with `refvlm export tensorrt --onnx {onnx_dir} "
                                      f"--out {engine_dir}`")
            self.engines[spec.unit], self.specs[spec.unit] = engine, spec
            self.contexts[spec.unit] = engine.create_execution_context()
        self.units = tuple(self.engines)

    @torch.no_grad()
    def run(self, unit: str, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        spec, context = self.specs[unit], self.contexts[unit]
        # Kept referenced until the call returns: the engine reads them by address.
        inputs = [t.to("cuda", torch.float32).contiguous() for t in (ref_embeddings, ref_valid.float(), *pyramid)]
        dims = {"batch": ref_embeddings.shape[0], "L": ref_embeddings.shape[1],
                "size": pyramid[0].shape[-1] * int(spec.inputs[2].shape[-1].split("/")[1])}
        for tensor_spec, tensor in zip(spec.inputs, inputs):
            context.set_input_shape(tensor_spec.name, tuple(tensor.shape))
            context.set_tensor_address(tensor_spec.name, tensor.data_ptr())
        outputs = {}
        for tensor_spec in spec.outputs:
            out = torch.empty(resolve_shape(tensor_spec.shape, dims), device="cuda", dtype=torch.float32)
            context.set_tensor_address(tensor_spec.name, out.data_ptr())
            outputs[tensor_spec.name] = out
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise CheckpointError(f"TensorRT engine of unit {unit!r} failed to run with shapes "
                                  f"{[tuple(t.shape) for t in inputs]}: outside its profile? rebuild with --profiles")
        return outputs


class OnnxRuntimeVision:
    """Encoders, projector and decoders as ONNX Runtime sessions on one provider (asserted)."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, model: Any, provider: str = "cpu", model_arg: str = "M",
                 threads: int = 0) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = check_export(self.folder, model, model_arg)
        self.decoders: _Decoders = OnnxRuntimeDecoders(self.folder, provider, model.config, threads=threads)
        self.provider = self.decoders.provider  # the provider each session reported in use
        options = _session_options(ort, threads)
        self.sessions = {part: ort_session(ort, self.folder / self.manifest.part(part).file, options,
                                           self.provider) for part in VISION_PARTS}
        self.device = next(model.parameters()).device

    def _run(self, part: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        spec = self.manifest.part(part)
        feeds = {t.name: x.detach().float().cpu().numpy() for t, x in zip(spec.inputs, inputs)}
        outputs = self.sessions[part].run([t.name for t in spec.outputs], feeds)
        return [torch.from_numpy(np.asarray(o)).to(self.device) for o in outputs]

    def encode_images(self, images: torch.Tensor) -> ImageFeatures:
        """images [B, 3, S, S] in [0, 1] -> ViT tokens [B, G*G, Dv] + pyramid levels [B, C_i, H_i, W_i]."""
        [tokens] = self._run("vit", images)
        return ImageFeatures(patch_tokens=tokens, pyramid=self._run("convnext", images))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N, Dv] -> [B, N, D]"""
        return self._run("projector", features)[0]

    def run_decoders(self, routed: dict[str, Any], pyramid: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return self.decoders.run_decoders(routed, pyramid)

    def describe(self) -> dict[str, str]:
        return {"runtime": "onnxruntime", "onnx_provider": self.provider, "export_dir": str(self.folder)}


class TensorRTVision(OnnxRuntimeVision):
    """Decoders as native TensorRT engines (``<export>/engines``, built for this GPU, this
    TensorRT and the node's optimisation profile); encoders and projector through ONNX
    Runtime on the GPU (its TensorRT provider when present, else CUDA)."""

    name = "tensorrt"

    def __init__(self, folder: str | Path, model: Any, model_arg: str = "M", build_engines: bool = True,
                 trt: Any = None) -> None:
        import onnxruntime as ort

        from refvlm_export.tensorrt_build import device_identity, import_tensorrt

        if not torch.cuda.is_available():
            raise ConfigError("runtime tensorrt needs a CUDA GPU: pick onnxruntime or torch")
        trt = trt or import_tensorrt()
        self.engine_dir = Path(folder) / ENGINE_DIR
        ensure_node_engines(folder, check_export(folder, model, model_arg), trt, device_identity(trt),
                            build_engines)
        available = ort.get_available_providers()
        provider = "tensorrt" if ORT_PROVIDERS["tensorrt"] in available else "cuda"
        super().__init__(folder, model, provider, model_arg)
        self.decoders = TensorRTDecoders(self.engine_dir, folder, model.config, trt=trt)

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "runtime": "tensorrt", "decoders": "tensorrt engines",
                "engine_dir": str(self.engine_dir)}


def ensure_node_engines(folder: str | Path, manifest: Manifest, trt: Any, identity: dict[str, str],
                        build: bool) -> dict[str, Path]:
    """The decoders' engines in ``<folder>/engines`` for the node's profile (batch 1, L =
    router_length, the model frame): missing or stale ones built there when ``build``, else
    refused naming the `refvlm export tensorrt` command that builds them."""
    from refvlm_export.tensorrt_build import ProfileConfig, ensure_engines

    parts = [spec.part for spec in manifest.parts if spec.unit is not None]
    return ensure_engines(folder, Path(folder) / ENGINE_DIR, ProfileConfig.for_node(manifest), parts,
                          trt=trt, identity=identity, build=build)


def default_export_dir(export_dir: str, model_path: str) -> Path | None:
    """The export folder: ``export_dir``, else ``<model_path>/export``, else none."""
    if export_dir:
        return Path(export_dir)
    return Path(model_path) / "export" if model_path else None


def select_runtime(kind: str, model: Any, export_dir: Path | None, device: str = "cpu",
                   model_arg: str = "M", build_engines: bool = True) -> tuple[Any, str]:
    """(runtime, why it was chosen). Explicit kinds raise a clear error when they cannot run.
    ``build_engines``: tensorrt (also tried by auto) builds missing or stale engines at once."""
    if kind not in RUNTIME_KINDS:
        raise ConfigError(f"runtime={kind!r}: use one of {', '.join(RUNTIME_KINDS)}")
    if kind == "torch":
        return TorchRuntime(model), "runtime:=torch"
    if kind == "auto":
        return _auto(model, export_dir, device, model_arg, build_engines)
    if export_dir is None:
        raise ConfigError(f"runtime:={kind} needs an export: build one with `{export_command(model_arg, 'DIR')}` "
                          "and set export_dir:=DIR")
    if kind == "tensorrt":
        return TensorRTVision(export_dir, model, model_arg, build_engines), "runtime:=tensorrt"
    provider = "cuda" if str(device).startswith("cuda") else "cpu"
    return (OnnxRuntimeVision(export_dir, model, provider, model_arg, cpu_threads()),
            f"runtime:=onnxruntime on device {device}")


def cpu_threads() -> int:
    """ONNX Runtime's intra-op threads: torch's count, so the two share one CPU budget
    (OMP_NUM_THREADS) instead of ONNX Runtime taking every core."""
    return torch.get_num_threads()


def _auto(model: Any, export_dir: Path | None, device: str, model_arg: str,
          build_engines: bool) -> tuple[Any, str]:
    """tensorrt, else ONNX Runtime CUDA, else ONNX Runtime CPU, else torch; each refusal is the reason."""
    if export_dir is None:
        return TorchRuntime(model), "auto: no export_dir (and no model_path to derive it from)"
    refusals = []
    attempts = [("tensorrt", lambda: TensorRTVision(export_dir, model, model_arg, build_engines))]
    if torch.cuda.is_available():
        attempts.append(("onnxruntime cuda", lambda: OnnxRuntimeVision(export_dir, model, "cuda", model_arg)))
    else:
        refusals.append("onnxruntime cuda: no CUDA GPU")
    attempts.append(("onnxruntime cpu", lambda: OnnxRuntimeVision(export_dir, model, "cpu", model_arg,
                                                                    cpu_threads())))
    for label, build in attempts:
        try:
            runtime = build()
        except (ConfigError, CheckpointError, ImportError) as error:
            refusals.append(f"{label}: {error}")
            log.info("runtime auto: %s unusable (%s)", label, error)
            continue
        return runtime, f"auto: {label}" + (f" ({'; '.join(refusals)})" if refusals else "")
    return TorchRuntime(model), "auto: torch (" + "; ".join(refusals) + ")"
