"""TRP grammar: serialiser/parser round trips, the paper's examples, robustness of the
lenient parser, strict errors, neutralize, and the `refvlm trp` CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refvlm_core import trp
from refvlm_core.errors import InputError, TrpSyntaxError

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "trp_examples.json").read_text())
REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- helpers


def group_shape(group: trp.PhraseGroup) -> dict:
    return {"text": group.text, "blocks": [list(b.units) for b in group.unit_blocks],
            "children": [group_shape(child) for child in group.children]}


def ref_rows(result: trp.TrpParse) -> list[list]:
    return [[r.ordinal, r.index, list(r.units), r.phrase] for r in result.refs]


def all_spans(result: trp.TrpParse) -> list[tuple[int, int]]:
    spans = [r.span for r in result.refs]
    pending = list(result.groups)
    while pending:
        group = pending.pop()
        spans.append(group.span)
        for block in group.unit_blocks:
            spans.append(block.span)
            spans.extend(ref.span for ref in block.refs)
        pending.extend(group.children)
    return spans


def check_invariants(text: str, result: trp.TrpParse) -> None:
    """What holds for ANY input: the router relies on the first two."""
    ref_starts = [m.start() for m in re.finditer(re.escape(trp.REF), text)]
    assert [r.span[0] for r in result.refs] == ref_starts
    assert [r.ordinal for r in result.refs] == list(range(len(ref_starts)))
    for start, end in all_spans(result):
        assert 0 <= start <= end <= len(text)
    for error in result.errors:
        assert 0 <= error.position <= len(text) and error.message
    assert result.ok == (not result.errors)
    assert trp.TrpParse.from_dict(json.loads(result.to_json())) == result


# ----------------------------------------------------------------------------- strategies

WORDS = st.text(alphabet="abcdefghij klmnop,.-'é犬", min_size=1, max_size=12).filter(lambda s: s.strip())
UNIT_NAMES = st.sampled_from(["box", "mask", "keypoint", "depth", "pose_3d", "instance mask"])
UNIT_LISTS = st.lists(UNIT_NAMES, min_size=1, max_size=3, unique=True)
FILLER = st.text(alphabet="abc xyz.,;()[]0123\n", max_size=10)
PHRASE_SPECS = st.lists(st.tuples(WORDS, UNIT_LISTS, st.integers(1, 4)), min_size=1, max_size=4)


@st.composite
def valid_trp(draw) -> tuple[str, list[tuple[str, list[str], int]]]:
    specs = draw(PHRASE_SPECS)
    pieces = [draw(FILLER)]
    for phrase, units, count in specs:
        pieces += [trp.format_phrase(phrase, units, count), draw(FILLER)]
    return "".join(pieces), specs


TAG_SOUP = st.lists(
    st.sampled_from([*trp.TRP_TAGS, "(", ")", ",", " ", "[0]", "[1]", "[", "]", "box", "mask",
                     "dog", "<", ">", "</", "<Unit>box</Unit>", "[0]<REF>", "<image>"]),
    max_size=30,
).map("".join)


@st.composite
def corrupted_trp(draw) -> str:
    text, _ = draw(valid_trp())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "insert", "truncate"]))
        at = draw(st.integers(0, len(text)))
        if op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 6)):]
        elif op == "insert":
            piece = draw(st.sampled_from([*trp.TRP_TAGS, "(", ")", "[2]", ",", "x", "<", "[0]<REF>"]))
            text = text[:at] + piece + text[at:]
        else:
            text = text[:at]
    return text


# ----------------------------------------------------------------------------- fixtures

PAPER_UNITS = ("box", "mask", "keypoint", "depth")  # the units of the paper's examples


@pytest.mark.parametrize("case", FIXTURES["valid"], ids=lambda c: c["name"])
def test_paper_examples_parse_to_the_expected_structure(case):
    result = trp.parse(case["text"], strict=True, units=PAPER_UNITS)
    assert result.ok
    assert [group_shape(g) for g in result.groups] == case["groups"]
    assert ref_rows(result) == case["refs"]
    assert result.plain_text == case["plain_text"] == trp.plain_text(case["text"])
    check_invariants(case["text"], result)


@pytest.mark.parametrize("case", FIXTURES["malformed"], ids=lambda c: c["name"])
def test_malformed_examples_give_partial_structure_and_positions(case):
    result = trp.parse(case["text"])
    assert not result.ok
    assert ref_rows(result) == case["refs"]
    assert [e.position for e in result.errors] == case["error_positions"]
    check_invariants(case["text"], result)
    with pytest.raises(TrpSyntaxError, match=f"at character {case['error_positions'][0]}"):
        trp.parse(case["text"], strict=True)


def test_fig1c_block_spans_and_units_are_stripped():
    text = FIXTURES["valid"][1]["text"]
    first, second = trp.parse(text).groups[0].unit_blocks
    assert text[first.span[0]:first.span[1]] == "<Unit>box</Unit>[0]<REF>[1]<REF>"
    assert text[second.span[0]:second.span[1]] == "<Unit> box</Unit>[0]<REF>"
    assert second.units == ("box",)
    assert trp.parse(text).groups[0].span == (0, len(text))


def test_blocks_are_listed_in_text_order_with_their_phrase():
    text = ("<Phrase><Phrase>dog</Phrase> (<Unit>box</Unit>[0]<REF>) near <Phrase>cat</Phrase></Phrase> "
            "(<Unit>mask</Unit>[0]<REF>), <Phrase>sky</Phrase> (<Unit>depth</Unit>[0]<REF>)")
    blocks = trp.parse(text, strict=True).blocks()
    assert [(phrase, block.units) for phrase, block in blocks] == [
        ("dog", ("box",)), ("dog near cat", ("mask",)), ("sky", ("depth",))]


# ----------------------------------------------------------------------------- specific errors


@pytest.mark.parametrize("text, message", [
    ("<Phrase>a</Phrase> (<Unit>box</Unit>[1]<REF>)", "non-sequential index \\[1\\]"),
    ("<Phrase>a</Phrase> (<Unit>box</Unit>[0]<REF>[0]<REF>)", "duplicated index \\[0\\]"),
    ("<Phrase>a</Phrase> (<Unit>box</Unit>)", "without any \\[i\\]<REF>"),
    ("<Phrase>a</Phrase> (<Unit>box,</Unit>[0]<REF>)", "empty unit name"),
    ("<Phrase>a</Phrase> (<Unit>box, box</Unit>[0]<REF>)", "repeated"),
    ("<Phrase>a</Phrase> (<Unit>box</Unit>[0]<REF> and more", "never closed; found 'and more'"),
    ("<Phrase>a</Phrase> (<Unit>box</Unit>[0]", "not followed by <REF> \\(the text ends"),
    ("<Phrase>a</Phrase> (<Unit>box</Unit>[0]<REF>[1", "is cut off"),
    ("<Phrase>a</Phrase> (<Unit>bo", "not closed by </Unit> \\(the text ends"),
    ("<Phrase>a</Phrase> (<Unit>box</Unit>[0]<REF>)</Phr", "ends inside the tag '</Phr'"),
    ("<Phrase>a</Phrase> <Unit>box</Unit>[0]<REF>", "no parentheses"),
    ("a <Unit>box</Unit>[0]<REF>", "outside a phrase group"),
    ("<Phrase>a</Phrase> (<Unit>box</Unit>[99999999999]<REF>)", "too large"),
])
def test_each_kind_of_error_is_reported(text, message):
    result = trp.parse(text)
    assert any(re.search(message, e.message) for e in result.errors), result.errors
    check_invariants(text, result)
    with pytest.raises(TrpSyntaxError):
        trp.parse(text, strict=True)


def test_unknown_unit_only_when_units_are_restricted():
    text = "<Phrase>arm</Phrase> (<Unit>pose_6d</Unit>[0]<REF>)"
    assert trp.parse(text).ok  # open vocabulary by default
    result = trp.parse(text, units=["box", "mask"])
    assert [e.message for e in result.errors] == ["unknown unit 'pose_6d' (allowed here: box, mask)"]
    assert result.refs[0].units == ("pose_6d",)  # still routed by what was generated
    with pytest.raises(TrpSyntaxError, match="unknown unit 'pose_6d'"):
        trp.parse(text, strict=True, units="box,mask")


def test_bare_unit_group_still_routes_its_refs():
    result = trp.parse("<Phrase>a</Phrase><Unit>box</Unit>[0]<REF>, <Unit>mask</Unit>[0]<REF> (left)")
    assert ref_rows(result) == [[0, 0, ["box"], "a"], [1, 0, ["mask"], "a"]]
    assert result.plain_text == "a (left)"


def test_deep_nesting_is_bounded_and_printable():
    text = "<Phrase>" * 3000 + "x" + "</Phrase>" * 3000 + " (<Unit>box</Unit>[0]<REF>)"
    result = trp.parse(text)
    assert not result.ok and result.refs[0].units == ("box",)
    json.loads(result.to_json())
    check_invariants(text, result)


def test_non_str_input_is_a_clear_error():
    with pytest.raises(InputError, match="must be a str"):
        trp.parse(b"<REF>")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="units must be unit names"):
        trp.parse("<REF>", units=["box", 3])  # type: ignore[list-item]


def test_from_dict_rejects_foreign_dicts():
    with pytest.raises(InputError, match="not a TrpParse dict"):
        trp.TrpParse.from_dict({"text": "x"})


# ----------------------------------------------------------------------------- serialiser


def test_format_examples():
    assert trp.format_refs(["box"], 2) == "(<Unit>box</Unit>[0]<REF>[1]<REF>)"
    assert trp.format_refs(["box", "keypoint"], 1) == "(<Unit>box, keypoint</Unit>[0]<REF>)"
    assert trp.format_refs("box, keypoint", 1) == "(<Unit>box, keypoint</Unit>[0]<REF>)"
    assert trp.format_phrase("dogs", ["box"], 2) == "<Phrase>dogs</Phrase> (<Unit>box</Unit>[0]<REF>[1]<REF>)"
    assert trp.SPECIAL_TOKENS == ("<Phrase>", "</Phrase>", "<Unit>", "</Unit>", "<REF>", "<image>", "<region>")


@pytest.mark.parametrize("call", [
    lambda: trp.format_refs([], 1),
    lambda: trp.format_refs(["box"], 0),
    lambda: trp.format_refs(["box"], True),
    lambda: trp.format_refs(["bo<x"], 1),
    lambda: trp.format_refs(["box", " "], 1),
    lambda: trp.format_refs(["box", "box"], 1),
    lambda: trp.format_refs(5, 1),
    lambda: trp.format_phrase("  ", ["box"], 1),
    lambda: trp.format_phrase("a <REF> b", ["box"], 1),
])
def test_format_rejects_bad_input(call):
    with pytest.raises(InputError):
        call()


@FAST
@given(valid_trp())
def test_format_then_parse_round_trips(case):
    text, specs = case
    result = trp.parse(text, strict=True)
    assert [(g.text, len(g.unit_blocks), g.children) for g in result.groups] == [
        (phrase.strip(), 1, []) for phrase, _, _ in specs]
    expected_refs = [(index, tuple(units), phrase.strip())
                     for phrase, units, count in specs for index in range(count)]
    assert [(r.index, r.units, r.phrase) for r in result.refs] == expected_refs
    assert [b.units for _, b in result.blocks()] == [tuple(units) for _, units, _ in specs]
    check_invariants(text, result)


@FAST
@given(st.lists(WORDS, min_size=2, max_size=4), UNIT_LISTS, st.integers(1, 3))
def test_nested_phrases_round_trip(words, units, count):
    inner = " and ".join(f"{trp.PHRASE_OPEN}{w}{trp.PHRASE_CLOSE}" for w in words)
    text = f"{trp.PHRASE_OPEN}{inner}{trp.PHRASE_CLOSE} {trp.format_refs(units, count)}"
    (group,) = trp.parse(text, strict=True).groups
    assert [child.text for child in group.children] == [w.strip() for w in words]
    assert group.text == " and ".join(w.strip() for w in words).strip()
    assert [b.units for b in group.unit_blocks] == [tuple(units)]


# ----------------------------------------------------------------------------- robustness


@FAST
@given(st.one_of(corrupted_trp(), TAG_SOUP, st.text(max_size=60)))
def test_lenient_parser_never_raises_and_strict_raises_on_errors(text):
    result = trp.parse(text)
    check_invariants(text, result)
    if result.ok:
        assert trp.parse(text, strict=True) == result
    else:
        with pytest.raises(TrpSyntaxError) as raised:
            trp.parse(text, strict=True)
        assert raised.value.position == result.errors[0].position


# ----------------------------------------------------------------------------- neutralize


@st.composite
def tag_variants(draw) -> str:
    name = draw(st.sampled_from(["phrase", "unit", "ref", "image", "region"]))
    name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    space = st.sampled_from(["", " ", "  ", "\t", "\n"])
    slash = draw(st.sampled_from(["", "/"]))
    return f"<{draw(space)}{slash}{draw(space)}{name}{draw(space)}>"


INJECTED = st.lists(st.one_of(st.sampled_from(trp.SPECIAL_TOKENS), tag_variants(),
                              st.text(max_size=8), st.sampled_from(["<", ">", "<<", ">>"])),
                    max_size=12).map("".join)


@FAST
@given(INJECTED)
def test_neutralize_removes_every_tag_and_is_idempotent(text):
    safe = trp.neutralize(text)
    assert not any(token in safe for token in trp.SPECIAL_TOKENS)
    assert not any(token.lower() in safe.lower() for token in trp.SPECIAL_TOKENS)
    assert trp.neutralize(safe) == safe
    assert len(safe) == len(text)
    parsed = trp.parse(safe)
    assert parsed.refs == [] and parsed.groups == []


@FAST
@given(st.text(alphabet=st.characters(blacklist_characters="<")))
def test_neutralize_keeps_text_without_tags(text):
    assert trp.neutralize(text) == text


def test_neutralize_example():
    assert trp.neutralize("find the < REF > and <image> in <Phrase>x</phrase>, a<b") == (
        "find the \u2039 REF \u203a and \u2039image\u203a in \u2039Phrase\u203ax\u2039/phrase\u203a, a<b")


# ----------------------------------------------------------------------------- CLI


def refvlm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refvlm_cli.main", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)


def test_cli_parse_valid_and_malformed():
    text = FIXTURES["valid"][1]["text"]
    done = refvlm("trp", "parse", text)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == trp.parse(text).to_dict()

    done = refvlm("trp", "parse", "-", stdin="<Phrase>dog</Phrase> (<Unit>box</Unit><REF>")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    output = json.loads(done.stdout)
    assert output["ok"] is False and output["refs"][0]["units"] == ["box"]
    assert {e["position"] for e in output["errors"]} == {21, 38}


def test_cli_parse_strict_and_units_fail_with_a_message():
    done = refvlm("trp", "parse", "--strict", "--units", "box,mask", "<Phrase>x</Phrase> (<Unit>depth</Unit>[0]<REF>)")
    assert done.returncode == 2 and done.stdout == ""
    assert "unknown unit 'depth'" in done.stderr and "Traceback" not in done.stderr


def test_cli_format_and_bad_json():
    spec = {"phrases": [{"phrase": "man", "units": ["mask"], "count": 1},
                        {"phrase": "horse", "units": "mask", "count": 1}], "text": "A {0} rides a {1}."}
    done = refvlm("trp", "format", "-", stdin=json.dumps(spec))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == FIXTURES["valid"][5]["text"]

    for bad in ("{not json", '[{"phrase": "x"}]', '{"phrases": [], "text": "{0}"}'):
        done = refvlm("trp", "format", bad)
        assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr
