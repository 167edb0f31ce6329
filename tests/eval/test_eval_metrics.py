"""Each metric against cases worked by hand from the benchmark's official definition."""

from __future__ import annotations

import math
import shutil

import pytest

from stitch.eval import metrics as m

# ---------------------------------------------------------------------------------------------- VQA accuracy

TEN = 10


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),  # number word -> digit, lower-case
        ("The dog", "dog"),  # article dropped
        ("an apple", "apple"),
        ("dont", "don't"),  # contraction regains its apostrophe
        ("black-and-white", "black and white"),  # mark inside a word -> space
        ("yes.", "yes"),  # period not followed by a digit goes
        ("3.5", "3.5"),  # decimal point stays
        ("1,000", "1000"),  # comma dropped
        ("Yes!", "yes"),
        ("what?", "what"),
        ("man's hat", "man 's hat"),  # the EvalAI processor splits "'s"
        ("none", "0"),
        ("  red\tcar\n", "red car"),
        ("a", ""),  # an answer of only an article normalises to nothing
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert m.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("2", ["2"] * TEN, 1.0),
        ("two", ["2"] * TEN, 1.0),  # number words
        ("Two.", ["2"] * TEN, 1.0),  # case and final period
        ("yes", ["yes"] + ["no"] * 9, 0.3),  # 1 human: 9 subsets give 1/3, 1 gives 0 -> 3/10
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),  # every subset keeps >= 3 matches
        ("maybe", ["yes"] * 5 + ["no"] * 5, 0.0),
        ("the dog", ["dog"] * TEN, 1.0),  # articles
        ("dont", ["don't"] * TEN, 1.0),  # contractions
        ("black-and-white", ["black and white"] * TEN, 1.0),  # punctuation inside a word
        ("1,000", ["1000"] * TEN, 1.0),
        ("", ["yes"] * TEN, 0.0),  # empty prediction is wrong
        ("a", ["a"] * TEN, 0.0),  # normalises to empty: wrong
        ("Yes", ["Yes"], 1.0),  # a single reference: plain agreement
    ],
)
def test_vqa_accuracy(prediction, answers, expected):
    assert m.vqa_accuracy(prediction, answers) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------- ANLS


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Hello", ["hello"], 1.0),  # case-insensitive
        ("hello wrld", ["hello world"], 1 - 1 / 11),  # one deletion over 11 characters
        ("  hello   world ", ["hello world"], 1.0),  # whitespace collapsed
        ("abc", ["xyz"], 0.0),
        ("ab", ["ac"], 0.5),  # similarity exactly 0.5 is kept (the script drops only < 0.5)
        ("abc", ["axy"], 0.0),  # 1/3 < 0.5 -> 0
        ("1990", ["1989", "1990"], 1.0),  # best answer counts
        ("", ["42"], 0.0),  # empty prediction
        ("the answer is 42", ["42"], 0.0),  # 14 edits over 16 characters
        ("$ 100", ["$100"], 0.8),  # 1 edit over 5
        ("café", ["cafe"], 0.75),
        ("anything", [], 0.0),
    ],
)
def test_anls(prediction, answers, expected):
    assert m.anls(prediction, answers) == pytest.approx(expected)


def test_levenshtein():
    assert m.levenshtein("kitten", "sitting") == 3
    assert m.levenshtein("", "abc") == 3
    assert m.levenshtein("abc", "abc") == 0


