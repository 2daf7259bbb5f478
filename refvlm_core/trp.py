"""The Triplet-Based Referring Paradigm (TRP): serialiser and parser.

REF-VLM answers in TRP: a concept, the decoding unit(s) and one ``<REF>`` per instance::

    <Phrase>capybaras</Phrase> (<Unit>box</Unit>[0]<REF>[1]<REF>)

Grammar (REF-VLM paper, Fig. 1 and sec. III-A), as this module reads it::

    text        := (plain text | phrase group)*
    phrase group:= <Phrase> (plain text | phrase group)* </Phrase> [spaces] [unit group]
    unit group  := "(" item ("," item)* ")"          item := unit block | unit group
    unit block  := <Unit> name ("," name)* </Unit> ([i]<REF>)+

So ``(<Unit>box</Unit>[0]<REF>[1]<REF>)``, the paper's Fig. 1(c) form
``((<Unit>box</Unit>[0]<REF>[1]<REF>),<Unit> box</Unit>[0]<REF>)`` and any other list
of blocks are unit groups. Unit names are an open vocabulary and are stripped;
``<Unit>box, keypoint</Unit>`` is a composite block routed to both decoders. Indices
``[i]`` count from 0 within each block. A phrase without a unit group is allowed (a
grounded caption may mention a phrase without referring to it).

Every ``<REF>`` of the text gets an ordinal, its position among ALL ``<REF>``s, even a
malformed one outside any block: the k-th ``<REF>`` token of a tokenized sequence carries
the k-th latent embedding, so ``parse(text).refs[k]`` always describes that token.

This module is the only place that writes or reads TRP (docs/architecture.md). It is
pure Python: no torch, cheap to import.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from refvlm_core.errors import InputError, TrpSyntaxError

PHRASE_OPEN, PHRASE_CLOSE, UNIT_OPEN, UNIT_CLOSE, REF = "<Phrase>", "</Phrase>", "<Unit>", "</Unit>", "<REF>"
IMAGE, REGION = "<image>", "<region>"
TRP_TAGS: tuple[str, ...] = (PHRASE_OPEN, PHRASE_CLOSE, UNIT_OPEN, UNIT_CLOSE, REF)
# What the tokenizer adds as special tokens.
SPECIAL_TOKENS: tuple[str, ...] = TRP_TAGS + (IMAGE, REGION)

_TAG_RE = re.compile("|".join(re.escape(tag) for tag in TRP_TAGS))
_INDEX_RE = re.compile(r"\[(\d+)\]")
_PARTIAL_INDEX_RE = re.compile(r"\[\d*\Z")
_MAX_INDEX_DIGITS = 9
# Deeper nesting is ignored (with an error) so that results stay printable as JSON.
MAX_NESTING = 32
_SPACE = " \t\r\n"
_TRUNCATED = " (the text ends there: truncated generation?)"


# ----------------------------------------------------------------------------- results


@dataclass
class TrpError:
    """One problem found by the parser; ``position`` is a character offset in the text."""

    message: str
    position: int


@dataclass
class Ref:
    """One ``[i]<REF>`` of a unit block. ``span`` is that of ``<REF>`` itself."""

    ordinal: int              # position among all <REF>s of the text
    index: int | None         # the [i] before it; None when missing
    span: tuple[int, int]


@dataclass
class UnitBlock:
    """``<Unit>u1, u2</Unit>[0]<REF>...``: the decoders to run and their <REF>s."""

    units: tuple[str, ...]
    refs: list[Ref]
    span: tuple[int, int]     # from <Unit> to the end of its last [i]<REF>


@dataclass
class PhraseGroup:
    """``<Phrase>text</Phrase>`` with its unit blocks; nested phrases are children."""

    text: str                 # tags removed, nested phrase texts inline, stripped
    span: tuple[int, int]     # from <Phrase> to the end of its unit group
    unit_blocks: list[UnitBlock] = field(default_factory=list)
    children: list["PhraseGroup"] = field(default_factory=list)


@dataclass
class RefSite:
    """Flat view of one <REF> for the router; ``parse(t).refs[k].ordinal == k``.

    A <REF> outside any unit block has ``units == ()`` and ``phrase == ""``.
    """

    ordinal: int
    index: int | None
    span: tuple[int, int]
    units: tuple[str, ...]
    phrase: str


@dataclass
class TrpParse:
    """Everything the parser found, plus the errors (empty when the text is valid TRP)."""

    text: str
    groups: list[PhraseGroup]
    refs: list[RefSite]
    plain_text: str
    errors: list[TrpError]

    @property
    def ok(self) -> bool:
        return not self.errors

    def blocks(self) -> list[tuple[str, UnitBlock]]:
        """(phrase, block) for every unit block of every group, nested ones included,
        in text order: the order of an assistant turn's RefTargets."""
        found: list[tuple[str, UnitBlock]] = []
        pending = list(self.groups)
        while pending:
            group = pending.pop()
            found.extend((group.text, block) for block in group.unit_blocks)
            pending.extend(group.children)
        return sorted(found, key=lambda item: item[1].span[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "ok": self.ok,
            "plain_text": self.plain_text,
            "groups": [_group_to_dict(group) for group in self.groups],
            "refs": [
                {"ordinal": r.ordinal, "index": r.index, "span": list(r.span),
                 "units": list(r.units), "phrase": r.phrase}
                for r in self.refs
            ],
            "errors": [{"message": e.message, "position": e.position} for e in self.errors],
        }

    def to_json(self, **json_kwargs: Any) -> str:
        json_kwargs.setdefault("ensure_ascii", False)
        return json.dumps(self.to_dict(), **json_kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrpParse":
        """Inverse of :meth:`to_dict` (``ok`` is derived from ``errors``)."""
        try:
            return cls(
                text=d["text"],
                groups=[_group_from_dict(g) for g in d["groups"]],
                refs=[
                    RefSite(r["ordinal"], r["index"], _span(r["span"]), tuple(r["units"]), r["phrase"])
                    for r in d["refs"]
                ],
                plain_text=d["plain_text"],
                errors=[TrpError(e["message"], e["position"]) for e in d["errors"]],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(
                f"not a TrpParse dict ({type(error).__name__}: {error}); "
                "pass what TrpParse.to_dict() or `refvlm trp parse` produced"
            ) from None


def _span(value: Sequence[int]) -> tuple[int, int]:
    start, end = value
    return int(start), int(end)


def _group_to_dict(group: PhraseGroup) -> dict[str, Any]:
    return {
        "text": group.text,
        "span": list(group.span),
        "unit_blocks": [
            {"units": list(b.units), "span": list(b.span),
             "refs": [{"ordinal": r.ordinal, "index": r.index, "span": list(r.span)} for r in b.refs]}
            for b in group.unit_blocks
        ],
        "children": [_group_to_dict(child) for child in group.children],
    }


def _group_from_dict(d: dict[str, Any]) -> PhraseGroup:
    blocks = [
        UnitBlock(tuple(b["units"]), [Ref(r["ordinal"], r["index"], _span(r["span"])) for r in b["refs"]],
                  _span(b["span"]))
        for b in d["unit_blocks"]
    ]
    return PhraseGroup(d["text"], _span(d["span"]), blocks, [_group_from_dict(c) for c in d["children"]])


# ----------------------------------------------------------------------------- parser


@dataclass
class _Frame:
    """An open <Phrase> (or the root of the text) while parsing."""

    start: int
    parts: list[str] = field(default_factory=list)
    children: list[PhraseGroup] = field(default_factory=list)


class _Parser:
    """Single left-to-right pass; never raises, records errors instead.

    Phrase nesting uses an explicit stack, so deep nesting cannot hit the recursion limit.
    """

    def __init__(self, text: str, units: Iterable[str] | None) -> None:
        self.text = text
        self.allowed = None if units is None else {u.strip() for u in units}
        self.errors: list[TrpError] = []
        self.refs: list[RefSite] = []
        self.end = self._end_before_partial_tag()

    # -- helpers

    def error(self, message: str, position: int) -> None:
        self.errors.append(TrpError(message, position))

    def at(self, token: str, pos: int) -> bool:
        return self.text.startswith(token, pos, self.end)

    def skip_space(self, pos: int) -> int:
        while pos < self.end and self.text[pos] in _SPACE:
            pos += 1
        return pos

    def _end_before_partial_tag(self) -> int:
        """A text cut inside a tag (``...[1]<RE``) is parsed up to the cut."""
        cut = self.text.rfind("<")
        tail = self.text[cut:] if cut >= 0 else ""
        if tail and any(tag.startswith(tail) and tag != tail for tag in TRP_TAGS):
            self.error(f"the text ends inside the tag {tail!r} (truncated generation?)", cut)
            return cut
        return len(self.text)

    def add_ref(self, index: int | None, pos: int, units: tuple[str, ...], phrase: str) -> Ref:
        ref = Ref(len(self.refs), index, (pos, pos + len(REF)))
        self.refs.append(RefSite(ref.ordinal, index, ref.span, units, phrase))
        return ref

    # -- phrases and plain text

    def run(self) -> TrpParse:
        text, stack = self.text, [_Frame(0)]
        pos, too_deep = 0, 0
        while pos < self.end:
            tag = _TAG_RE.search(text, pos, self.end)
            if tag is None:
                stack[-1].parts.append(text[pos:self.end])
                break
            stack[-1].parts.append(text[pos:tag.start()])
            pos = tag.start()
            if tag.group() == PHRASE_OPEN and len(stack) > MAX_NESTING:
                self.error(f"phrases nested more than {MAX_NESTING} deep: this <Phrase> is ignored", pos)
                too_deep += 1
                pos = tag.end()
            elif tag.group() == PHRASE_OPEN:
                stack.append(_Frame(pos))
                pos = tag.end()
            elif tag.group() == PHRASE_CLOSE and too_deep:
                too_deep -= 1  # closes an ignored <Phrase>
                pos = tag.end()
            elif tag.group() == PHRASE_CLOSE and len(stack) > 1:
                pos = self.close_phrase(stack, tag.end())
            elif tag.group() == UNIT_OPEN:
                self.error("a <Unit> block outside a phrase group: put it right after "
                           "<Phrase>...</Phrase> inside parentheses", pos)
                _, pos = self.parse_block(pos, phrase="")
            elif tag.group() == REF:
                self.error("a <REF> outside a unit block: it must follow <Unit>...</Unit>[i]", pos)
                self.add_ref(None, pos, (), "")
                pos = tag.end()
            else:  # </Phrase> with nothing open, or a stray </Unit>
                self.error(f"{tag.group()} without a matching opening tag", pos)
                pos = tag.end()
        while len(stack) > 1:  # unclosed phrases, innermost first
            frame = stack.pop()
            self.error(f"<Phrase> is never closed by </Phrase>{_TRUNCATED}", frame.start)
            group = PhraseGroup(_join(frame.parts), (frame.start, self.end), [], frame.children)
            stack[-1].children.append(group)
            stack[-1].parts.append(group.text)
        self.errors.sort(key=lambda e: e.position)
        return TrpParse(text, stack[0].children, self.refs, "".join(stack[0].parts), self.errors)

    def close_phrase(self, stack: list[_Frame], pos: int) -> int:
        """Pops the phrase closed by the </Phrase> that ends at ``pos`` and reads its unit
        group, if any. Returns where parsing goes on."""
        frame = stack.pop()
        group = PhraseGroup(_join(frame.parts), (frame.start, pos), [], frame.children)
        start = self.group_start(pos)
        if start is not None:
            group.unit_blocks, pos = self.parse_unit_group(start, group.text)
            group.span = (frame.start, pos)
        stack[-1].children.append(group)
        stack[-1].parts.append(group.text)
        return pos

    def group_start(self, pos: int) -> int | None:
        """Start of the unit group after ``</Phrase>``: spaces, then "(" ... "<Unit>"."""
        start = self.skip_space(pos)
        probe = start
        while probe < self.end and (self.text[probe] == "(" or self.text[probe] in _SPACE):
            probe += 1
        return start if self.at(UNIT_OPEN, probe) else None

    # -- unit groups and blocks

    def parse_unit_group(self, pos: int, phrase: str) -> tuple[list[UnitBlock], int]:
        """Reads ``(item, item, ...)`` where an item is a block or a nested group. A group
        that starts with a bare <Unit> (no parenthesis) is read as a list of blocks."""
        blocks: list[UnitBlock] = []
        opens: list[int] = []          # positions of the "(" not closed yet
        bare = self.text[pos] != "("
        if bare:
            self.error("the unit group has no parentheses: write (<Unit>...</Unit>[0]<REF>)", pos)
        consumed = pos                  # end of the last token that belongs to the group
        while True:
            probe = self.skip_space(consumed)
            if probe >= self.end:
                break
            char = self.text[probe]
            if char == "(" and (opens or self.group_start(probe) is not None):
                opens.append(probe)
            elif char == ")" and opens:
                opens.pop()
                if not opens and not bare:
                    consumed = probe + 1
                    break
            elif char == "," and (opens or self.group_start(probe + 1) is not None):
                pass
            elif self.at(UNIT_OPEN, probe):
                block, consumed = self.parse_block(probe, phrase)
                blocks.append(block)
                continue
            else:
                break
            consumed = probe + 1
        if opens:
            where = _TRUNCATED if self.skip_space(consumed) >= self.end else \
                f"; found {self.text[self.skip_space(consumed):][:12]!r} instead of ')'"
            self.error(f"the '(' of this unit group is never closed{where}", opens[0])
        return blocks, consumed

    def parse_block(self, pos: int, phrase: str) -> tuple[UnitBlock, int]:
        """Reads ``<Unit>names</Unit>`` and the ``[i]<REF>`` that follow it."""
        start, text = pos, self.text
        tag = _TAG_RE.search(text, pos + len(UNIT_OPEN), self.end)
        if tag is not None and tag.group() == UNIT_CLOSE:
            names, pos = text[pos + len(UNIT_OPEN):tag.start()], tag.end()
        else:
            stop = self.end if tag is None else tag.start()
            names, pos = text[pos + len(UNIT_OPEN):stop], stop
            self.error("<Unit> is not closed by </Unit>" + (_TRUNCATED if tag is None else ""), start)
        units = self.unit_names(names, start + len(UNIT_OPEN))
        refs: list[Ref] = []
        while True:
            probe = self.skip_space(pos)
            index: int | None = None
            match = _INDEX_RE.match(text, probe, self.end)
            index_at = probe
            if match is not None:
                index = self.index_value(match)
                probe = self.skip_space(match.end())
                if not self.at(REF, probe):
                    more = _TRUNCATED if probe >= self.end else ""
                    self.error(f"the index {match.group()} is not followed by <REF>{more}", match.start())
                    pos = match.end()
                    break
            elif _PARTIAL_INDEX_RE.match(text, probe, self.end):
                self.error(f"the index {text[probe:self.end]!r} is cut off{_TRUNCATED}", probe)
                pos = self.end
                break
            elif self.at(REF, probe):
                self.error("a <REF> without its index: write [i]<REF> with i counting from 0", probe)
            else:
                break
            self.check_index(index, refs, index_at)
            refs.append(self.add_ref(index, probe, units, phrase))
            pos = probe + len(REF)
        if not refs:
            self.error("a unit block without any [i]<REF>", start)
        return UnitBlock(units, refs, (start, pos)), pos

    def unit_names(self, names: str, pos: int) -> tuple[str, ...]:
        units: list[str] = []
        for raw in names.split(","):
            name = raw.strip()
            if not name:
                self.error(f"an empty unit name in <Unit>{names}</Unit>: name a unit such as 'box'", pos)
            elif name in units:
                self.error(f"the unit {name!r} is repeated in one <Unit> block", pos)
            else:
                if self.allowed is not None and name not in self.allowed:
                    known = ", ".join(sorted(self.allowed)) or "none"
                    self.error(f"unknown unit {name!r} (allowed here: {known})", pos)
                units.append(name)
        return tuple(units)

    def index_value(self, match: re.Match[str]) -> int | None:
        digits = match.group(1)
        if len(digits) > _MAX_INDEX_DIGITS:
            self.error(f"the index [{digits[:12]}...] is too large", match.start())
            return None
        return int(digits)

    def check_index(self, index: int | None, earlier: list[Ref], pos: int) -> None:
        """Indices count 0, 1, 2, ... within each block."""
        expected = len(earlier)
        if index is None or index == expected:
            return
        kind = "duplicated" if any(r.index == index for r in earlier) else "non-sequential"
        self.error(f"{kind} index [{index}]: expected [{expected}] (indices count from 0 in each block)", pos)


def _join(parts: list[str]) -> str:
    return "".join(parts).strip()


# ----------------------------------------------------------------------------- public API


def parse(text: str, strict: bool = False, units: Iterable[str] | None = None) -> TrpParse:
    """Parses TRP text.

    Lenient (default): never raises for any ``str``; returns the structure found and the
    errors with their character positions. ``strict=True`` raises
    :class:`~refvlm_core.errors.TrpSyntaxError` naming the first error instead.
    ``units``: when given, a unit name not in it is an error; ``None`` accepts any.
    """
    if not isinstance(text, str):
        raise InputError(f"TRP text must be a str, got {type(text).__name__}")
    if isinstance(units, str):
        units = units.split(",")
    if units is not None:
        units = list(units)
        if not all(isinstance(name, str) for name in units):
            raise InputError(f"units must be unit names (str) such as ['box', 'mask'], got {units!r}")
    result = _Parser(text, units).run()
    if strict and result.errors:
        first = result.errors[0]
        near = text[max(0, first.position - 20):first.position + 30]
        error = TrpSyntaxError(
            f"invalid TRP at character {first.position}: {first.message}; near {near!r}"
            + (f" (and {len(result.errors) - 1} more errors)" if len(result.errors) > 1 else "")
            + ". Fix the text, or parse leniently to get the partial structure."
        )
        error.position = first.position  # type: ignore[attr-defined]
        error.errors = result.errors     # type: ignore[attr-defined]
        raise error
    return result


def _check_units(units: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(units, str):
        units = units.split(",")
    if not isinstance(units, (list, tuple)) or not all(isinstance(name, str) for name in units):
        raise InputError(f"units must be a list of unit names such as ['box'], got {units!r}")
    cleaned = tuple(name.strip() for name in units)
    if not cleaned:
        raise InputError("no unit given: name at least one, e.g. ['box']")
    for name in cleaned:
        if not name or any(c in name for c in "<>,()[]"):
            raise InputError(f"invalid unit name {name!r}: use a plain word such as 'box' or 'mask'")
    if len(set(cleaned)) != len(cleaned):
        raise InputError(f"repeated unit name in {list(cleaned)}")
    return cleaned


def format_refs(units: Sequence[str], count: int) -> str:
    """``(<Unit>box</Unit>[0]<REF>[1]<REF>)``; composite units are joined by ", ".
    A str is read as comma-separated names ("box, keypoint")."""
    names = _check_units(units)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"count must be an int >= 1 (one <REF> per instance), got {count!r}")
    refs = "".join(f"[{i}]{REF}" for i in range(count))
    return f"({UNIT_OPEN}{', '.join(names)}{UNIT_CLOSE}{refs})"


def format_phrase(phrase: str, units: Sequence[str], count: int) -> str:
    """``<Phrase>dogs</Phrase> (<Unit>box</Unit>[0]<REF>[1]<REF>)``."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise InputError(f"the phrase must be a non-empty str, got {phrase!r}")
    if neutralize(phrase) != phrase:
        raise InputError(f"the phrase {phrase!r} contains tag-like text: pass it through trp.neutralize() first")
    return f"{PHRASE_OPEN}{phrase.strip()}{PHRASE_CLOSE} {format_refs(units, count)}"


def plain_text(text: str) -> str:
    """The text with TRP tags and unit groups removed, for display."""
    return parse(text).plain_text


# A tag-like string: "<REF>", "< ref >", "</ PHRASE>", "<Image>", ... (any case, spaces
# inside the angle brackets). Only these are touched; every other character is kept.
_TAG_LIKE_RE = re.compile(
    r"<(\s*/?\s*(?:phrase|unit|ref|image|region)\s*)>", re.IGNORECASE
)


def neutralize(user_text: str) -> str:
    """Makes user text safe for the tokenizer: no tag in it can become a special token.

    Each tag-like string (any case, spaces allowed inside the brackets) gets its angle
    brackets replaced by the look-alike guillemets U+2039/U+203A: ``<REF>`` becomes
    ``‹REF›``, still readable, never ``<REF>``. Nothing else changes. Idempotent, since
    the output has no tag-like string left and the replacement adds no "<" or ">".
    """
    return _TAG_LIKE_RE.sub(lambda m: f"\u2039{m.group(1)}\u203a", user_text)
