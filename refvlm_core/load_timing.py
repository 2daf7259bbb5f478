"""Where loading a model spends its time: named phases, for the log and diagnostics.

    with recording() as phases:          # {phase name: seconds}
        predictor = Predictor.from_pretrained(folder)

Loading code marks its steps with ``with phase("tokenizer"): ...``; outside a
``recording`` that costs one lookup. Recordings nest (the node records around the
Predictor's own), and a phase inside another is reported on its own, not subtracted.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_RECORDINGS: ContextVar[tuple[dict[str, float], ...]] = ContextVar("load_recordings", default=())


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Collect the phases run inside the block (also those of nested recordings)."""
    phases: dict[str, float] = {}
    token = _RECORDINGS.set(_RECORDINGS.get() + (phases,))
    try:
        yield phases
    finally:
        _RECORDINGS.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name`` in every active recording (repeated phases add up)."""
    recordings = _RECORDINGS.get()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        for phases in recordings:
            phases[name] = phases.get(name, 0.0) + elapsed