# --------------------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "prediction, target, expected",
    [
        ("12", "12", 1.0),
        ("12.5", "12", 1.0),  # 4.2% off
        ("12.7", "12", 0.0),  # 5.8% off
        ("10.5", "10", 1.0),  # exactly 5%: inclusive
        ("-5", "-5.2", 1.0),  # negatives: 0.2 / 5.2 = 3.8%
        ("5", "-5", 0.0),  # the sign matters
        ("\u22123", "-3", 1.0),  # Unicode minus sign
        ("45%", "45", 1.0),  # percent sign optional
        ("0.45", "45%", 1.0),  # ChartQA reads 45% as 0.45
        ("45%", "0.45", 1.0),
        ("1,234", "1234", 1.0),  # thousands separator
        ("0", "0", 1.0),  # target 0: exact only
        ("0.01", "0", 0.0),
        ("Yes", "yes", 1.0),  # text: case-insensitive exact match
        ("yes.", "yes", 0.0),  # ... and otherwise exact
        ("", "12", 0.0),  # empty prediction
        ("twelve", "12", 0.0),
        (" 12 \n", "12", 1.0),
    ],
)
def test_relaxed_accuracy(prediction, target, expected):
    assert m.relaxed_accuracy(prediction, target) == expected


# ---------------------------------------------------------------------------------------- multiple choice

OPTIONS = ["red fox", "blue whale", "green frog", "grey wolf"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),  # trailing punctuation stripped
        ("The answer is C.", "C"),
        ("Answer: D", "D"),
        ("A and B", "B"),  # several letters: the last mentioned wins
        ("(A) or maybe (C)", "C"),  # bracketed letters take priority and the last wins
        ("(B) blue whale", "B"),
        ("I think it must be the blue whale in the ocean", "B"),  # > 5 words: option text
        ("blue whale", None),  # option text in <= 5 words is not read (MMMU's rule)
        ("b", None),  # letters are case-sensitive
        ("E", None),  # not an option
        ("", None),
        ("I really have no idea about this one", None),  # never a random guess
    ],
)
def test_parse_multi_choice_response(response, expected):
    assert m.parse_multi_choice_response(response, OPTIONS) == expected


def test_parse_multi_choice_last_text_mention_wins():
    assert m.parse_multi_choice_response("the dog chased the cat away today", ["cat", "dog"]) == "A"
    assert m.parse_multi_choice_response("B", {"A": "x", "B": "y"}) == "B"  # mapping form


def test_multiple_choice_accuracy():
    assert m.multiple_choice_accuracy("B", "B", OPTIONS) == (1.0, "B")
    assert m.multiple_choice_accuracy("(C)", "B", OPTIONS) == (0.0, "C")
    assert m.multiple_choice_accuracy("unsure", "B", OPTIONS) == (0.0, None)
    assert m.multiple_choice_accuracy("  ", "B", OPTIONS) == (0.0, None)


@pytest.mark.parametrize(
    "response, answers, expected",
    [
        ("The answer is 42.", "42", True),
        ("3.14159", "3.14", True),  # numbers compared at 2 decimals
        ("1,000", "1000", True),
        ("Paris", "paris", True),
        ("x", "x", True),  # one-character answers are padded on both sides
        ("3.429", ["24/7", "3.429"], True),  # a list of accepted answers
        ("So it is 5 meters", "6", False),
        ("the capital is Paris", "paris", True),  # text after the key phrase "is"
        ("", "5", False),
        ("-2", "-2", True),
        ("therefore x = 7", "7", True),
    ],
)
def test_mmmu_open(response, answers, expected):
    assert m.open_answer_correct(answers, m.parse_open_response(response)) is expected


# ---------------------------------------------------------------------------------------------- MathVista

ANGLES = ["145°", "155°", "165°", "175°"]


@pytest.mark.parametrize(
    "response, qtype, atype, choices, precision, expected",
    [
        ("145°", "multi_choice", "text", ANGLES, None, "145°"),  # the option text itself
        ("A", "multi_choice", "text", ANGLES, None, "145°"),  # a letter -> its option
        ("(B)", "multi_choice", "text", ANGLES, None, "155°"),
        ("The answer is C", "multi_choice", "text", ANGLES, None, "165°"),
        ("none of them", "multi_choice", "text", ANGLES, None, None),  # no nearest-option guess
        ("12", "free_form", "integer", None, None, "12"),
        ("The answer is 12.", "free_form", "integer", None, None, "12"),  # last number
        ("12.7", "free_form", "integer", None, None, "12"),  # str(int(float)) truncates
        ("-3", "free_form", "integer", None, None, "-3"),
        ("1,200", "free_form", "integer", None, None, "1200"),
        ("no idea", "free_form", "integer", None, None, None),
        ("3.14159", "free_form", "float", None, 2, "3.14"),
        ("about 0.5 m", "free_form", "float", None, 1, "0.5"),
        ("[1, 2, 3]", "free_form", "list", None, None, "[1,2,3]"),
        ("", "free_form", "integer", None, None, None),
    ],
)
def test_mathvista_extract(response, qtype, atype, choices, precision, expected):
    assert m.mathvista_extract(response, qtype, atype, choices, precision) == expected


