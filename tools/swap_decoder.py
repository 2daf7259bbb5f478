"""A model with one unit's decoder taken from another model (settings and weights).

    python tools/swap_decoder.py --base models/nano --donor runs/nano_box_rec/model --unit box \
        --out runs/nano_box/model

A decoder-only phase that trains one unit (e.g. the box chooser on rec samples alone) leaves
the other units of its run untrained or drifted; this puts only that unit into the base
model. Refused unless the towers, projector and LLM of both are the same weights. The
result is saved like the base (an LLM with adapters over its base LLM in float16, or full).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="model folder whose other units are kept")
    parser.add_argument("--donor", required=True, help="model folder whose decoder of --unit is taken")
    parser.add_argument("--unit", required=True, help="box, mask, keypoint or depth")
    parser.add_argument("--out", required=True, help="folder to write the model into")
    args = parser.parse_args(argv)

    from refvlm_core.checkpoint import has_lora, load_model, save_model
    from refvlm_core.errors import RefVLMError
    from refvlm_training.engine.stages import take_decoder

    try:
        model = load_model(args.base)
        take_decoder(model, load_model(args.donor), args.unit)
        save_model(model, args.out, mode="over_base" if has_lora(model) else "full")
    except RefVLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {args.base} with the {args.unit} decoder of {args.donor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
