"""Caption metrics as the COCO caption evaluation computes them: corpus BLEU-4,
CIDEr-D, and METEOR in its exact-match form.

Differences from the reference toolkit (documented, deliberate):
- Tokenisation: lower case, punctuation dropped, split on spaces (the toolkit runs the
  Stanford PTB tokenizer, a Java program; on plain English captions the two agree
  except for contractions, which PTB splits).
- METEOR: the reference jar also matches stems, WordNet synonyms and paraphrases and
  tunes its parameters; it needs Java and WordNet, which are not available offline.
  This module implements the original exact-match METEOR (Banerjee & Lavie 2005):
  unigram precision P and recall R, Fmean = 10PR / (R + 9P), fragmentation penalty
  0.5 * (chunks / matches)^3, score = Fmean * (1 - penalty), best reference per image,
  averaged over images. Scores are lower than the jar's when synonyms would match.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

from refvlm_core.errors import InputError

_PUNCT_RE = re.compile(r"[^\w\s']|_")

Corpus = Mapping[str, str]               # image id -> predicted caption
References = Mapping[str, Sequence[str]]  # image id -> reference captions


def tokenize(text: str) -> list[str]:
    """"A dog, running." -> ["a", "dog", "running"]."""
    return _PUNCT_RE.sub(" ", text.lower()).split()


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check(hypotheses: Corpus, references: References) -> list[str]:
    if set(hypotheses) != set(references):
        missing = sorted(set(references) ^ set(hypotheses))[:5]
        raise InputError(f"predictions and references cover different images (e.g. {missing}); "
                         "give one prediction per image with references")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise InputError(f"image {key!r}: references must be a non-empty list of captions")
    return sorted(hypotheses)


# ---------------------------------------------------------------- BLEU

def bleu(hypotheses: Corpus, references: References, max_n: int = 4) -> float:
    """Corpus BLEU-n: clipped n-gram precisions summed over the corpus, geometric mean,
    brevity penalty with the reference length closest to each hypothesis."""
    keys = _check(hypotheses, references)
    if not keys:
        return 0.0
    matched, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for key in keys:
        hyp = tokenize(hypotheses[key])
        refs = [tokenize(r) for r in references[key]]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(hyp, n)
            best_ref: Counter[tuple[str, ...]] = Counter()
            for ref in refs:
                best_ref |= ngrams(ref, n)  # max count per n-gram over references
            matched[n - 1] += sum(min(c, best_ref[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    # The toolkit's smoothing constants: a zero precision gives ~0, not a log error.
    log_precision = sum(math.log((m + 1e-15) / (t + 1e-9)) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / max(hyp_len, 1e-9))
    return brevity * math.exp(log_precision)


# ---------------------------------------------------------------- CIDEr-D

def _tfidf(tokens: Sequence[str], n: int, df: Counter, log_images: float) -> tuple[dict, float]:
    """n-gram -> tf * idf, and the vector's norm."""
    vector = {g: c * max(0.0, log_images - math.log(max(1.0, df[g]))) for g, c in ngrams(tokens, n).items()}
    return vector, math.sqrt(sum(v * v for v in vector.values()))


def cider_d(hypotheses: Corpus, references: References, max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as in the COCO toolkit): per n, cosine of clipped
    tf-idf vectors times a Gaussian length penalty; mean over n and references, x10.
    Document frequencies come from the references of the evaluated set, so one image
    alone scores 0 (every n-gram has idf 0)."""
    keys = _check(hypotheses, references)
    if not keys:
        return 0.0
    refs = {k: [tokenize(r) for r in references[k]] for k in keys}
    df: list[Counter] = []
    for n in range(1, max_n + 1):
        counter: Counter = Counter()
        for k in keys:
            counter.update({g for r in refs[k] for g in ngrams(r, n)})
        df.append(counter)
    log_images = math.log(float(len(keys)))
    scores = []
    for k in keys:
        hyp = tokenize(hypotheses[k])
        per_ref = [_cider_pair(hyp, ref, df, log_images, sigma) for ref in refs[k]]
        scores.append(10.0 * sum(per_ref) / len(per_ref))
    return sum(scores) / len(scores)


def _cider_pair(hyp: list[str], ref: list[str], df: list[Counter], log_images: float, sigma: float) -> float:
    total = 0.0
    # The toolkit's length is the number of bigrams (len - 1), for both sides.
    delta = float(max(len(hyp) - 1, 0) - max(len(ref) - 1, 0))
    for n, counter in enumerate(df, start=1):
        vec_h, norm_h = _tfidf(hyp, n, counter, log_images)
        vec_r, norm_r = _tfidf(ref, n, counter, log_images)
        if norm_h == 0 or norm_r == 0:
            continue
        dot = sum(min(v, vec_r.get(g, 0.0)) * vec_r.get(g, 0.0) for g, v in vec_h.items())
        total += dot / (norm_h * norm_r) * math.exp(-(delta ** 2) / (2 * sigma ** 2))
    return total / len(df)


# ---------------------------------------------------------------- METEOR (exact match)

def _align(hyp: Sequence[str], ref: Sequence[str]) -> list[tuple[int, int]]:
    """Exact unigram alignment with the most matches; among those, each hypothesis
    word takes the free reference position that continues the previous chunk when it
    can, else the earliest free one (few chunks, as METEOR's aligner prefers)."""
    free: dict[str, list[int]] = {}
    for j, word in enumerate(ref):
        free.setdefault(word, []).append(j)
    pairs: list[tuple[int, int]] = []
    for i, word in enumerate(hyp):
        slots = free.get(word)
        if not slots:
            continue
        after = pairs[-1][1] + 1 if pairs and pairs[-1][0] == i - 1 else None
        j = after if after in slots else slots[0]
        slots.remove(j)
        pairs.append((i, j))
    return pairs


def _chunks(pairs: list[tuple[int, int]]) -> int:
    """Runs of adjacent hypothesis words aligned to adjacent reference words."""
    return sum(1 for k, (i, j) in enumerate(pairs)
               if k == 0 or not (i == pairs[k - 1][0] + 1 and j == pairs[k - 1][1] + 1))


def meteor_sentence(hypothesis: str, reference: str, alpha: float = 0.9, beta: float = 3.0,
                    gamma: float = 0.5) -> float:
    """Exact-match METEOR of one hypothesis against one reference (2005 parameters:
    Fmean = PR / (alpha P + (1 - alpha) R) = 10PR / (R + 9P), penalty gamma * frag^beta)."""
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    pairs = _align(hyp, ref)
    matches = len(pairs)
    if matches == 0:
        return 0.0
    precision, recall = matches / len(hyp), matches / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    penalty = gamma * (_chunks(pairs) / matches) ** beta
    return fmean * (1 - penalty)


def meteor(hypotheses: Corpus, references: References) -> float:
    """Mean over images of the best exact-match METEOR against any reference."""
    keys = _check(hypotheses, references)
    if not keys:
        return 0.0
    return sum(max(meteor_sentence(hypotheses[k], r) for r in references[k]) for k in keys) / len(keys)


def caption_metrics(hypotheses: Corpus, references: References) -> dict[str, float]:
    """{"CIDEr", "BLEU-4", "METEOR"} of a corpus (CIDEr x10 as in the toolkit; others in [0, 1])."""
    return {"CIDEr": cider_d(hypotheses, references), "BLEU-4": bleu(hypotheses, references),
            "METEOR": meteor(hypotheses, references)}