def test_mathvista_correct():
    assert m.mathvista_correct("12", "12", "integer")
    assert not m.mathvista_correct("13", "12", "integer")
    assert not m.mathvista_correct(None, "12", "integer")
    assert m.mathvista_correct("[1,2,3]", "[1, 2, 3]", "list")


# ----------------------------------------------------------------------------------------------- OCRBench


@pytest.mark.parametrize(
    "prediction, answers, dataset, expected",
    [
        ("The text reads CHINA", ["china"], "IIIT5K", 1.0),  # substring, case-insensitive
        ("chin", ["china"], "IIIT5K", 0.0),
        ("123", ["12"], "IIIT5K", 1.0),  # substring rule, as official
        ("X", ["x"], "IIIT5K", 1.0),
        ("hello\nworld", ["hello world"], "FUNSD", 1.0),  # newlines become spaces
        ("b2", ["a1", "b2"], "FUNSD", 1.0),  # any answer
        ("x ^ { 2 }", ["x^{2}"], "HME100k", 1.0),  # handwritten maths: spaces removed
        ("X^{2}", ["x^{2}"], "HME100k", 0.0),  # ... and case kept
        ("", ["china"], "IIIT5K", 0.0),  # empty prediction
        ("anything", [""], "IIIT5K", 0.0),  # an empty answer never matches
        ("Total: 5", "total: 5", "SROIE", 1.0),  # a single string answer
    ],
)
def test_ocrbench_match(prediction, answers, dataset, expected):
    assert m.ocrbench_match(prediction, answers, dataset) == expected


# -------------------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Yes", "yes", 1.0),
        ("yes.", "yes", 1.0),  # final period
        (" circle ", "circle", 1.0),
        ("No.", ["no"], 1.0),
        ("A", "a", 1.0),
        ("circles", "circle", 0.0),
        ("red shape", "red", 0.0),
        ("(A)", "A", 0.0),
        ("", "yes", 0.0),
        ("blue", ["teal", "blue"], 1.0),
    ],
)
def test_exact_match(prediction, answers, expected):
    assert m.exact_match(prediction, answers) == expected


# -------------------------------------------------------------------------------------------------- CIDEr


def _cider(preds, refs, tokenizer="simple"):
    pytest.importorskip("pycocoevalcap")
    return m.cider(preds, refs, tokenizer)


def test_cider_perfect_three_words():
    # Two images with disjoint words: every n-gram has df 1, idf log 2. A caption equal to its only
    # reference has cosine 1 for 1-, 2- and 3-grams and 0 for 4-grams: 10 * 3/4 = 7.5.
    score, per, _ = _cider({"1": "a cat sat", "2": "dog runs fast"}, {"1": ["a cat sat"], "2": ["dog runs fast"]})
    assert per == {"1": pytest.approx(7.5), "2": pytest.approx(7.5)}
    assert score == pytest.approx(7.5)


def test_cider_perfect_four_words_is_ten():
    _, per, _ = _cider({"1": "a b c d", "2": "e f g h"}, {"1": ["a b c d"], "2": ["e f g h"]})
    assert per["1"] == pytest.approx(10.0)


