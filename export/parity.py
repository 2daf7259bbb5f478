"""Parity of the exported graphs with the torch modules they came from.

Tolerances (fp32, ONNX Runtime CPU vs torch CPU; measured errors are ~1e-6):
- ``ATOL = 1e-4``, ``RTOL = 1e-4`` on every output element (mask/depth maps included);
- Predictor end to end: boxes within ``BOX_PIXEL_TOL = 0.5`` pixel, mask IoU at least
  ``MASK_IOU_MIN = 0.99`` (a pixel can flip where a logit is ~0);
- fp16 engines / CUDA (GPU tests): ``FP16_ATOL = 2e-2``, ``FP16_RTOL = 2e-2``.
Any NaN or inf is a failure whatever the tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

ATOL, RTOL = 1e-4, 1e-4
FP16_ATOL, FP16_RTOL = 2e-2, 2e-2
BOX_PIXEL_TOL = 0.5
MASK_IOU_MIN = 0.99


@dataclass
class ParityReport:
    part: str
    shapes: dict[str, tuple[int, ...]]
    max_abs_error: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        errors = ", ".join(f"{k}={v:.2e}" for k, v in self.max_abs_error.items())
        return f"{self.part} {self.shapes}: {'ok' if self.ok else 'FAIL'} ({errors}) {'; '.join(self.problems)}"


def compare(part: str, reference: dict[str, Tensor], candidate: dict[str, Tensor],
            atol: float = ATOL, rtol: float = RTOL, shapes: dict[str, tuple[int, ...]] | None = None) -> ParityReport:
    report = ParityReport(part, shapes or {})
    for name, ref in reference.items():
        if name not in candidate:
            report.problems.append(f"output {name} missing")
            continue
        ref, got = ref.detach().float().cpu(), candidate[name].detach().float().cpu()
        if ref.shape != got.shape:
            report.problems.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
            continue
        if not torch.isfinite(got).all():
            report.problems.append(f"{name}: non-finite values")
            continue
        report.max_abs_error[name] = float((ref - got).abs().max()) if ref.numel() else 0.0
        if not torch.allclose(got, ref, atol=atol, rtol=rtol):
            report.problems.append(f"{name}: max abs error {report.max_abs_error[name]:.2e} > atol {atol}")
    return report


def decoder_inputs(llm_dim: int, channels: Sequence[int], strides: Sequence[int], batch: int, length: int,
                   num_valid: int, size: int, seed: int = 0) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Random ref embeddings [B, L, D], valid [B, L] (first ``num_valid`` true) and a pyramid."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, length, llm_dim, generator=generator)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[:, :num_valid] = True
    pyramid = [torch.randn(batch, c, size // s, size // s, generator=generator) for c, s in zip(channels, strides)]
    return embeddings, valid, pyramid


def decoder_parity(model: Any, decoders: Any, unit: str, batch: int, length: int, num_valid: int, size: int,
                   atol: float = ATOL, rtol: float = RTOL) -> ParityReport:
    """torch decoder vs ``decoders.run`` (refvlm_export.runtime's OnnxRuntimeDecoders,
    TensorRTDecoders) on the same random inputs."""
    from refvlm_export.onnx_export import pyramid_strides

    inputs = decoder_inputs(model.llm.hidden_size, model.encoder.pyramid_channels, pyramid_strides(model),
                            batch, length, num_valid, size)
    with torch.no_grad():
        reference = model.decoders[unit](*inputs)
    candidate = decoders.run(unit, *inputs)
    shapes = {"ref_embeddings": tuple(inputs[0].shape), "pyramid_0": tuple(inputs[2][0].shape)}
    return compare(f"decoder_{unit} (valid={num_valid})", reference, candidate, atol, rtol, shapes)


def onnx_part_parity(onnx_dir: str | Path, part: str, module: torch.nn.Module, inputs: Sequence[Tensor],
                     atol: float = ATOL, rtol: float = RTOL) -> ParityReport:
    """An exported encoder/projector graph under ONNX Runtime CPU vs its torch wrapper."""
    import onnxruntime as ort

    from refvlm_export.manifest import Manifest

    spec = Manifest.load(onnx_dir).part(part)
    session = ort.InferenceSession(str(Path(onnx_dir) / spec.file), providers=["CPUExecutionProvider"])
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
    got = session.run([t.name for t in spec.outputs], feeds)
    with torch.no_grad():
        ref = module(*inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    names = [t.name for t in spec.outputs]
    return compare(part, dict(zip(names, ref)), {n: torch.from_numpy(np.asarray(g)) for n, g in zip(names, got)},
                   atol, rtol, {t.name: tuple(x.shape) for t, x in zip(spec.inputs, inputs)})


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def result_parity(reference: Any, candidate: Any) -> dict[str, float]:
    """Two Predictor Results of the same image and answer: worst box error (pixels), worst mask IoU."""
    if len(reference.objects) != len(candidate.objects):
        raise AssertionError(f"{len(reference.objects)} vs {len(candidate.objects)} objects")
    box_error, iou = 0.0, 1.0
    for ref, got in zip(reference.objects, candidate.objects):
        if ref.box_xyxy is not None:
            box_error = max(box_error, float(np.abs(ref.box_xyxy - got.box_xyxy).max()))
        if ref.mask is not None:
            iou = min(iou, mask_iou(ref.mask, got.mask))
    return {"max_box_error_px": box_error, "min_mask_iou": iou}
