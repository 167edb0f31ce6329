"""Headline metrics by the reference rules (lmms-eval 0.7.3, itself taken from each benchmark's official script),
quirks included, so that a Stitch score can be put beside a published one.

Published numbers are computed by these rules, not by a cleaner reading of them, so the headline keeps every
quirk of the reference code (each one is named in docs/eval.md and at the line that keeps it). Stitch's own
stricter or more lenient readings live in `stitch.eval.metrics` and are reported beside the headline under their
own key (`readings` in the summary), never in its place.

One step of the reference is not reproducible as written: MMMU picks `random.choice` from the global random state
when it cannot read an answer. Stitch guesses too (so that the expected score is the same) but with a generator
seeded by a fixed seed and the sample id, so a run reproduces and a sample's guess does not depend on its order.
MathVista's reference asks an LLM judge to extract the answer when its rules fail; without a judge (no network,
no key) its code falls back to an empty extraction, and that is what is scored here.

Every function scores one raw prediction (not stripped or cleaned by the caller) against raw references.
"""

from __future__ import annotations

import random
import re
import statistics
import string
from collections.abc import Mapping, Sequence

from stitch.eval.metrics import _CONTRACTIONS, _NUMBER_WORDS, _VQA_PUNCT, extract_numbers, levenshtein

REFERENCE = "lmms-eval 0.7.3"
# The fixed seed of MMMU's random-option fallback (see `mmmu_multiple_choice`).
MMMU_FALLBACK_SEED = 0

# ---------------------------------------------------------------------------------------------------------
# VQA accuracy: the EvalAI answer processor as lmms-eval ships it (`_task_utils/vqa_eval_metric.py`).
# ---------------------------------------------------------------------------------------------------------

_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# "(?!<=\d)" is a look-ahead for the text "<=d", so every period not followed by a digit goes.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_ARTICLES = ("a", "an", "the")


def _process_punctuation(text: str) -> str:
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or delete_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # Quirk: the reference passes re.UNICODE (32) as `count`, so at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, 32)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def evalai_process(text: str) -> str:
    """The full EvalAI processor (`__call__`): lower-case, "," and "?" dropped, "'s" split off, then the
    punctuation and digit/article steps. TextVQA's scorer applies it to the prediction and every answer."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqav2_process(text: str) -> str:
    """VQAv2's scorer skips the tokenising step: newlines/tabs to spaces and strip, then punctuation and
    digit/article steps (so "a,b" becomes "a b" here but "ab" under `evalai_process`)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _leave_one_out(prediction: str, answers: list[str]) -> float:
    """min(1, matches among the other answers / 3), averaged (with `statistics.mean`, as the reference) over
    the answers held out in turn. Quirk kept: an empty prediction matches empty human answers."""
    accs = []
    for i in range(len(answers)):
        matching = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        accs.append(min(1, float(matching) / 3))
    return statistics.mean(accs) if accs else 0.0


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 (lmms-eval `vqav2_process_results`): both sides through `vqav2_process`."""
    return _leave_one_out(vqav2_process(prediction), [vqav2_process(a) for a in answers])


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA (lmms-eval `textvqa_process_results`): both sides through `evalai_process`."""
    return _leave_one_out(evalai_process(prediction), [evalai_process(a) for a in answers])


# ---------------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA): lmms-eval `api/metrics.py: anls`
# ---------------------------------------------------------------------------------------------------------


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """1 - min over answers of edit distance / length, 0 when below `threshold`.

    Quirks kept: the distance is between lower-cased, whitespace-collapsed strings, but the length is that of
    the *raw* strings (upper-cased: "ß" counts 2), so surrounding or doubled spaces raise the score; an empty
    answer and an empty prediction give length 0 and count as a perfect match.
    """
    if not answers:
        return 0.0
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(levenshtein(gt, det)) / float(length))
    result = 1 - min(values)
    return 0 if result < threshold else result