def test_cider_partial_overlap_with_length_penalty():
    # unigrams 3 of 4: cos = 3 / (sqrt3 * 2); bigrams 2 of 3: 2 / (sqrt2 * sqrt3); trigrams 1 of 2:
    # 1 / sqrt2; no 4-grams. Length (counted in bigrams) differs by 1: penalty exp(-1 / (2 * 6^2)).
    _, per, _ = _cider({"1": "a cat sat", "2": "x"}, {"1": ["a cat sat down"], "2": ["dog runs very fast"]})
    expected = 10 * (math.sqrt(3) / 2 + math.sqrt(2 / 3) + math.sqrt(1 / 2)) / 4 * math.exp(-1 / 72)
    assert per["1"] == pytest.approx(expected)


def test_cider_clips_repeated_words():
    # "cat" x3 against one "cat": min(3w, w) * w / (3w * sqrt3 w) = 1 / (3 sqrt3) for unigrams, 0 above.
    _, per, _ = _cider({"1": "cat cat cat", "2": "x"}, {"1": ["a cat sat"], "2": ["dog runs fast"]})
    assert per["1"] == pytest.approx(10 / (3 * math.sqrt(3)) / 4)


def test_cider_averages_over_references():
    # Perfect against one of two references: (1 + 0) / 2 per n-gram order -> 10 * (0.5 * 3 / 4) = 3.75.
    _, per, _ = _cider(
        {"1": "a cat sat", "2": "big red bus"}, {"1": ["a cat sat", "the dog ran"], "2": ["big red bus"]}
    )
    assert per["1"] == pytest.approx(3.75)


def test_cider_common_words_weigh_nothing():
    # "a" is in every image's references: idf 0. "cat" and "a cat" still match: 10 * (1 + 1 + 0 + 0) / 4.
    score, per, _ = _cider({"1": "a cat"}, {"1": ["a cat"], "2": ["a dog"]})
    assert per == {"1": pytest.approx(5.0), "2": 0.0}  # image 2 has no prediction: 0
    assert score == pytest.approx(2.5)  # the corpus mean counts it


def test_cider_empty_and_wrong_captions_score_zero():
    _, per, _ = _cider({"1": "", "2": "zzz yyy"}, {"1": ["a cat sat"], "2": ["dog runs fast"]})
    assert per == {"1": 0.0, "2": 0.0}


def test_cider_single_image_corpus_is_zero():
    # With one image every n-gram has df = N = 1, so idf = log 1 - log 1 = 0 everywhere.
    score, _, _ = _cider({"1": "a cat sat"}, {"1": ["a cat sat"]})
    assert score == 0.0


def test_cider_tokenizer_lowercases_and_drops_punctuation():
    _, per, _ = _cider({"1": "A cat, sat.", "2": "Dog runs fast!"}, {"1": ["a cat sat"], "2": ["dog runs fast"]})
    assert per["1"] == pytest.approx(7.5) and per["2"] == pytest.approx(7.5)


def test_cider_corpus_is_mean_of_images():
    score, per, _ = _cider({"1": "a cat sat", "2": "dog"}, {"1": ["a cat sat"], "2": ["dog runs fast"]})
    assert score == pytest.approx(sum(per.values()) / 2)


def test_simple_caption_tokenize():
    assert m.simple_caption_tokenize("A man's dog -- running (fast)!") == "a man 's dog running fast"
    assert m.simple_caption_tokenize("Don't stop.") == "do n't stop"


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs java")
def test_cider_official_ptb_tokenizer():
    pytest.importorskip("pycocoevalcap")
    if not m._writable_package_dir():
        pytest.skip("pycocoevalcap's folder is not writable")
    _, per, used = m.cider(
        {"1": "A cat, sat.", "2": "dog runs fast"}, {"1": ["a cat sat"], "2": ["dog runs fast"]}, "ptb"
    )
    assert used == "ptb"
    assert per["1"] == pytest.approx(7.5)


def test_cider_missing_package_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(m.StitchError, match="pip install pycocoevalcap"):
        m.cider({"1": "a"}, {"1": ["a"]})
