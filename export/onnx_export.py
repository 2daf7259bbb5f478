"""ONNX export of the deployable parts: every visual-unit decoder, the two image
encoders (ViT tokens, ConvNeXt pyramid) and the projector.

Each part is wrapped so that its ONNX graph has plain tensor inputs and outputs:

- decoders: ``ref_embeddings [B, L, D] float``, ``ref_valid [B, L] float`` (1 = real ref,
  0 = padding; turned into the decoders' float additive mask inside the graph, so a fully
  padded group stays finite), ``pyramid_0 .. pyramid_{n-1}`` ``[B, C_i, H_i, W_i]``;
  outputs are the decoder's dict entries in sorted key order;
- ``vit``: ``images [B, 3, S, S]`` in [0, 1] -> ``tokens [B, G*G, Dv]``;
- ``convnext``: ``images [B, 3, H, W]`` in [0, 1] -> ``pyramid_0 ..``;
- ``projector``: ``features [B, N, Dv]`` -> ``projected [B, N, D]``.

Dynamic axes (dynamo exporter): batch, L and the feature sizes. Every file carries
metadata_props (config hash, part, unit, input/output names, opset, shape templates),
and the export folder gets a ``manifest.json`` (parts, config hash, ``model_sha256`` of the
exported weights) and the model's ``config.json``, which the engine builder and the
runtimes read. Shape templates name each dynamic dim by what sets it: ``batch``, ``L``,
``size/k`` (image side divided by the stride k) or an integer.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from refvlm_core.errors import ConfigError
from refvlm_export.manifest import Manifest, PartSpec, TensorSpec, config_hash, file_sha256, weights_sha256

log = logging.getLogger(__name__)

OPSET = 18
# Example sizes used while tracing; the parity tests run other sizes on purpose.
EXPORT_BATCH, EXPORT_L = 2, 8


# ---- wrappers: plain tensors in and out ---------------------------------------------

class DecoderGraph(nn.Module):
    """A UnitDecoder with flat tensor I/O: (ref_embeddings, ref_valid float, *pyramid) -> outputs."""

    def __init__(self, decoder: nn.Module, output_names: Sequence[str]) -> None:
        super().__init__()
        self.decoder = decoder
        self.output_names = tuple(output_names)

    def forward(self, ref_embeddings: Tensor, ref_valid: Tensor, *pyramid: Tensor) -> tuple[Tensor, ...]:
        outputs = self.decoder(ref_embeddings, ref_valid > 0.5, list(pyramid))
        return tuple(outputs[name] for name in self.output_names)


class VitGraph(nn.Module):
    """images [B, 3, S, S] in [0, 1] -> ViT tokens [B, G*G, Dv] (normalisation included)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.vit_tokens((images - self.encoder.mean) / self.encoder.std)


class ConvNextGraph(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> the pyramid levels (ConvNeXt stages, colour pathway appended)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.encoder.pyramid(images))


# ---- export -------------------------------------------------------------------------

def decoder_output_names(decoder: nn.Module, llm_dim: int, pyramid: Sequence[Tensor]) -> list[str]:
    with torch.no_grad():
        outputs = decoder(torch.zeros(1, 2, llm_dim), torch.ones(1, 2, dtype=torch.bool), list(pyramid))
    return sorted(outputs)


def pyramid_strides(model: nn.Module) -> list[int]:
    """Stride of each pyramid level relative to the image side (ConvNeXt stage s: 2^(s+2))."""
    return [2 ** (stage + 2) for stage in model.config.vision.convnext_stages]


def _export(module: nn.Module, args: tuple[Tensor, ...], spec: PartSpec, out: Path, opset: int,
            dynamic_shapes: tuple[dict[int, Any], ...], meta: dict[str, str]) -> None:
    import onnx

    path = out / spec.file
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=opset,
                                    input_names=[t.name for t in spec.inputs],
                                    output_names=[t.name for t in spec.outputs],
                                    dynamic_shapes=dynamic_shapes, verbose=False,
                                    custom_translation_table=_translations())
    proto = program.model_proto
    meta = {**meta, "part": spec.part, "unit": spec.unit or "", "opset": str(opset),
            "inputs": json.dumps([asdict(t) for t in spec.inputs]),
            "outputs": json.dumps([asdict(t) for t in spec.outputs])}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)  # by path: works past the 2 GB proto limit
    spec.onnx_sha256 = file_sha256(path)
    log.info("exported %s (%.1f kB)", path, path.stat().st_size / 1024)


