"""`refvlm demo`: the main job on the shipped default (see README)."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on the shipped default model",
        description="Runs the full pipeline that exists so far on the shipped default.",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from refvlm_core import trp

    example = "<Phrase>capybaras</Phrase> (<Unit>box</Unit>[0]<REF>[1]<REF>)"
    parsed = trp.parse(example)
    print("TRP example:", example)
    print(parsed.to_json(indent=2))
    print("The model is not built yet: this demo only exercises the TRP grammar.")
    return 0
