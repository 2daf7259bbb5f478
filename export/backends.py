"""Runtime backends for the visual-unit decoders: one interface, three runtimes.

``backend.run_decoders(routed, pyramid) -> {unit: {name: Tensor}}`` is what the Predictor
calls (``Predictor.set_decoder_backend``). Kinds:

- ``torch``: the model's own modules (CPU or CUDA);
- ``onnxruntime``: the exported graphs with the CPU, CUDA or TensorRT execution provider;
  the provider actually in use is checked (onnxruntime-gpu silently falls back to CPU);
- ``tensorrt``: native engines on a CUDA stream, inputs and outputs bound to torch CUDA
  tensors by ``data_ptr`` (no host copies);
- ``auto``: tensorrt, else onnxruntime with a GPU provider, else torch; the reason is logged.

A missing or corrupt ONNX/engine file raises CheckpointError naming the file and the
command that rebuilds it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_export.onnx_export import Manifest, PartSpec, config_hash, resolve_shape

log = logging.getLogger(__name__)

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
KINDS = ("torch", "onnxruntime", "tensorrt", "auto")


class DecoderBackend(Protocol):
    name: str

    def run(self, unit: str, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        ...

    def run_decoders(self, routed: dict[str, Any], pyramid: Sequence[Tensor]) -> dict[str, dict[str, Tensor]]:
        ...


class _Base:
    name = "base"
    units: tuple[str, ...] = ()

    def run(self, unit: str, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def run_decoders(self, routed: dict[str, Any], pyramid: Sequence[Tensor]) -> dict[str, dict[str, Tensor]]:
        """routed: unit -> RoutedRefs (embeddings [B, L, D], valid [B, L] bool)."""
        return {unit: self.run(unit, refs.embeddings, refs.valid, pyramid) for unit, refs in routed.items()}


class TorchBackend(_Base):
    """The model's decoder modules, as they are."""

    name = "torch"

    def __init__(self, decoders: torch.nn.ModuleDict) -> None:
        self.decoders = decoders
        self.units = tuple(decoders)

    @torch.no_grad()
    def run(self, unit: str, ref_embeddings: Tensor, ref_valid: Tensor, pyramid: Sequence[Tensor]) -> dict[str, Tensor]:
        return self.decoders[unit](ref_embeddings, ref_valid, list(pyramid))


def _check_manifest(manifest: Manifest, config: Any | None, folder: Path) -> None:
    if config is not None and manifest.config_hash != config_hash(config):
        raise CheckpointError(f"the export in {folder} was made from another model config: re-export with "
                              f"`refvlm export onnx --model M --out {folder}`")


class OnnxRuntimeBackend(_Base):
    """The exported decoder graphs under ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", config: Any | None = None,
                 units: Sequence[str] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        if provider not in ORT_PROVIDERS:
            raise ConfigError(f"onnxruntime provider {provider!r}: use one of {list(ORT_PROVIDERS)}")
        self.folder = Path(onnx_dir)
        self.manifest = Manifest.load(self.folder)
        _check_manifest(self.manifest, config, self.folder)
        wanted = ORT_PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise ConfigError(f"onnxruntime here has no {wanted} (has {ort.get_available_providers()}): install "
                              "onnxruntime-gpu (extra ort-gpu) or pick provider 'cpu'")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.sessions: dict[str, Any] = {}
        self.specs: dict[str, PartSpec] = {}
        for spec in self.manifest.parts:
            if spec.unit is None or (units and spec.unit not in units):
                continue
            path = self.folder / spec.file
            self.sessions[spec.unit] = _ort_session(ort, path, options, wanted)
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


def _ort_session(ort: Any, path: Path, options: Any, provider: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: rebuild it with `refvlm export onnx --model M --out {path.parent}`")
    try:
        session = ort.InferenceSession(str(path), options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
    except Exception as error:  # onnxruntime raises its own untyped errors for corrupt files
        raise CheckpointError(f"{path} cannot be loaded ({str(error)[:200]}): rebuild it with "
                              f"`refvlm export onnx --model M --out {path.parent}`") from error
    in_use = session.get_providers()
    if in_use[0] != provider:  # silent fallback: refuse it
        raise ConfigError(f"onnxruntime fell back to {in_use} instead of {provider} for {path.name}: check the "
                          "CUDA/TensorRT install, or pick provider 'cpu'")
    return session


class TensorRTBackend(_Base):
    """Native TensorRT engines; torch CUDA tensors bound by address on the current stream."""

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, onnx_dir: str | Path, config: Any | None = None,
                 trt: Any | None = None) -> None:
        from refvlm_export.tensorrt_build import check_engine, device_identity, import_tensorrt

        if not torch.cuda.is_available():
            raise ConfigError("the tensorrt backend needs a CUDA GPU: pick 'onnxruntime' or 'torch'")
        self.trt = trt or import_tensorrt()
        self.manifest = Manifest.load(onnx_dir)
        _check_manifest(self.manifest, config, Path(onnx_dir))
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


def make_backend(kind: str, model: Any, onnx_dir: str | Path | None = None, engine_dir: str | Path | None = None,
                 provider: str | None = None) -> _Base:
    """A decoder backend for ``model`` (a RefVLM). ``auto`` logs why it chose what it chose."""
    if kind not in KINDS:
        raise ConfigError(f"decoder backend {kind!r}: use one of {KINDS}")
    if kind == "torch":
        return TorchBackend(model.decoders)
    if kind in ("onnxruntime", "tensorrt") and onnx_dir is None:
        raise ConfigError(f"the {kind} backend needs the export folder: run `refvlm export onnx --model M --out DIR`")
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(onnx_dir, provider or "cpu", model.config)
    if kind == "tensorrt":
        if engine_dir is None:
            raise ConfigError("the tensorrt backend needs the engine folder: run `refvlm export tensorrt`")
        return TensorRTBackend(engine_dir, onnx_dir, model.config)
    return _auto(model, onnx_dir, engine_dir)


def _auto(model: Any, onnx_dir: str | Path | None, engine_dir: str | Path | None) -> _Base:
    if onnx_dir is None:
        log.info("decoder backend auto -> torch: no ONNX export given")
        return TorchBackend(model.decoders)
    if engine_dir is not None and torch.cuda.is_available():
        try:
            backend = TensorRTBackend(engine_dir, onnx_dir, model.config)
            log.info("decoder backend auto -> tensorrt: engines match this GPU")
            return backend
        except (ConfigError, CheckpointError) as error:
            log.info("decoder backend auto: tensorrt unusable (%s)", error)
    import onnxruntime as ort

    for provider in ("tensorrt", "cuda"):
        if ORT_PROVIDERS[provider] in ort.get_available_providers() and torch.cuda.is_available():
            try:
                backend = OnnxRuntimeBackend(onnx_dir, provider, model.config)
                log.info("decoder backend auto -> onnxruntime %s", provider)
                return backend
            except ConfigError as error:
                log.info("decoder backend auto: onnxruntime %s unusable (%s)", provider, error)
    if model.decoders and next(model.decoders.parameters()).is_cuda:
        log.info("decoder backend auto -> torch: the model is on CUDA and no GPU runtime is usable")
        return TorchBackend(model.decoders)
    log.info("decoder backend auto -> onnxruntime cpu: no GPU runtime")
    return OnnxRuntimeBackend(onnx_dir, "cpu", model.config)
