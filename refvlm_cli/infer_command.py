"""`refvlm infer IMAGE PROMPT`: run the model on one picture, print the result and
optionally write an overlay. Imports lazily."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refvlm_core.errors import InputError

_EXAMPLES = """\
examples:
  refvlm infer photo.jpg "Find the red cup." --preset tiny --out overlay.png
  refvlm infer photo.jpg "What is <region>?" --point 120,80 --json
  refvlm infer photo.jpg "Segment it." --box 10,20,200,180 --model runs/nano/final"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "infer", help="run REF-VLM on an image and a prompt",
        description="Answers a prompt about an image; referred objects come back as boxes, masks, "
        "keypoints or depth in image pixels.", epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...)")
    parser.add_argument("prompt", metavar="PROMPT", help="the question; <region> marks where a visual prompt goes")
    parser.add_argument("--point", action="append", default=[], metavar="X,Y", help="point prompt (pixels)")
    parser.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1", help="box prompt (pixels)")
    parser.add_argument("--mask", action="append", default=[], metavar="PNG", help="mask prompt: non-zero pixels")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=("tiny", "nano"), default=None,
                        help="build a preset model (random vision parts; for trying the pipeline)")
    source.add_argument("--model", metavar="DIR", help="checkpoint folder (config.json + model.safetensors)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--quantize", choices=("auto", "none", "int8"), default="auto",
                        help="LLM weights with --model: auto (default: int8 on a CPU, float on a GPU), "
                        "int8 (CPU: ~1.9x faster answers, not bit-identical; the README gives its "
                        "parity), none (float)")
    parser.add_argument("--unconstrained", action="store_true",
                        help="decode without the TRP grammar (the raw model's text)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--out", metavar="PNG", help="write an overlay picture here")
    parser.set_defaults(func=run_infer)


def _numbers(text: str, count: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise InputError(f"{flag} {text!r}: give {count} comma-separated numbers")
    return values


def _read_image(path: str, grey: bool = False):
    import cv2

    if not Path(path).is_file():
        raise InputError(f"{path} does not exist: give an image file")
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"{path} is not an image OpenCV can read (PNG, JPEG, ...)")
    return image if grey else image[..., ::-1].copy()


def visual_prompts(args):
    from refvlm_core.visual_prompts import VisualPrompt

    prompts = [VisualPrompt.point(*_numbers(p, 2, "--point")) for p in args.point]
    prompts += [VisualPrompt.box(*_numbers(b, 4, "--box")) for b in args.box]
    prompts += [VisualPrompt.from_mask(_read_image(m, grey=True) > 0) for m in args.mask]
    return prompts


def run_infer(args) -> int:
    import cv2

    from refvlm_core.overlay import draw_result
    from refvlm_core.predictor import Predictor

    image = _read_image(args.image)
    prompts = visual_prompts(args)
    if args.model:
        predictor = Predictor.from_pretrained(args.model, quantize=args.quantize)
    else:
        predictor = Predictor.from_preset(args.preset or "tiny")
        print(f"note: the {args.preset or 'tiny'} preset is built with untrained vision towers and decoders, "
              "so its answers are arbitrary; pass --model DIR for a trained model", file=sys.stderr)
    result = predictor.predict(image, args.prompt, prompts, max_new_tokens=args.max_new_tokens,
                               constrained=False if args.unconstrained else None)
    if args.json:
        print(result.to_json(indent=2))
    else:
        print(result.answer.strip() or "(empty answer)")
        for obj in result.objects:
            box = "" if obj.box_xyxy is None else " box=" + ",".join(f"{v:.0f}" for v in obj.box_xyxy)
            print(f"  [{obj.ref_ordinal}] {obj.phrase} ({', '.join(obj.units)}){box}")
        for error in result.errors:
            print(f"  note: {error}")
        print("  timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()))
        if predictor.load_s is not None:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in predictor.load_phases.items())
            print(f"  model loaded in {predictor.load_s:.1f} s ({phases}); LLM weights: {predictor.quantize}")
    if args.out:
        cv2.imwrite(args.out, draw_result(image, result)[..., ::-1])
    return 0
