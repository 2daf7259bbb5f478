"""VQAv2 accuracy (Antol et al. 2015) with the official answer normalisation.

Accuracy of one answer against the human answers: for each of the n human answers,
leave it out and score min(#matching others / 3, 1); average the n scores (so with the
usual 10 answers, 1/2/3+ matches give 0.3/0.6/0.9/1.0). With a single reference answer
(datasets such as SimWorld or GQA) the leave-one-out has nothing left, so that case is
exact match after normalisation. The official script normalises only when the human
answers disagree; here both sides are always normalised (as most re-implementations do).
"""
from __future__ import annotations

import re
from typing import Sequence

from refvlm_core.errors import InputError

# Words the official evaluation rewrites (a subset of its contraction table: every
# entry of the form "dont" -> "don't" for the common English contractions).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightve": "might've", "mightnt": "mightn't", "mustve": "must've", "mustnt": "mustn't", "shant": "shan't",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "weve": "we've", "werent": "weren't", "whats": "what's", "whens": "when's", "wheres": "where's",
    "whos": "who's", "whove": "who've", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_PERIOD_RE = re.compile(r"(?!<=\d)(\.)(?!\d)")   # a period that is not a decimal point
_DIGIT_COMMA_RE = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    """Drop punctuation glued to a word or next to a space; split on the rest."""
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _DIGIT_COMMA_RE.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_RE.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """"Two dogs." -> "2 dogs"; "the Yes!" -> "yes"; "doesnt" -> "doesn't"."""
    if not isinstance(answer, str):
        raise InputError(f"an answer must be a str, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers (see module doc)."""
    if isinstance(answers, str) or not answers:
        raise InputError("give the reference answers as a non-empty list of str")
    predicted = normalize_answer(prediction)
    truth = [normalize_answer(a) for a in answers]
    if len(truth) == 1:
        return float(predicted == truth[0])
    scores = []
    for left_out in range(len(truth)):
        matches = sum(a == predicted for k, a in enumerate(truth) if k != left_out)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def vqa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"accuracy"}: mean VQA accuracy over questions (0 when there are none)."""
    if len(predictions) != len(answers):
        raise InputError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        return {"accuracy": 0.0}
    return {"accuracy": sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers)) / len(predictions)}
