"""The export folder's format, written by the exporter (onnx_export) and read by the engine
builder, the export cache and the exported runtimes: ``manifest.json`` (``Manifest``: the
config hash, the exported weights' sha256, one ``PartSpec`` per graph with its tensors'
shape templates) and ``check_export``, the one check that a folder is an export of a given
model as it is now. Nothing here imports ONNX, ONNX Runtime or TensorRT.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from refvlm_core.errors import CheckpointError, ConfigError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: model_sha256 (the exported parts' weights) recorded
VISION_PARTS = ("vit", "convnext", "projector")


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]          # ints, or "batch", "L", "size/<stride>"
    dtype: str = "float32"


@dataclass
class PartSpec:
    """One exported graph, as written to the manifest."""
    part: str                       # "decoder_box", "vit", "convnext", "projector"
    file: str
    unit: str | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnx_sha256: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PartSpec":
        return cls(part=data["part"], file=data["file"], unit=data.get("unit"),
                   inputs=[TensorSpec(**t) for t in data["inputs"]],
                   outputs=[TensorSpec(**t) for t in data["outputs"]],
                   onnx_sha256=data.get("onnx_sha256", ""))


@dataclass
class Manifest:
    config_hash: str
    image_size: int
    router_length: int
    opset: int
    parts: list[PartSpec] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    model_sha256: str = ""          # weights_sha256 of the model it came from ("" before version 2)
    model_name: str = ""

    def part(self, name: str) -> PartSpec:
        for spec in self.parts:
            if spec.part == name:
                return spec
        raise CheckpointError(f"the export has no part {name!r} (has {[p.part for p in self.parts]}): "
                              f"re-run `{export_command('M', 'DIR')}`")

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: export the model first with "
                                  f"`{export_command('M', folder)}`")
        try:
            data = json.loads(path.read_text())
            return cls(config_hash=data["config_hash"], image_size=data["image_size"],
                       router_length=data["router_length"], opset=data["opset"],
                       parts=[PartSpec.from_dict(p) for p in data["parts"]],
                       format_version=data.get("format_version", 0),
                       model_sha256=data.get("model_sha256", ""), model_name=data.get("model_name", ""))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is not a valid export manifest ({error}): re-run "
                                  f"`{export_command('M', folder)}`") from error


def config_hash(config: Any) -> str:
    """sha256 of the model config's canonical JSON (what an export was made from)."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the exported parts' weights (encoder, projector, decoders; not the LLM, which
    stays in torch): what tells a stale export from a current one."""
    digest = hashlib.sha256()
    for prefix in ("encoder", "projector", "decoders"):
        for name, tensor in sorted(getattr(model, prefix).state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{prefix}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_shape(template: Sequence[int | str], dims: Mapping[str, int]) -> tuple[int, ...]:
    """A shape template with concrete named dims, e.g. {"batch": 1, "L": 100, "size": 64, "tokens": 16}."""
    shape = []
    for dim in template:
        if isinstance(dim, int):
            shape.append(dim)
            continue
        name, _, stride = dim.partition("/")
        if name not in dims:
            raise ConfigError(f"shape dim {dim!r} needs a value for {name!r}; given {sorted(dims)}")
        shape.append(dims[name] // int(stride) if stride else dims[name])
    return tuple(shape)


def export_command(model_arg: str, folder: str | Path) -> str:
    return f"refvlm export onnx --model {model_arg} --out {folder}"


def check_export(folder: str | Path, model: Any = None, model_arg: str = "M", config: Any = None) -> Manifest:
    """The folder's manifest, once it is known to be an export of ``model`` as it is now
    (its config, its weights, every part), or, given only ``config``, of a model of that
    config (a decoders-only export passes). Refusals name the command that rebuilds it."""
    rebuild = f"rebuild it with `{export_command(model_arg, folder)}`"
    if not (Path(folder) / MANIFEST).is_file():
        raise CheckpointError(f"{folder} holds no export (no {MANIFEST}): build it with "
                              f"`{export_command(model_arg, folder)}`")
    manifest = Manifest.load(folder)
    config = model.config if model is not None else config
    if config is not None and manifest.config_hash != config_hash(config):
        raise CheckpointError(f"the export in {folder} was made from another model config: {rebuild}")
    if model is None:
        return manifest
    if manifest.model_sha256 != weights_sha256(model):
        raise CheckpointError(f"the export in {folder} is stale (made from other weights"
                              f"{'' if manifest.model_sha256 else ', or before weights were recorded'}): {rebuild}")
    have = {part.part for part in manifest.parts}
    missing = [p for p in (*VISION_PARTS, *(f"decoder_{u}" for u in model.decoders)) if p not in have]
    if missing:
        raise CheckpointError(f"the export in {folder} lacks {missing} (made with --decoders-only?): {rebuild}")
    return manifest
