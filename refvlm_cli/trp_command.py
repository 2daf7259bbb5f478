"""`refvlm trp ...`: parse and write TRP text from the shell.

Nothing heavy is imported here: the TRP module is pure Python.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from refvlm_core.errors import InputError

_PARSE_EXAMPLES = """\
examples:
  refvlm trp parse '<Phrase>capybaras</Phrase> (<Unit>box</Unit>[0]<REF>[1]<REF>)'
  echo '<Phrase>dog</Phrase> (<Unit>mask</Unit>[0]<REF>)' | refvlm trp parse -
  refvlm trp parse --units box,mask --strict '<Phrase>man</Phrase> (<Unit>box</Unit>[0]<REF>)'

exit status: 0 valid TRP; 1 malformed (the JSON holds the partial structure and the
errors with character positions); 2 usage error, or malformed text with --strict.
Text starting with '-' goes after '--': refvlm trp parse -- '-<Phrase>...'"""

_FORMAT_EXAMPLES = """\
examples:
  refvlm trp format '[{"phrase": "dogs", "units": ["box"], "count": 2}]'
  refvlm trp format '{"phrases": [{"phrase": "man", "units": ["mask"], "count": 1},
                                  {"phrase": "horse", "units": ["mask"], "count": 1}],
                      "text": "A {0} rides a {1}."}'
  echo '[{"phrase": "person", "units": ["box", "keypoint"], "count": 3}]' | refvlm trp format -

Each phrase spec gives "phrase", "units" (a list, or a comma-separated str) and
"count" (>= 1, one <REF> per instance). Without "text" the phrase groups are joined
by ", "; with it, {0}, {1}, ... are replaced by the phrase groups in order."""


def register(subparsers) -> None:
    trp_parser = subparsers.add_parser(
        "trp",
        help="parse or write TRP text (<Phrase>...</Phrase> (<Unit>...</Unit>[0]<REF>))",
        description="Tools for the Triplet-Based Referring Paradigm text that REF-VLM reads and writes.",
    )
    commands = trp_parser.add_subparsers(dest="trp_command", metavar="ACTION")
    commands.required = True

    parse_parser = commands.add_parser(
        "parse",
        help="parse TRP text and print its structure as JSON",
        description="Parses TRP text and prints groups, <REF> sites (ordinal, index, units, "
        "phrase), plain text and errors as JSON.",
        epilog=_PARSE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parse_parser.add_argument("text", metavar="TEXT", help="TRP text, or '-' to read it from stdin")
    parse_parser.add_argument("--strict", action="store_true",
                              help="fail (exit 2, message on stderr) on the first error instead of "
                              "printing the partial structure")
    parse_parser.add_argument("--units", metavar="U1,U2",
                              help="comma-separated unit names allowed (default: any name), e.g. box,mask")
    parse_parser.set_defaults(func=run_parse)

    format_parser = commands.add_parser(
        "format",
        help="write TRP text from JSON phrase specs",
        description="Writes TRP text from a JSON list of phrase specs (or an object with "
        "\"phrases\" and an optional \"text\" template).",
        epilog=_FORMAT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    format_parser.add_argument("spec", metavar="JSON", help="the JSON spec, or '-' to read it from stdin")
    format_parser.set_defaults(func=run_format)


def _read(argument: str) -> str:
    return sys.stdin.read() if argument == "-" else argument


def run_parse(args) -> int:
    from refvlm_core import trp

    units = None
    if args.units is not None:
        units = [name.strip() for name in args.units.split(",") if name.strip()]
        if not units:
            raise InputError("--units is empty: give comma-separated names such as box,mask")
    result = trp.parse(_read(args.text), strict=args.strict, units=units)
    print(result.to_json(indent=2))
    return 0 if result.ok else 1


def run_format(args) -> int:
    print(format_spec(_read(args.spec)))
    return 0


def format_spec(spec_json: str) -> str:
    """TRP text for a JSON spec (see ``refvlm trp format --help``)."""
    from refvlm_core import trp

    try:
        spec = json.loads(spec_json)
    except json.JSONDecodeError as error:
        raise InputError(
            f"the spec is not valid JSON ({error}); expected e.g. "
            '[{"phrase": "dogs", "units": ["box"], "count": 2}]'
        ) from None
    template = None
    if isinstance(spec, dict):
        template = spec.get("text")
        spec = spec.get("phrases")
    if not isinstance(spec, list) or not spec:
        raise InputError('expected a non-empty list of phrase specs, or {"phrases": [...], "text": ...}')
    groups = [trp.format_phrase(*_phrase_spec(item, k)) for k, item in enumerate(spec)]
    if template is None:
        return ", ".join(groups)
    if not isinstance(template, str):
        raise InputError(f'"text" must be a str template such as "A {{0}} rides a {{1}}.", got {template!r}')
    return _fill(trp.neutralize(template), groups)


def _phrase_spec(item: Any, k: int) -> tuple[str, list[str] | str, int]:
    if not isinstance(item, dict) or not {"phrase", "units", "count"} <= item.keys():
        raise InputError(f'phrase spec {k} must be an object with "phrase", "units" and "count", got {item!r}')
    return item["phrase"], item["units"], item["count"]


def _fill(template: str, groups: list[str]) -> str:
    """Replaces {0}, {1}, ... (and nothing else: other braces stay as they are)."""
    used: set[int] = set()

    def replace(match: re.Match[str]) -> str:
        k = int(match.group(1))
        if k >= len(groups):
            raise InputError(f"the template names {{{k}}} but there are only {len(groups)} phrase specs")
        used.add(k)
        return groups[k]

    text = re.sub(r"\{(\d{1,6})\}", replace, template)
    missing = sorted(set(range(len(groups))) - used)
    if missing:
        raise InputError(f"the template does not place phrase specs {missing}: add {{{missing[0]}}} etc.")
    return text
