"""TRP-constrained decoding: a token-level automaton that lets the LLM write only answers
that parse, with units that have a decoder.

The grammar followed here is the part of TRP (see trp.py) that the training data writes::

    answer      := (free text | phrase group)* [stop]
    phrase group:= <Phrase> free text </Phrase> [spaces] [unit group]
    unit group  := "(" <Unit> name </Unit> [0]<REF> ([k]<REF>)* ")" free text

Free text is any plain token without "<" or ">" (so plain tokens can never spell a tag)
and is left to the model; the structure around it is enforced. Unit names are the
registered units, in the tokenizer's own tokenization of each name, alone or composite
(``<Unit>box, keypoint</Unit>``). After a unit group's "(" the ``<Unit>`` is
the only continuation, after ``</Unit>`` it is ``[0]<REF>``, after ``[`` it is
``k]<REF>``: :meth:`TrpDecodingState.forced` lists such tokens so that the caller can
append them in one forward pass (jump-forward) instead of one pass each. After a unit
name the grammar still allows a comma, so :meth:`TrpDecodingState.draft` proposes
``</Unit>[0]<REF>``, which the caller verifies in the same pass (kept only when the
model itself picks ``</Unit>``: the text is the same as token by token).

A budget (``max_new_tokens``) is respected by construction: a token is allowed only when
the cheapest way to close everything it opens still fits, so a cut answer parses too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from refvlm_core import trp

_GROUP_OPEN_RE = re.compile(r"\s*\(\s*")
FREE, AFTER_PHRASE, IN_PHRASE, UNIT_NAME, AFTER_REF, DONE = (
    "free", "after_phrase", "in_phrase", "unit_name", "after_ref", "done")


class TrpGrammar:
    """What the automaton needs to know about a tokenizer and a set of units; built once
    per model (one batch decode of the vocabulary, ~0.2 s for 49k tokens)."""

    def __init__(self, tokenizer, units: Iterable[str], stop_ids: Iterable[int], composite: bool = True):
        self.units = tuple(dict.fromkeys(u.strip() for u in units))
        if not self.units:
            raise ValueError("constrained decoding needs at least one registered unit")
        self.tokenizer = tokenizer
        self.composite = composite
        self.stop_ids = frozenset(stop_ids)
        self.tag = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in trp.TRP_TAGS}
        self.vocab_size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
        special = set(tokenizer.all_special_ids)
        self.free = torch.tensor([i not in special and "<" not in t and ">" not in t and t != ""
                                  for i, t in enumerate(texts)])                    # [V] bool
        self.free_ids = self.free.nonzero().flatten()
        self.space_only = {i for i in self.free_ids.tolist() if not texts[i].strip()}
        self.group_open = [i for i in self.free_ids.tolist() if _GROUP_OPEN_RE.fullmatch(texts[i])]
        # ")" then free text: ")" ")," ")." all close the group
        self.group_close = sorted((i for i in self.free_ids.tolist() if texts[i].startswith(")")),
                                  key=lambda i: len(texts[i]))                 # ")" first
        if not self.group_open or not self.group_close:
            raise ValueError("the tokenizer has no plain '(' or ')' token: TRP cannot be constrained")
        self.first_name = {u: self.encode(u) for u in self.units}           # right after <Unit>
        self.next_name = {u: self.encode(", " + u) for u in self.units}     # after a comma
        self._index: dict[int, list[int]] = {}

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False).input_ids)

    def index_tokens(self, k: int) -> list[int]:
        """Tokens of ``[k]`` as the training data tokenizes them."""
        if k not in self._index:
            self._index[k] = list(self.encode(f"[{k}]"))
        return self._index[k]

    def start(self) -> "TrpDecodingState":
        return TrpDecodingState(self)


@dataclass
class TrpDecodingState:
    """Where one answer is in the grammar; :meth:`advance` with each token it gets."""

    grammar: TrpGrammar
    kind: str = FREE
    queue: list[int] = field(default_factory=list)     # tokens that must come next
    phrase_empty: bool = True
    names_done: tuple[str, ...] = ()
    name_piece: tuple[int, ...] = ()                    # tokens of the unit name being written
    refs: int = 0                                       # <REF>s in the current block

    # ---- what may come next ----------------------------------------------------------
    def allowed(self, budget: int) -> torch.Tensor:
        """[V] bool: the tokens allowed now when at most ``budget`` tokens remain (>= 1)."""
        g = self.grammar
        mask = torch.zeros(g.vocab_size, dtype=torch.bool)
        if self.queue:
            mask[self.queue[0]] = True
            return mask
        if self.kind in (FREE, AFTER_PHRASE) or (self.kind == IN_PHRASE and budget >= 2):
            mask |= g.free
        for tokens, cost in self._structural():  # budget-checked, also where free above
            mask[tokens] = 1 + cost <= budget
        if not mask.any():  # the budget allows only the cheapest closing
            mask[self.closing()[0]] = True
        return mask

    def _structural(self) -> list[tuple[list[int], int]]:
        """(tokens, closing cost after any of them) for the non-free tokens that may come
        next; group open / close are free tokens with a structural meaning, listed here so
        that the budget checks them. Tokens of one entry lead to equivalent states."""
        g = self.grammar
        if self.kind in (FREE, AFTER_PHRASE):
            entries = [([g.tag[trp.PHRASE_OPEN]], 1), (sorted(g.stop_ids), 0)]
            if self.kind == AFTER_PHRASE:
                entries.append((g.group_open, len(self._after(g.group_open[0]).closing())))
            return entries
        if self.kind == IN_PHRASE:
            return [] if self.phrase_empty else [([g.tag[trp.PHRASE_CLOSE]], 0)]
        if self.kind == UNIT_NAME:
            return [([t], len(self._after(t).closing())) for t in self._name_options()]
        if self.kind == AFTER_REF:
            first = g.index_tokens(self.refs)[0]
            return [([first], len(self._after(first).closing())), (g.group_close, 0)]
        return []

    def _name_options(self) -> list[int]:
        g = self.grammar
        table = g.next_name if self.names_done else g.first_name
        left = [u for u in g.units if u not in self.names_done]
        depth = len(self.name_piece)
        options = {table[u][depth] for u in left
                   if table[u][:depth] == self.name_piece and len(table[u]) > depth}
        if self._name_complete():
            options.add(g.tag[trp.UNIT_CLOSE])
            if g.composite and len(self.names_done) + 1 < len(g.units):
                options.update(g.next_name[u][0] for u in left if u != self._piece_unit())
        return sorted(options)

    def _piece_unit(self) -> str | None:
        table = self.grammar.next_name if self.names_done else self.grammar.first_name
        return next((u for u in self.grammar.units
                     if u not in self.names_done and table[u] == self.name_piece), None)

    def _name_complete(self) -> bool:
        return self._piece_unit() is not None

    def forced(self, budget: int) -> list[int]:
        """The tokens that are the only continuation from here, in order (at most ``budget``)."""
        probe, out = self.copy(), []
        while len(out) < budget and probe.kind != DONE:
            options = probe.allowed(budget - len(out)).nonzero().flatten()
            if len(options) != 1:
                break
            out.append(int(options[0]))
            probe.advance(out[-1])
        return out

    def draft(self, budget: int) -> list[int]:
        """A guess to verify in the same forward pass: after a complete unit name the
        grammar allows ``</Unit>`` or a comma (a composite unit); ``</Unit>`` and the
        ``[0]<REF>`` it forces are the usual case. Empty where there is nothing to guess."""
        g = self.grammar
        if self.queue or self.kind != UNIT_NAME or not self._name_complete():
            return []
        probe = self._after(g.tag[trp.UNIT_CLOSE])
        guess = [g.tag[trp.UNIT_CLOSE], *probe.forced(budget - 1)]
        return guess if len(guess) <= budget and self.allowed(budget)[guess[0]] else []

    def closing(self) -> list[int]:
        """The shortest token sequence that ends the answer validly from here."""
        g = self.grammar
        if self.queue:
            return self.queue + self._after_queue_closing()
        if self.kind == IN_PHRASE:
            return [g.tag[trp.PHRASE_CLOSE]]
        if self.kind == UNIT_NAME:
            rest = min((seq[len(self.name_piece):] for seq in self._name_candidates()), key=len)
            return [*rest, g.tag[trp.UNIT_CLOSE], *g.index_tokens(0), g.tag[trp.REF], g.group_close[0]]
        if self.kind == AFTER_REF:
            return [g.group_close[0]]
        return []

    def _name_candidates(self) -> list[tuple[int, ...]]:
        table = self.grammar.next_name if self.names_done else self.grammar.first_name
        depth = len(self.name_piece)
        return [table[u] for u in self.grammar.units
                if u not in self.names_done and table[u][:depth] == self.name_piece]

    def _after_queue_closing(self) -> list[int]:
        probe = self.copy()
        for token in self.queue:
            probe.advance(token)
        return probe.closing()

    def _after(self, token: int) -> "TrpDecodingState":
        probe = self.copy()
        probe.advance(token)
        return probe

    def copy(self) -> "TrpDecodingState":
        return TrpDecodingState(self.grammar, self.kind, list(self.queue), self.phrase_empty,
                                self.names_done, self.name_piece, self.refs)

    # ---- moving on -------------------------------------------------------------------
    def advance(self, token: int) -> None:
        g = self.grammar
        if self.queue:
            self.queue.pop(0)
            if token == g.tag[trp.REF]:
                self.kind, self.refs = AFTER_REF, self.refs + 1
            return
        if token in g.stop_ids:
            self.kind = DONE
        elif self.kind in (FREE, AFTER_PHRASE) and token == g.tag[trp.PHRASE_OPEN]:
            self.kind, self.phrase_empty = IN_PHRASE, True
        elif self.kind == AFTER_PHRASE and token in g.group_open:
            self.kind, self.queue = UNIT_NAME, [g.tag[trp.UNIT_OPEN]]
            self.names_done, self.name_piece, self.refs = (), (), 0
        elif self.kind == AFTER_PHRASE:
            self.kind = AFTER_PHRASE if token in g.space_only else FREE
        elif self.kind == IN_PHRASE and token == g.tag[trp.PHRASE_CLOSE]:
            self.kind = AFTER_PHRASE
        elif self.kind == IN_PHRASE:
            self.phrase_empty = self.phrase_empty and token in g.space_only
        elif self.kind == UNIT_NAME:
            self._advance_name(token)
        elif self.kind == AFTER_REF and token in g.group_close:
            self.kind = FREE
        elif self.kind == AFTER_REF:
            self.queue = g.index_tokens(self.refs)[1:] + [g.tag[trp.REF]]

    def _advance_name(self, token: int) -> None:
        g = self.grammar
        if token == g.tag[trp.UNIT_CLOSE]:
            self.queue = g.index_tokens(0) + [g.tag[trp.REF]]
            return
        unit = self._piece_unit()
        if unit is not None and token not in self._name_options_within_piece():
            self.names_done, self.name_piece = self.names_done + (unit,), ()  # a comma: next name
        self.name_piece = self.name_piece + (token,)

    def _name_options_within_piece(self) -> set[int]:
        depth = len(self.name_piece)
        return {seq[depth] for seq in self._name_candidates() if len(seq) > depth}


def constrain(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [1, V] with every token outside ``allowed`` [V'] (V' <= V) set to -inf.
    Rows beyond the grammar's vocabulary (padding rows of the embedding) are never allowed."""
    out = torch.full_like(logits, -float("inf"))
    width = min(allowed.shape[0], logits.shape[-1])
    keep = allowed[:width].to(logits.device)
    out[:, :width] = torch.where(keep, logits[:, :width], out[:, :width])
    return out

