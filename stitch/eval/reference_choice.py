"""Answer reading and aggregation for the multiple-choice and yes/no benchmarks (MMBench, MMStar, POPE,
SEED-Bench, ScienceQA-IMG) by the reference rules (lmms-eval 0.7.3), quirks included; see `stitch.eval.reference`
for why the headline follows the reference code rather than a cleaner reading."""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Mapping, Sequence

_DEFAULT_CHOICES = ["A", "B", "C", "D", "E", "F", "G", "H"]
_ANSWER_PHRASES = [
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
]  # fmt: skip
_FORMAT_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                    "right_paren": 3, "space": 2, "fallback": 0}  # fmt: skip


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """lmms-eval `_task_utils/mcq_extract.py`: the letter a response gives, "" when none.

    Candidates in several formats ("(B)", "B.", "B:", "B)", "B ", after an answer phrase, a standalone letter
    at the start or end, else any occurrence); the highest-priority format wins, then the latest position.
    Quirks kept: "B." and "B " also match inside words ("THE B" has "E "), and the fallback takes any capital.
    """
    if not response or not response.strip():
        return ""
    all_choices = list(choices or _DEFAULT_CHOICES)
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "
    candidates: list[tuple[str, int, str]] = []
    for fmt, name in (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"),
                      ("{} ", "space")):  # fmt: skip
        for ch in all_choices:
            if fmt.format(ch) in text:
                candidates.append((ch, text.rfind(fmt.format(ch)), name))
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = lower.find(phrase)
        if idx != -1:
            for ch in all_choices:
                pos = text.find(ch, idx + len(phrase))
                if pos != -1:
                    candidates.append((ch, pos, "phrase"))
    stripped = text.strip()
    for ch in all_choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
    for ch in all_choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        candidates = [(ch, text.rfind(ch), "fallback") for ch in all_choices if ch in text]
    if not candidates:
        return ""
    candidates.sort(key=lambda x: (_FORMAT_PRIORITY.get(x[2], 0), x[1]), reverse=True)
    return candidates[0][0]


# ---------------------------------------------------------------------------------------------------------
# MMBench: `MMBench_Evaluator` static evaluation (no GPT), circular
# ---------------------------------------------------------------------------------------------------------


def _can_infer_option(answer: str, num_choice: int = 5) -> str | None:
    choices = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return None
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(1 for c in choices if prefix + c + suffix in splits)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:  # "A" may be an article
                break
            if ch in splits:
                return ch
    for pre, suf in [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                     (":", ","), (":", "."), (":", ")"), (":", ").")]:  # fmt: skip
        if count(pre, suf) == 1:
            for ch in choices:
                if pre + ch + suf in splits:
                    return ch
    return None


def _can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    answer = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else None


def mmbench_read(prediction: str, choices: Mapping[str, str]) -> str:
    """The letter MMBench's static evaluation reads (`prefetch_answer`, else `extract_mcq_answer` over the
    option letters); "" when none. `choices` maps the letters A-D present to their texts. Quirk kept: the
    option step counts letters A-E whatever the number of options."""
    pred = prediction.strip()  # `mmbench_process_results` strips
    found = _can_infer_option(pred) or _can_infer_text(pred, {k: v for k, v in choices.items() if k in "ABCD"})
    return found or extract_mcq_answer(pred, sorted(choices))


def circular_accuracy(groups: Mapping[str, Sequence[float]]) -> float:
    """MMBench's circular evaluation: a question counts only when every rotation of its options is right."""
    return sum(float(all(s == 1.0 for s in v)) for v in groups.values()) / len(groups) if groups else 0.0


# ---------------------------------------------------------------------------------------------------------
# MMStar, RealWorldQA, SEED-Bench, ScienceQA-IMG, POPE
# ---------------------------------------------------------------------------------------------------------


def mmstar_correct(prediction: str, answer: str) -> tuple[bool, str]:
    """MMStar `exact_match`: the extracted letter (A-D) equals the answer, stripped and upper-cased."""
    letter = extract_mcq_answer(prediction, choices=["A", "B", "C", "D"])
    return letter == answer.strip().upper(), letter


def realworldqa_correct(prediction: str, answer: str) -> tuple[bool, str]:
    """RealWorldQA `realworldqa_process_results`: a letter answer (A-D) against `extract_mcq_answer`'s letter;
    any other answer (a number, a word) against the prediction lower-cased, stripped and with every final
    period removed, compared with the stripped answer lower-cased (whose own final period is kept)."""
    gt = answer.strip()
    if gt.upper() in ("A", "B", "C", "D"):
        letter = extract_mcq_answer(prediction, choices=["A", "B", "C", "D"])
        return letter == gt.upper(), letter
    cleaned = prediction.lower().strip().rstrip(".")
    return cleaned == gt.lower(), cleaned


def macro_average(scores_by_group: Mapping[str, Sequence[float]]) -> float:
    """MMStar's "average": the mean of the per-l2-category means (not of the samples)."""
    means = [sum(v) / len(v) for v in scores_by_group.values() if v]
    return sum(means) / len(means) if means else 0.0


def seed_correct(prediction: str, answer: str) -> tuple[bool, str]:
    """SEED-Bench: the first character of the stripped prediction, compared case-insensitively."""
    pred = prediction.strip()
    if len(pred) > 1:
        pred = pred[0]
    return pred.lower().strip() == answer.lower().strip(), pred


def scienceqa_correct(prediction: str, letter: str) -> bool:
    """ScienceQA: the stripped prediction equals the letter (any case), or starts with a capital then "."."""
    target, pred = letter.strip().lower(), prediction.strip()
    if pred.lower() == target:
        return True
    return len(pred) >= 2 and pred[0].isupper() and pred[1] == "." and pred[0].lower() == target


def pope_metrics(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """POPE's aggregates over (prediction, answer) pairs, both lower-cased and stripped as the reference does:
    accuracy (exact "yes"/"no"), precision and recall of "yes" (a prediction that is neither counts against
    accuracy only), F1, and `yes_ratio`, which (quirk kept) is the share of "yes" *answers*, not predictions."""
    tp = sum(1 for p, g in pairs if g == "yes" and p == "yes")
    fp = sum(1 for p, g in pairs if g == "no" and p == "yes")
    fn = sum(1 for p, g in pairs if g == "yes" and p == "no")
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    yes, no = sum(g == "yes" for _, g in pairs), sum(g == "no" for _, g in pairs)
    return {
        "accuracy": sum(1.0 for p, g in pairs if p == g) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0,
        "yes_ratio": yes / (yes + no) if yes + no else 0,
    }


def pope_by_split(pairs: Sequence[tuple[str, str, str]]) -> dict[str, dict[str, float]]:
    """`pope_metrics` per split (adversarial, popular, random) from (split, prediction, answer) triples."""
    by: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for split, p, g in pairs:
        by[split].append((p, g))
    return {k: pope_metrics(v) for k, v in sorted(by.items())}
