"""Valid TRP rate: the fraction of model answers that parse without any error with
``refvlm_core.trp.parse`` (plain-text answers without tags are valid TRP)."""
from __future__ import annotations

from typing import Sequence

from refvlm_core import trp


def valid_trp_rate(answers: Sequence[str]) -> float:
    """0..1; an empty set of answers gives 0."""
    if not answers:
        return 0.0
    return sum(trp.parse(text).ok for text in answers) / len(answers)