# ---------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy: lmms-eval `chartqa/utils.py: relaxed_correctness` (from Qwen-VL's evaluator)
# ---------------------------------------------------------------------------------------------------------


def _chart_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """Numbers within 5% relative change of the target, else case-insensitive exact match.

    Quirks kept: `float()` parses the raw text (surrounding whitespace, "1_000", "1e3", "inf" and "nan" are
    numbers; "1,000" is not); "45%" means 0.45 on either side (so "45%" does not match "45"); a target equal
    to 0 is falsy and needs the exact string; nothing is stripped before the string comparison.
    """
    pred, tgt = _chart_float(prediction), _chart_float(target)
    if pred is not None and tgt:
        return abs(pred - tgt) / abs(tgt) <= max_relative_change
    return prediction.lower() == target.lower()


# ---------------------------------------------------------------------------------------------------------
# MMMU: lmms-eval `_task_utils/mmmu_mcq_utils.py` and `mmmu/utils.py`
# ---------------------------------------------------------------------------------------------------------


def mmmu_candidates(response: str, index2ans: Mapping[str, str]) -> tuple[list[str], bool, bool]:
    """The option letters MMMU's parser finds in `response`: (candidates, matched by letter, with brackets)."""
    all_choices = list(index2ans)
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    candidates = [c for c in all_choices if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        # Quirk: "{c} " (no space before), so a word ending in an option letter counts ("THE A" finds E).
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    by_letter = True
    if not candidates and len(response.split()) > 5:
        candidates = [i for i, ans in index2ans.items() if ans.lower() in response.lower()]
        by_letter = not candidates
    return candidates, by_letter, bracketed


def mmmu_multiple_choice(response: str, choices: Sequence[str], sample_id: str,
                         seed: int = MMMU_FALLBACK_SEED) -> tuple[str, bool]:
    """The letter MMMU's parser picks: (letter, guessed). With nothing to read, the reference picks a random
    option; here the guess comes from `random.Random(f"{seed}:{sample_id}")`, fixed per sample.

    Several candidates: the one whose last mention starts latest wins (`np.argmax`, so ties go to the earlier
    letter). Quirk kept: a candidate found by "{c} " or "{c}." is located by " {c} ", which may be absent (-1).
    """
    index2ans = {chr(ord("A") + i): str(c) for i, c in enumerate(choices)}
    candidates, by_letter, bracketed = mmmu_candidates(response, index2ans)
    if not candidates:
        return random.Random(f"{seed}:{sample_id}").choice(list(index2ans)), True
    if len(candidates) == 1:
        return candidates[0], False
    stripped = response
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        stripped = stripped.strip(char)
    padded = " " + stripped + " "
    if by_letter:
        starts = [padded.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    else:
        starts = [padded.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))], False


def _mmmu_normalize(text: str) -> list[str | float]:
    text = text.strip()
    try:
        float(text.replace(",", ""))
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]
    return [round(float(text.replace(",", "")), 2)]


def mmmu_parse_open(response: str) -> list[str | float]:
    """MMMU's `parse_open_response`: the tails after key phrases and the numbers in them, normalised.
    (The reference dedupes through a set, which only reorders; order does not change the verdict.)"""
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys: list[str] = []
    for index, sentence in enumerate(sentences):
        if index == len(sentences) - 1:
            indicators.append("=")
        shortest: str | None = None
        for mark in indicators:
            if mark in sentence:
                tail = sentence.split(mark)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    if not keys:
        keys = [text]
    preds: list[str] = list(keys)
    for key in keys:
        preds.extend(extract_numbers(key))
    out: list[str | float] = []
    for p in preds:
        out.extend(_mmmu_normalize(p))
    return list(dict.fromkeys(out))


