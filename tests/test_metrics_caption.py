"""Caption metrics (BLEU-4, CIDEr-D, exact-match METEOR), VQA accuracy, POPE and the
valid TRP rate against hand-computed values."""
import math

import pytest

from refvlm_core.errors import InputError
from refvlm_training.evaluation.metrics import caption, pope, vqa
from refvlm_training.evaluation.metrics.trp_validity import valid_trp_rate


def test_tokenize_drops_punctuation_and_case():
    assert caption.tokenize("A dog, running.") == ["a", "dog", "running"]


def test_cider_d_two_perfect_two_word_captions_score_five():
    # "a" is in both images' references: idf 0. Unigram "cat"/"dog" and the bigram match
    # exactly (cosine 1); no 3- or 4-grams: (1 + 1 + 0 + 0) / 4 * 10 = 5.
    hyps = {"x": "a cat", "y": "a dog"}
    refs = {"x": ["a cat"], "y": ["a dog"]}
    assert caption.cider_d(hyps, refs) == pytest.approx(5.0)


def test_cider_d_length_penalty_and_wrong_caption():
    refs = {"x": ["a red cube"], "y": ["a blue cone"]}
    # "a red cube cube": unigram clipped dot = (2 idf^2 capped at idf) ... computed by hand:
    idf = math.log(2.0)
    # unigrams: hyp {a:0, red:idf, cube:2idf}, ref {a:0, red:idf, cube:idf}
    uni = (idf * idf + idf * idf) / (math.sqrt(idf ** 2 + 4 * idf ** 2) * math.sqrt(2 * idf ** 2))
    # bigrams: hyp {a red, red cube, cube cube}, ref {a red, red cube}: all idf
    bi = 2 / (math.sqrt(3) * math.sqrt(2))
    tri = 1 / (math.sqrt(2) * 1)   # hyp {a red cube, red cube cube}, ref {a red cube}
    penalty = math.exp(-1 / 72)     # 3 vs 2 bigrams, sigma 6
    expected_x = 10 * (uni + bi + tri) * penalty / 4
    hyps = {"x": "a red cube cube", "y": "nothing matches here"}
    assert caption.cider_d(hyps, refs) == pytest.approx(expected_x / 2)


def test_cider_single_image_is_zero_and_empty_corpus():
    assert caption.cider_d({"x": "a cat"}, {"x": ["a cat"]}) == 0.0
    assert caption.caption_metrics({}, {}) == {"CIDEr": 0.0, "BLEU-4": 0.0, "METEOR": 0.0}


def test_bleu_perfect_short_and_brevity():
    refs = {"x": ["the cat sat on the mat"]}
    assert caption.bleu({"x": "the cat sat on the mat"}, refs) == pytest.approx(1.0, abs=1e-9)
    # 4 of 6 words, all n-grams match: precisions 1, brevity exp(1 - 6/4).
    assert caption.bleu({"x": "the cat sat on"}, refs) == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)
    # No 4-gram in common -> ~0 (the toolkit's smoothing, not a log error).
    assert caption.bleu({"x": "cat the mat on"}, refs) < 1e-3


def test_meteor_exact_hand_cases():
    assert caption.meteor_sentence("the cat sat", "the cat sat") == pytest.approx(1 - 0.5 / 27)
    assert caption.meteor_sentence("cat the", "the cat") == pytest.approx(0.5)   # 2 chunks of 2 matches
    fmean = 10 * (2 / 3) * 0.5 / (0.5 + 9 * (2 / 3))
    assert caption.meteor_sentence("a b c", "a b d e") == pytest.approx(fmean * (1 - 0.5 * 0.5 ** 3))
    assert caption.meteor_sentence("x y", "a b") == 0.0
    # best reference per image, mean over images
    assert caption.meteor({"i": "a b c", "j": "x"}, {"i": ["zzz", "a b c"], "j": ["y"]}) == pytest.approx(
        (1 - 0.5 / 27) / 2)


def test_caption_inputs_checked():
    with pytest.raises(InputError, match="different images"):
        caption.bleu({"x": "a"}, {"y": ["a"]})
    with pytest.raises(InputError, match="non-empty list"):
        caption.meteor({"x": "a"}, {"x": "a"})


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_humans(matches, expected):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_normalisation_and_single_reference():
    assert vqa.normalize_answer("Two dogs.") == "2 dogs"
    assert vqa.normalize_answer("the Yes!") == "yes"
    assert vqa.normalize_answer("doesnt") == "doesn't"
    assert vqa.normalize_answer("3.5") == "3.5"             # decimal point kept
    assert vqa.normalize_answer("red,blue") == "red blue"   # comma between words splits
    assert vqa.vqa_accuracy("Matte rubber.", ["matte rubber"]) == 1.0
    assert vqa.vqa_accuracy("metal", ["matte rubber"]) == 0.0
    assert vqa.vqa_metrics(["yes", "no"], [["yes"], ["yes"]]) == {"accuracy": 0.5}
    with pytest.raises(InputError):
        vqa.vqa_accuracy("yes", "yes")


def test_pope_hand_counts():
    preds = ["Yes, there is.", "No.", "There is not a dog.", "yes", "No", "Yes"]
    labels = ["yes", "yes", "no", "no", "no", "yes"]
    # read as: yes no no yes no yes -> tp 2, fp 1, fn 1, tn 2
    out = pope.pope_metrics(preds, labels)
    assert out == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                 "yes_ratio": 3 / 6})
    assert pope.pope_metrics(["no"], ["no"]) == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                 "yes_ratio": 0.0}
    with pytest.raises(InputError, match="'yes' or 'no'"):
        pope.pope_metrics(["yes"], ["maybe"])


def test_valid_trp_rate():
    good = "<Phrase>cube</Phrase> (<Unit>box</Unit>[0]<REF>)"
    assert valid_trp_rate([good, "plain text", "<Phrase>cube (<Unit>box</Unit>[0]<REF>"]) == pytest.approx(2 / 3)
    assert valid_trp_rate([]) == 0.0
