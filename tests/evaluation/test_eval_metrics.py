"""VQA accuracy (official normalisation) and CIDEr-D against known values."""

import math

import pytest

from mm1_megatron.evaluation.metrics import (
    cider_d,
    normalize_answer,
    process_punctuation,
    ptb_tokenize,
    vqa_accuracy,
    vqa_score,
)


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"),  # number words -> digits, lower-case
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("The dog", "dog"),  # articles dropped
    ("a red and an apple", "red and apple"),
    ("dont", "don't"),  # contractions restored
    ("isnt it", "isn't it"),
    ("yes.", "yes"),  # a period not followed by a digit is removed
    ("3.5", "3.5"),  # ... a decimal point stays
    ("hot-dog", "hot dog"),  # punctuation inside a word becomes a space
    ("hot - dog", "hot dog"),  # ... and is removed when it stands apart
    ("1,000", "1000"),  # digit,digit: every listed punctuation mark is removed
    ("yes!", "yes"),
    ("  left\tside\n", "left side"),
])
def test_vqa_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_process_punctuation_rules():
    assert process_punctuation("a/b") == "a b"
    assert process_punctuation("a / b") == "a  b"
    assert process_punctuation("(yes)") == " yes "


def test_vqa_accuracy_leave_one_out():
    # k humans said it: each of the 10 leave-one-out subsets scores min(matches / 3, 1).
    def answers(k):
        return ["cat"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_accuracy("cat", answers(0)) == 0.0
    # k=1: 9 subsets keep the match (1/3), 1 subset drops it (0) -> 0.3
    assert vqa_accuracy("cat", answers(1)) == pytest.approx(0.3)
    # k=2: 8 subsets hold 2 (2/3), 2 hold 1 (1/3) -> (8*2/3 + 2/3)/10 = 0.6
    assert vqa_accuracy("cat", answers(2)) == pytest.approx(0.6)
    # k=3: 7 subsets hold 3 (1), 3 hold 2 (2/3) -> (7 + 2)/10 = 0.9
    assert vqa_accuracy("cat", answers(3)) == pytest.approx(0.9)
    assert vqa_accuracy("cat", answers(4)) == 1.0
    assert vqa_accuracy("cat", ["cat"] * 10) == 1.0


def test_vqa_accuracy_normalises_like_the_official_script():
    mixed = ["2"] * 5 + ["two"] * 3 + ["3"] * 2  # answers differ -> normalised
    assert vqa_accuracy("Two.", mixed) == 1.0
    assert vqa_accuracy("the 3", mixed) == pytest.approx(0.6)
    # All ten identical: the official script compares without normalisation (lower-cased).
    assert vqa_accuracy("YES", ["yes"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_score(["Two.", "YES"], [mixed, ["yes"] * 10]) == pytest.approx(100.0)


def test_ptb_tokenize_approximation():
    assert ptb_tokenize("A man's dog doesn't like the (red) ball... well-known, 3.5 km!") == [
        "a", "man", "'s", "dog", "does", "n't", "like", "the", "red", "ball", "well-known",
        "3.5", "km"]


def test_cider_d_hand_derived():
    # Two images, one reference each. "a" occurs in both reference sets: idf log(2/2) = 0.
    # An exact 2-word match has cosine 1 for n=1 ("cat", idf log 2) and n=2 ("a cat"),
    # 0 for n=3, 4 (no such n-grams); equal lengths -> no penalty: mean (1+1+0+0)/4 x 10 = 5.
    refs = {"A": ["a cat"], "B": ["a dog"]}
    score, per = cider_d({"A": "a cat", "B": "a dog"}, refs)
    assert per == {"A": pytest.approx(5.0), "B": pytest.approx(5.0)}
    assert score == pytest.approx(5.0)
    # "a cat" for B shares only "a" (weight 0) with "a dog": 0. Corpus: (5 + 0) / 2.
    score, per = cider_d({"A": "a cat", "B": "a cat"}, refs)
    assert per["B"] == 0.0 and score == pytest.approx(2.5)
    # Length penalty: hypothesis "a cat cat" (2 bigrams) against "a cat" (1 bigram).
    # n=1: hyp {a: 0, cat: 2 log2}, ref {cat: log2}: min(2l, l) * l / (2l * l) = 1/2.
    # n=2: hyp {"a cat": l, "cat cat": l} vs {"a cat": l}: l*l / (sqrt(2) l * l) = 1/sqrt(2).
    # penalty exp(-1 / 72). Score = 10 * (1/2 + 1/sqrt(2)) / 4 * exp(-1/72).
    _, per = cider_d({"A": "a cat cat", "B": "a dog"}, refs)
    assert per["A"] == pytest.approx(10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72))


# Computed with pycocoevalcap 1.2 (pycocoevalcap.cider.cider.Cider().compute_score) on these
# pre-tokenized captions.
PYCOCO_RES = {"1": "a cat sits on a mat", "2": "a dog runs in the park",
              "3": "two people ride bikes"}
PYCOCO_GTS = {"1": ["a cat is sitting on the mat", "the cat sat on a mat"],
              "2": ["a dog running through a park", "dog plays in park",
                    "a brown dog in the grass"],
              "3": ["two men riding bicycles", "people on bikes on a street"]}
PYCOCO_SCORE = 1.7172286156010614
PYCOCO_PER_IMAGE = {"1": 2.45627316, "2": 1.75487815, "3": 0.94053453}


def test_cider_d_matches_pycocoevalcap_values():
    score, per = cider_d(PYCOCO_RES, PYCOCO_GTS, tokenize=False)
    assert score == pytest.approx(PYCOCO_SCORE, abs=1e-9)
    assert per == {k: pytest.approx(v, abs=1e-7) for k, v in PYCOCO_PER_IMAGE.items()}


def test_cider_d_against_pycocoevalcap_when_installed():
    from pycocoevalcap.cider import cider  # the test extra installs it
    import random

    rng = random.Random(0)
    words = "a the cat dog sits on mat park red blue runs in of".split()
    for _ in range(10):
        n = rng.randint(2, 6)
        res = {str(i): " ".join(rng.choices(words, k=rng.randint(1, 9))) for i in range(n)}
        gts = {str(i): [" ".join(rng.choices(words, k=rng.randint(1, 9)))
                        for _ in range(rng.randint(1, 5))] for i in range(n)}
        want, _ = cider.Cider().compute_score(gts, {k: [v] for k, v in res.items()})
        got, _ = cider_d(res, gts, tokenize=False)
        assert got == pytest.approx(float(want), abs=1e-9)


def test_choice_letter_reads_the_answers_llava_style():
    from mm1_megatron.evaluation.metrics import choice_letter

    options = ["red", "blue", "green"]
    picks = {"B": "B", "(A)": "A", "C. green": "C", "B) blue": "B", "The answer is C.": "C",
             "blue": "B", "Green.": "C", "A cat": None, "red or blue": None, "D": None,
             "I think so": None}
    assert {text: choice_letter(text, options) for text in picks} == picks
    assert choice_letter("A cat", ["dog", "cat"]) == "B"  # the article is not option A


def test_yes_no_scores_by_hand():
    from mm1_megatron.evaluation.metrics import yes_no, yes_no_scores

    assert [yes_no(t) for t in ("Yes, there is.", "no", "There is no dog.", "maybe", "")] == \
        ["yes", "no", "no", None, None]
    # said yes, no, yes, (unparsable: no), yes against yes, yes, no, no, yes:
    # tp 2, fp 1, fn 1, tn 1 -> accuracy 3/5, precision 2/3, recall 2/3, F1 2/3, yes 3/5
    got = yes_no_scores(["yes", "no", "yes", "perhaps", "Yes."],
                        ["yes", "yes", "no", "no", "yes"])
    assert got == pytest.approx({"accuracy": 60.0, "precision": 200 / 3, "recall": 200 / 3,
                                 "f1": 200 / 3, "yes_ratio": 60.0})