def mmmu_open_correct(answer: str | Sequence[str], candidates: Sequence[str | float]) -> bool:
    """MMMU's `eval_open`: a float candidate equal to a float answer, or a string answer inside a string one."""
    golds: list[str | float] = []
    for a in [answer] if isinstance(answer, str) else answer:
        golds.extend(_mmmu_normalize(a))
    for cand in candidates:
        if isinstance(cand, str):
            if any(isinstance(g, str) and g in cand for g in golds):
                return True
        elif cand in golds:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# MathVista: lmms-eval `mathvista/mathvista_evals.py` without its LLM judge
# ---------------------------------------------------------------------------------------------------------


def mathvista_extract(response: str, question_type: str, answer_type: str, choices: Sequence[str]) -> str:
    """`extract_answer` with `quick_extract` off and no judge: the response itself when it is an option or
    parses as the answer type, else "" (what the reference returns when the judge call fails)."""
    response = response.strip()  # `mathvista_process_results` strips first
    if not response:
        return ""
    if question_type == "multi_choice" and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    return ""


def mathvista_normalize(extraction: str, choices: Sequence[str], question_type: str, answer_type: str,
                        precision: int) -> str | None:
    """`normalize_extracted_answer`. Quirk kept: for multiple choice, anything that is not a letter is replaced
    by the option nearest in edit distance (so an unreadable answer still picks an option, the first of the
    shortest ones for an empty extraction)."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return str(choices[options.index(extraction)])
        distances = [levenshtein(extraction, str(c)) for c in choices]
        return str(choices[distances.index(min(distances))]) if choices else None
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except (ValueError, OverflowError):
        return None
    return str(extraction)


def mathvista_correct(response: str, answer: str, question_type: str, answer_type: str,
                      choices: Sequence[str] | None, precision: int | None) -> tuple[bool, str | None, str]:
    """(right?, the normalised prediction, the raw extraction), by `safe_equal`: equal after `str().strip()`
    on both sides."""
    opts = [str(c) for c in choices or []]
    extraction = mathvista_extract(response, question_type, answer_type, opts)
    prediction = mathvista_normalize(extraction, opts, question_type, answer_type, int(precision or 0))
    return str(prediction).strip() == str(answer).strip(), prediction, extraction


# ---------------------------------------------------------------------------------------------------------
# OCRBench: lmms-eval `ocrbench/utils.py`
# ---------------------------------------------------------------------------------------------------------


def fold_fullwidth(text: str) -> str:
    """Fullwidth ASCII (U+FF01-U+FF5E) to ASCII and the ideographic space to a space, nothing else."""
    return "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if ord(c) == 0x3000 else c for c in text
    )


def ocrbench_match(prediction: str, answers: Sequence[str] | str, dataset_name: str = "") -> int:
    """1 when an answer is a substring of the stripped prediction: for HME100k with all spaces removed and
    case kept, otherwise full-width folded, lower-cased and trimmed. Quirk kept: an empty answer matches any
    prediction."""
    pred = prediction.strip()
    for answer in [answers] if isinstance(answers, str) else answers:
        if dataset_name == "HME100k":
            a = answer.strip().replace("\n", " ").replace(" ", "")
            p = pred.strip().replace("\n", " ").replace(" ", "")
        else:
            a = fold_fullwidth(answer).lower().strip().replace("\n", " ")
            p = fold_fullwidth(pred).lower().strip().replace("\n", " ")
        if a in p:
            return 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# Exact match with lmms-eval's `exact_match` options (AI2D's letter filter)
# ---------------------------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def ai2d_read(response: str) -> str:
    """AI2D's filter then `exact_match`'s normalisation: the letter of a response starting "B." (else the whole
    response), lower-cased with ASCII punctuation removed (whitespace kept, so "B " is not "b")."""
    m = re.match(r"^\s*([A-Z])\.", response)
    pred = m.group(1) if m else response
    return pred.lower().translate(_PUNCT_TABLE)


def ai2d_correct(response: str, letter: str) -> bool:
    """AI2D (lmms-eval `ai2d.yaml`): the read response equals the correct letter, both normalised alike."""
    return ai2d_read(response) == letter.lower().translate(_PUNCT_TABLE)
