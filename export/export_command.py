"""`refvlm export onnx|tensorrt`: export the model's parts to ONNX and build TensorRT engines.

Nothing heavy is imported here; the handlers import torch, onnx and TensorRT lazily.
"""
from __future__ import annotations

import argparse

_ONNX_EXAMPLES = """\
examples:
  refvlm export onnx --model tiny --out exports/tiny
  refvlm export onnx --model checkpoints/nano --out exports/nano --decoders-only"""

_TRT_EXAMPLES = """\
examples:
  refvlm export tensorrt --onnx exports/nano --out engines/nano --fp16
  refvlm export tensorrt --onnx exports/tiny --out engines/tiny --profiles batch=1/1/2,L=1/8/100
  refvlm export tensorrt --onnx exports/tiny --out engines/tiny --target SM89   # CPU build (TensorRT-RTX)

--profiles sets min/opt/max of the named dims: batch, L (REF queries per unit),
size (image side; pyramid levels follow it), tokens (projector input length).
Engines are cached by GPU, compute capability, TensorRT version, ONNX hash and profile."""


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="export to ONNX and build TensorRT engines")
    commands = export.add_subparsers(dest="export_command", metavar="FORMAT")
    commands.required = True

    onnx = commands.add_parser("onnx", help="export decoders, encoders and projector to ONNX",
                               epilog=_ONNX_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    onnx.add_argument("--model", required=True, help="preset name (tiny, nano, paper) or a saved model folder")
    onnx.add_argument("--out", required=True, help="output folder (ONNX files, manifest.json, config.json)")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--decoders-only", action="store_true", help="skip the image encoders and the projector")
    onnx.set_defaults(func=_onnx)

    trt = commands.add_parser("tensorrt", help="build TensorRT engines from an ONNX export",
                              epilog=_TRT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    trt.add_argument("--onnx", required=True, help="folder written by `refvlm export onnx`")
    trt.add_argument("--out", required=True, help="engine folder (also the engine cache)")
    trt.add_argument("--fp16", action="store_true", help="allow fp16 kernels")
    trt.add_argument("--profiles", default=None, help="e.g. batch=1/1/4,L=1/32/100,size=256/256/256")
    trt.add_argument("--parts", default=None, help="comma-separated parts (default: all in the manifest)")
    trt.add_argument("--target", default=None, help="TensorRT-RTX CPU builds: compute capability, e.g. SM89")
    trt.add_argument("--force", action="store_true", help="rebuild even when the cached engine matches")
    trt.set_defaults(func=_tensorrt)


def _onnx(args: argparse.Namespace) -> int:
    from refvlm_export.onnx_export import export_model, load_export_model

    manifest = export_model(load_export_model(args.model), args.out, opset=args.opset,
                            encoders=not args.decoders_only)
    for part in manifest.parts:
        print(f"{part.part}: {args.out}/{part.file}  inputs {[(t.name, t.shape) for t in part.inputs]}")
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    from refvlm_export.manifest import Manifest
    from refvlm_export.tensorrt_build import ProfileConfig, build_engines

    profiles = ProfileConfig.for_manifest(Manifest.load(args.onnx)).override(args.profiles)
    parts = args.parts.split(",") if args.parts else None
    built = build_engines(args.onnx, args.out, profiles, fp16=args.fp16, parts=parts, target=args.target,
                          force=args.force)
    for part, path in built.items():
        print(f"{part}: {path}")
    return 0