def _translations() -> dict[Any, Any]:
    """ONNX for the aten ops the exporter has none for. ``_is_all_true``: the shape checks
    inside transformers' modules (``torch._check``, e.g. Grounding-DINO's deformable
    attention) trace to it."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    def is_all_true(values):
        as_int = op.Cast(values, to=TensorProto.INT64)
        return op.Cast(op.ReduceMin(as_int, keepdims=0), to=TensorProto.BOOL)

    return {torch.ops.aten._is_all_true.default: is_all_true}


def _dim(name: str, min_value: int = 1, max_value: int | None = None) -> Any:
    return torch.export.Dim(name, min=min_value, max=max_value) if max_value else torch.export.Dim(name, min=min_value)


def export_decoders(model: nn.Module, out: Path, opset: int, meta: dict[str, str],
                    units: Sequence[str] | None = None) -> list[PartSpec]:
    size = model.config.vision.image_size
    strides = pyramid_strides(model)
    channels = model.encoder.pyramid_channels
    llm_dim = model.llm.hidden_size
    pyramid = [torch.randn(EXPORT_BATCH, c, size // s, size // s) for c, s in zip(channels, strides)]
    embeddings = torch.randn(EXPORT_BATCH, EXPORT_L, llm_dim)
    valid = torch.ones(EXPORT_BATCH, EXPORT_L)
    valid[1, EXPORT_L // 2:] = 0
    batch, length = _dim("batch"), _dim("L")
    specs = []
    for unit in units or list(model.decoders):
        decoder = model.decoders[unit]
        names = decoder_output_names(decoder, llm_dim, [p[:1] for p in pyramid])
        graph = DecoderGraph(decoder, names).eval()
        with torch.no_grad():
            sample = graph(embeddings, valid, *pyramid)
        inputs = ([TensorSpec("ref_embeddings", ["batch", "L", llm_dim]), TensorSpec("ref_valid", ["batch", "L"])]
                  + [TensorSpec(f"pyramid_{i}", ["batch", c, f"size/{s}", f"size/{s}"])
                     for i, (c, s) in enumerate(zip(channels, strides))])
        outputs = [TensorSpec(name, _output_template(tensor, size)) for name, tensor in zip(names, sample)]
        spec = PartSpec(part=f"decoder_{unit}", file=f"decoder_{unit}.onnx", unit=unit, inputs=inputs, outputs=outputs)
        # Each level's side is its own dim: the graphs only resize between levels, so nothing ties them.
        dynamic = ({0: batch, 1: length}, {0: batch, 1: length},  # *pyramid: one nested entry
                   tuple({0: batch, 2: _dim(f"h{i}"), 3: _dim(f"w{i}")} for i in range(len(pyramid))))
        _export(graph, (embeddings, valid, *pyramid), spec, out, opset, dynamic, meta)
        specs.append(spec)
    return specs


def _output_template(tensor: Tensor, size: int) -> list[int | str]:
    """[B, L, ...] outputs; trailing spatial dims written as size/stride."""
    template: list[int | str] = ["batch", "L"]
    rest = list(tensor.shape[2:])
    if len(rest) == 2 and rest[0] == rest[1] and size % rest[0] == 0 and rest[0] > 1:  # a map [h, w]
        template += [f"size/{size // rest[0]}"] * 2
    else:
        template += [int(d) for d in rest]
    return template


def export_encoders(model: nn.Module, out: Path, opset: int, meta: dict[str, str]) -> list[PartSpec]:
    encoder = model.encoder
    size = model.config.vision.image_size
    images = torch.rand(EXPORT_BATCH, 3, size, size)
    batch = _dim("batch")
    vit = PartSpec(part="vit", file="vit.onnx", unit=None,
                   inputs=[TensorSpec("images", ["batch", 3, size, size])],
                   outputs=[TensorSpec("tokens", ["batch", encoder.num_image_tokens, encoder.vit_width])])
    # The ViT's position embedding fixes its input side: only the batch is dynamic.
    _export(VitGraph(encoder), (images,), vit, out, opset, ({0: batch},), meta)

    strides = pyramid_strides(model)
    convnext = PartSpec(part="convnext", file="convnext.onnx", unit=None,
                        inputs=[TensorSpec("images", ["batch", 3, "size", "size"])],
                        outputs=[TensorSpec(f"pyramid_{i}", ["batch", c, f"size/{s}", f"size/{s}"])
                                 for i, (c, s) in enumerate(zip(encoder.pyramid_channels, strides))])
    side = _dim("side32", min_value=1, max_value=256)
    _export(ConvNextGraph(encoder), (images,), convnext, out, opset,
            ({0: batch, 2: 32 * side, 3: 32 * side},), meta)  # square, a multiple of the total stride

    dv, dm = encoder.vit_width, model.llm.hidden_size
    projector = PartSpec(part="projector", file="projector.onnx", unit=None,
                         inputs=[TensorSpec("features", ["batch", "tokens", dv])],
                         outputs=[TensorSpec("projected", ["batch", "tokens", dm])])
    tokens = torch.randn(EXPORT_BATCH, encoder.num_image_tokens, dv)
    _export(model.projector, (tokens,), projector, out, opset, ({0: batch, 1: _dim("tokens")},), meta)
    return [vit, convnext, projector]


def export_model(model: nn.Module, out_dir: str | Path, opset: int = OPSET, units: Sequence[str] | None = None,
                 encoders: bool = True) -> Manifest:
    """Export ``model`` (a RefVLM) to ``out_dir``: one ONNX file per part plus manifest.json
    and the model's config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    digest = config_hash(model.config)
    meta = {"config_hash": digest, "model_name": model.config.name, "producer": "refvlm_export"}
    unknown = sorted(set(units or ()) - set(model.decoders))
    if unknown:
        raise ConfigError(f"the model has no decoder for {unknown}: its units are {list(model.decoders)}")
    parts = export_decoders(model, out, opset, meta, units)
    if encoders:
        parts += export_encoders(model, out, opset, meta)
    model.config.to_json(out / "config.json")
    manifest = Manifest(config_hash=digest, image_size=model.config.vision.image_size,
                        router_length=model.config.router_length, opset=opset, parts=parts,
                        model_sha256=weights_sha256(model), model_name=model.config.name)
    manifest.save(out)
    return manifest


def load_export_model(name_or_dir: str, seed: int = 0) -> nn.Module:
    """A preset name (random init, seeded) or a saved model folder."""
    from refvlm_core.config import PRESET_NAMES, preset
    from refvlm_core.model import RefVLM

    if name_or_dir in PRESET_NAMES:
        torch.manual_seed(seed)
        return RefVLM.from_config(preset(name_or_dir))
    if not Path(name_or_dir).is_dir():
        raise ConfigError(f"--model {name_or_dir!r} is neither a preset {PRESET_NAMES} nor a model folder")
    from refvlm_core.checkpoint import load_model

    return load_model(name_or_dir)
