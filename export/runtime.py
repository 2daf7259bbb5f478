"""Exported vision runtimes for the Predictor (refvlm_core.runtime's interface): the ViT,
the ConvNeXt pyramid, the projector and every unit decoder from one export folder. The
LLM stays in torch; the ViT token pooling (``config.llm_image_pool``) stays in torch too
(RefVLM.image_tokens), so the graphs are the same whatever the pool.

``select_runtime(kind, model, export_dir, device, model_arg, build_engines)`` is what the
node calls: ``torch``, ``onnxruntime``, ``tensorrt`` or ``auto`` (tensorrt, else ONNX
Runtime CUDA, else ONNX Runtime CPU, else torch), and returns the reason for its choice.
An export that is missing or stale (another config, other weights) is refused with the
command that rebuilds it; so is a missing or stale TensorRT engine (another GPU, TensorRT,
ONNX file or profile) unless ``build_engines``, which builds it into ``<export>/engines``
for the node's profile (``ProfileConfig.for_node``). ``auto`` logs each refusal and moves on.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refvlm_core.errors import CheckpointError, ConfigError
from refvlm_core.features import ImageFeatures
from refvlm_core.runtime import TorchRuntime
from refvlm_export.backends import ORT_PROVIDERS, OnnxRuntimeBackend, _ort_session
from refvlm_export.onnx_export import MANIFEST, Manifest, config_hash, weights_sha256

log = logging.getLogger(__name__)

RUNTIME_KINDS = ("torch", "onnxruntime", "tensorrt", "auto")
VISION_PARTS = ("vit", "convnext", "projector")
ENGINE_DIR = "engines"  # the TensorRT engine cache inside an export folder


def export_command(model_arg: str, folder: str | Path) -> str:
    return f"refvlm export onnx --model {model_arg} --out {folder}"


def check_export(folder: str | Path, model: Any, model_arg: str = "M") -> Manifest:
    """The folder's manifest, once it is known to hold every part of ``model`` as it is now."""
    rebuild = f"rebuild it with `{export_command(model_arg, folder)}`"
    if not (Path(folder) / MANIFEST).is_file():
        raise CheckpointError(f"{folder} holds no export (no {MANIFEST}): build it with "
                              f"`{export_command(model_arg, folder)}`")
    manifest = Manifest.load(folder)
    if manifest.config_hash != config_hash(model.config):
        raise CheckpointError(f"the export in {folder} was made from another model config: {rebuild}")
    if manifest.model_sha256 != weights_sha256(model):
        raise CheckpointError(f"the export in {folder} is stale (made from other weights"
                              f"{'' if manifest.model_sha256 else ', or before weights were recorded'}): {rebuild}")
    have = {part.part for part in manifest.parts}
    missing = [p for p in (*VISION_PARTS, *(f"decoder_{u}" for u in model.decoders)) if p not in have]
    if missing:
        raise CheckpointError(f"the export in {folder} lacks {missing} (made with --decoders-only?): {rebuild}")
    return manifest


class OnnxRuntimeVision:
    """Encoders, projector and decoders as ONNX Runtime sessions on one provider (asserted)."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, model: Any, provider: str = "cpu", model_arg: str = "M",
                 threads: int = 0) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = check_export(self.folder, model, model_arg)
        self.decoders = OnnxRuntimeBackend(self.folder, provider, model.config, threads=threads)
        self.provider = self.decoders.provider  # the provider each session reported in use
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.sessions = {part: _ort_session(ort, self.folder / self.manifest.part(part).file, options,
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
        return {"backend": "onnxruntime", "onnx_provider": self.provider, "export_dir": str(self.folder)}


class TensorRTVision(OnnxRuntimeVision):
    """Decoders as native TensorRT engines (``<export>/engines``, built for this GPU, this
    TensorRT and the node's optimisation profile); encoders and projector through ONNX
    Runtime on the GPU (its TensorRT provider when present, else CUDA)."""

    name = "tensorrt"

    def __init__(self, folder: str | Path, model: Any, model_arg: str = "M", build_engines: bool = True,
                 trt: Any = None) -> None:
        import onnxruntime as ort

        from refvlm_export.backends import TensorRTBackend
        from refvlm_export.tensorrt_build import device_identity, import_tensorrt

        if not torch.cuda.is_available():
            raise ConfigError("backend tensorrt needs a CUDA GPU: pick onnxruntime or torch")
        trt = trt or import_tensorrt()
        self.engine_dir = Path(folder) / ENGINE_DIR
        ensure_node_engines(folder, check_export(folder, model, model_arg), trt, device_identity(trt),
                            build_engines)
        available = ort.get_available_providers()
        provider = "tensorrt" if ORT_PROVIDERS["tensorrt"] in available else "cuda"
        super().__init__(folder, model, provider, model_arg)
        self.decoders = TensorRTBackend(self.engine_dir, folder, model.config, trt=trt)

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "backend": "tensorrt", "decoders": "tensorrt engines",
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
        raise ConfigError(f"backend={kind!r}: use one of {', '.join(RUNTIME_KINDS)}")
    if kind == "torch":
        return TorchRuntime(model), "backend:=torch"
    if kind == "auto":
        return _auto(model, export_dir, device, model_arg, build_engines)
    if export_dir is None:
        raise ConfigError(f"backend:={kind} needs an export: build one with `{export_command(model_arg, 'DIR')}` "
                          "and set export_dir:=DIR")
    if kind == "tensorrt":
        return TensorRTVision(export_dir, model, model_arg, build_engines), "backend:=tensorrt"
    provider = "cuda" if str(device).startswith("cuda") else "cpu"
    return (OnnxRuntimeVision(export_dir, model, provider, model_arg, cpu_threads()),
            f"backend:=onnxruntime on device {device}")


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
            log.info("backend auto: %s unusable (%s)", label, error)
            continue
        return runtime, f"auto: {label}" + (f" ({'; '.join(refusals)})" if refusals else "")
    return TorchRuntime(model), "auto: torch (" + "; ".join(refusals) + ")"
