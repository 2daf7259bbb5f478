"""POPE (Li et al. 2023): yes/no object-existence questions scored as binary
classification with "yes" as the positive class.

A free-form answer is read as POPE's evaluation reads it: its first sentence, "no"
when any of its words is "no" or "not", else "yes".
"""
from __future__ import annotations

import re
from typing import Sequence

from refvlm_core.errors import InputError

_WORD_RE = re.compile(r"[a-z']+")


def yes_no(answer: str) -> str:
    """"No, there is not." -> "no"; "Yes." -> "yes"; "There is a cat." -> "yes"."""
    first_sentence = answer.strip().split(".")[0].lower()
    words = set(_WORD_RE.findall(first_sentence))
    return "no" if words & {"no", "not"} else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and the fraction of "yes" answers.

    ``labels``: "yes"/"no" ground truth; ``predictions``: free-form answers. Precision
    or recall with an empty denominator is 0 (and so is F1)."""
    if len(predictions) != len(labels):
        raise InputError(f"{len(predictions)} predictions but {len(labels)} labels")
    truth = [str(label).strip().lower().rstrip(".") for label in labels]
    bad = sorted({t for t in truth if t not in ("yes", "no")})
    if bad:
        raise InputError(f"POPE labels must be 'yes' or 'no', got {bad[:3]}")
    guess = [yes_no(p) for p in predictions]
    tp = sum(g == "yes" and t == "yes" for g, t in zip(guess, truth))
    fp = sum(g == "yes" and t == "no" for g, t in zip(guess, truth))
    fn = sum(g == "no" and t == "yes" for g, t in zip(guess, truth))
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": sum(g == t for g, t in zip(guess, truth)) / n if n else 0.0,
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(g == "yes" for g in guess) / n if n else 0.0}
