"""OCRBench v2's per-sample rules as lmms-eval 0.7.3 computes them (`tasks/ocrbench_v2/utils.py`
`ocrbench_v2_process_results` and the `vqa_metric`, `IoUscore_metric`, `TEDS_metric` helpers it calls), quirks
included, for the task types whose rules are plain Python; `UNSCORED` names the others and why.

Ported per type: the VQA rules (substring for short answers, ANLS >= 0.5 for answers of five words or more,
case-sensitive and Chinese variants), multiple choice by the letters of the answer, counting (exact or
regression), formula substring match, grounding IoU, VQA with position (half answer, half IoU), key
information extraction F1 over the Cartesian product of accepted values, handwritten answer extraction (its
character-list rule). Tested per sample against the installed reference (tests/eval/test_eval_ocrbench_v2.py).
"""

from __future__ import annotations

import ast
import json
import re
from itertools import product
from typing import Any

# Type -> why it is not scored (the sample is reported "unscored" and left out of the headline).
_METEOR = ("page-OCR metrics (BLEU + METEOR + F1 + edit distance, cal_per_metrics): NLTK's METEOR needs the "
           "WordNet corpus, which is downloaded at run time and not installable from a package registry")
_TEDS = "TEDS (APTED tree edit distance over the HTML tree) not ported yet"
UNSCORED: dict[str, str] = {
    "table parsing en": _TEDS, "table parsing cn": _TEDS, "chart parsing en": _TEDS,
    "document parsing en": f"{_TEDS} (doc_parsing_evaluation)",
    "document parsing cn": f"{_TEDS} (doc_parsing_evaluation)",
    "full-page OCR en": _METEOR, "full-page OCR cn": _METEOR, "fine-grained text recognition en": _METEOR,
    "text translation cn": _METEOR,
    "text spotting en": "the ICDAR RRC end-to-end spotting evaluation (spotting_eval/script.py) is not ported yet",
}  # fmt: skip
# handwritten answer extraction cn questions containing this ("short answer") are scored by cal_per_metrics.
HANDWRITTEN_SHORT_ANSWER = "简答"

_VQA_EN = {"APP agent en", "ASCII art classification en", "math QA en", "reasoning VQA en", "science QA en",
           "text recognition en", "document classification en", "cognition VQA en", "diagram QA en"}  # fmt: skip
_VQA_CN = {"cognition VQA cn", "reasoning VQA cn"}
SCORED = _VQA_EN | _VQA_CN | {
    "handwritten answer extraction cn", "formula recognition cn", "formula recognition en", "text counting en",
    "key information extraction en", "key information mapping en", "key information extraction cn",
    "VQA with position en", "text grounding en",
}  # fmt: skip

# utils._fill_score_buckets: the 13 subsets (8 English, 5 Chinese) each type counts towards.
BUCKETS: dict[str, str] = {
    **dict.fromkeys(["text recognition en", "fine-grained text recognition en", "full-page OCR en"],
                    "text_recognition_en"),
    **dict.fromkeys(["text grounding en", "VQA with position en"], "text_detection_en"),
    "text spotting en": "text_spotting_en",
    **dict.fromkeys(["key information extraction en", "key information mapping en"], "relationship_extraction_en"),
    **dict.fromkeys(["document parsing en", "chart parsing en", "table parsing en", "formula recognition en"],
                    "element_parsing_en"),
    **dict.fromkeys(["math QA en", "text counting en"], "mathematical_calculation_en"),
    **dict.fromkeys(["document classification en", "cognition VQA en", "diagram QA en"],
                    "visual_text_understanding_en"),
    **dict.fromkeys(["reasoning VQA en", "science QA en", "APP agent en", "ASCII art classification en"],
                    "knowledge_reasoning_en"),
    "full-page OCR cn": "text_recognition_cn",
    **dict.fromkeys(["key information extraction cn", "handwritten answer extraction cn"],
                    "relationship_extraction_cn"),
    **dict.fromkeys(["document parsing cn", "table parsing cn", "formula recognition cn"], "element_parsing_cn"),
    "cognition VQA cn": "visual_text_understanding_cn",
    **dict.fromkeys(["reasoning VQA cn", "text translation cn"], "knowledge_reasoning_cn"),
}  # fmt: skip
assert set(BUCKETS) == SCORED | set(UNSCORED)


def levenshtein(s1: str, s2: str) -> int:
    """vqa_metric.levenshtein_distance."""
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    distances = list(range(len(s1) + 1))
    for i2, c2 in enumerate(s2):
        row = [i2 + 1]
        for i1, c1 in enumerate(s1):
            row.append(distances[i1] if c1 == c2 else 1 + min(distances[i1], distances[i1 + 1], row[-1]))
        distances = row
    return distances[-1]


def _anls(predict: str, answer: str) -> float:
    length = max(len(predict), len(answer))
    return 1 - (0.0 if length == 0 else levenshtein(predict, answer) / length)


def _vqa(predict: Any, answers: Any, norm, short) -> float:
    """The shared body of vqa_evaluation and its variants: `norm` cleans both sides, `short(answer)` decides
    substring match (else ANLS kept when >= 0.5). Quirk kept: with a list of answers a short answer that is not
    in the prediction scores nothing (no ANLS), while a single string answer falls back to ANLS."""
    score = 0.0
    if isinstance(answers, list):
        for a in answers:
            answer = norm(str(a))
            predict = norm(str(predict) if isinstance(predict, (int, float)) else predict)
            if short(answer):
                if answer in predict:
                    score = 1
            else:
                value = _anls(predict, answer)
                if value >= 0.5 and value > score:
                    score = value
        return score
    # A single string answer: only a short one is scored (substring, else ANLS); a long one scores 0.
    answer, predict = norm(answers), norm(predict)
    if not short(answer):
        return score
    if answer in predict:
        return 1
    value = _anls(predict, answer)
    return value if value >= 0.5 and value > score else score


def vqa_evaluation(predict: Any, answers: Any) -> float:
    return _vqa(predict, answers, lambda t: t.lower().strip().replace("\n", " "), lambda a: len(a.split()) < 5)


def cn_vqa_evaluation(predict: Any, answers: Any) -> float:
    return _vqa(predict, answers, lambda t: t.lower().strip().replace("\n", " ").replace(" ", ""),
                lambda a: len(a.split(",")) < 4)  # fmt: skip


def vqa_evaluation_case_sensitive(predict: Any, answers: Any) -> float:
    # The reference does not turn a numeric prediction into text here (nor do predictions arrive as numbers).
    return _vqa(predict, answers, lambda t: t.strip().replace("\n", " "), lambda a: len(a.split()) < 5)


def counting_evaluation(predict: str, answers: list[str], eval_method: str) -> float:
    """vqa_metric.counting_evaluation: "exact match" (answer a substring of the raw prediction; quirk: the
    cleaned prediction is not the one searched), "regression" (the first integer n scores 1 - |n - a| / a when
    that is above 0.5 and 0 < n < 2a; n = 0 reads as nothing). Best over the answers."""
    processed = predict.lower().strip().replace("\n", " ")
    best = 0.0
    for a in answers:
        answer = str(a).lower().strip().replace("\n", " ")
        score = 0.0
        if eval_method == "exact match":
            score = 1.0 if answer in predict else 0.0
        elif eval_method == "regression":
            found = re.search(r"\d+", processed)
            number = int(found.group()) if found else None
            if number:
                target = int(answer)
                if not (number <= 0 or number >= 2 * target):
                    iou = 1 - abs(number - target) / target
                    score = iou if iou > 0.5 else 0.0
        best = max(best, score)
    return best


def _no_spaces(text: str) -> str:
    return text.strip().replace("\n", " ").replace(" ", "")


def math_expression_evaluation(predict: str, answers: list[str]) -> float:
    """Any answer, spaces removed, a substring of the prediction with spaces removed."""
    return float(any(_no_spaces(a) in _no_spaces(predict) for a in answers))


def cn_math_expression_evaluation(predict: str, answers: list[str]) -> float:
    """As `math_expression_evaluation` after `\\text{...}` is unwrapped on both sides (one answer)."""
    def untext(s: str) -> str:
        return re.sub(r"\\text\{([^{}]*)\}", r"\1", s)

    assert len(answers) == 1, "formula recognition cn has one answer"
    return float(_no_spaces(untext(answers[0])) in _no_spaces(untext(predict)))


def calculate_iou(box1: Any, box2: Any) -> float:
    """IoUscore_metric.calculate_iou on [x1, y1, x2, y2] boxes (ints); 0 when a box is not four numbers."""
    try:
        b1, b2 = [int(c) for c in box1], [int(c) for c in box2]
        x1, y1, x2, y2 = max(b1[0], b2[0]), max(b1[1], b2[1]), min(b1[2], b2[2]), min(b1[3], b2[3])
    except Exception:  # noqa: BLE001 - the reference returns 0 for anything that is not a box
        return 0
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    union = (b1[2] - b1[0]) * (b1[3] - b1[1]) + (b2[2] - b2[0]) * (b2[3] - b2[1]) - inter
    return inter / union if union != 0 else 0


def extract_coordinates(text: str) -> list[int] | None:
    """The last (x1, y1, x2, y2) or [x1, y1, x2, y2] with every value in 0..1000 (a repeated box counts at its
    latest place)."""
    boxes: list[tuple[int, ...]] = []
    for m in re.finditer(r"[\(\[]\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*[\)\]]", text):
        box = tuple(map(int, m.groups()))
        if all(0 <= n <= 1000 for n in box):
            boxes = [b for b in boxes if b != box] + [box]
    return list(boxes[-1]) if boxes else None


def convert_str_to_dict(text: str) -> dict[str, str]:
    """TEDS_metric.convert_str_to_dict: a code fence's content (else the stripped text) read as JSON, else a
    Python dict literal, else `key: value` pairs by regex; keys and values stripped strings; {} on failure."""
    fence = re.search(r"```(?:python|json)?\n(.*?)\n```", text, re.DOTALL | re.IGNORECASE)
    content = fence.group(1) if fence else text.strip()
    data: Any = {}
    success = False
    try:
        data = json.loads(content)
        success = True
    except json.JSONDecodeError:
        pass
    if not success:
        try:
            data = ast.literal_eval(content)
            success = isinstance(data, dict)
        except (ValueError, SyntaxError):
            pass
    if not success:
        try:
            for key, value in re.findall(r'["\']?([\w\s]+)["\']?\s*[:=]\s*["\']?([^\n,"\'{}]+)["\']?', content):
                data[key.strip()] = value.strip()
        except Exception:  # noqa: BLE001 - as the reference: `data` may be a parsed non-dict (a list, a number)
            return {}
    if not data:
        return {}
    try:
        return {k.strip(): str(v).strip() for k, v in data.items()}
    except Exception:  # noqa: BLE001 - non-string keys, or a truthy non-dict
        return {}


def generate_combinations(answer: Any) -> list[dict[str, Any]]:
    """TEDS_metric.generate_combinations: every choice of one accepted value per key ({} when a string
    answer does not parse; a dict's values must already be lists)."""
    if isinstance(answer, dict):
        keys = list(answer)
        return [dict(zip(keys, values)) for values in product(*(answer[k] for k in keys))]
    text = answer.strip('"')
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        try:
            parsed = ast.literal_eval(text)
            if not isinstance(parsed, dict):
                parsed = ast.literal_eval(parsed)
        except (ValueError, SyntaxError):
            return {}  # type: ignore[return-value]  # the reference's value: iterating it scores nothing
    if not isinstance(parsed, dict):
        raise ValueError("Input could not be parsed into a dictionary.")
    keys = list(parsed)
    values = [v if isinstance(v, list) else [v] for v in parsed.values()]
    return [dict(zip(keys, combo)) for combo in product(*values)]


def compute_f1_score(preds: dict[str, Any], gts: dict[str, Any]) -> float:
    """TEDS_metric.compute_f1_score: per key of either side, 1 when both values (lower-cased, spaces removed)
    are equal, else 0; the mean over keys (0 with none). A falsy value ("", 0) is compared as it is."""
    scores = []
    for key in set(preds) | set(gts):
        p, g = preds.get(key), gts.get(key)
        if p:
            p = _no_spaces(p.lower())
        if g:
            g = _no_spaces(g.lower())
        if p is None and g is None:
            continue
        scores.append(1.0 if p is not None and g is not None and p == g else 0.0)
    return sum(scores) / len(scores) if scores else 0


def _kie(predict: str, combos: list[dict[str, Any]]) -> float:
    if isinstance(combos, list) and len(combos) == 1:
        return compute_f1_score(convert_str_to_dict(predict), combos[0])
    best = 0.0
    for combo in combos:
        best = max(best, compute_f1_score(convert_str_to_dict(predict), combo))
    return best


def _handwritten(predict: str, answers: list[str]) -> float:
    """The character-list rule: the answer's characters joined by any of ten separators, found in the
    prediction (a one-character answer: found as it is)."""
    assert len(answers) == 1, "handwritten answer extraction cn has one answer"
    chars = list(answers[0])
    if len(answers[0]) <= 1:
        return float(answers[0] in predict)
    joins = ["", ".", ". ", ",", ", ", "、", ";", "; ", " ", "和"]
    return float(any(j.join(chars) in predict for j in joins))


def ocrbench_v2_score(predict: str, doc: dict[str, Any]) -> float | None:
    """The sample's score in [0, 1] by `ocrbench_v2_process_results`' rule for its type, or None when the type
    (or, for handwritten answer extraction, the question form) is one `UNSCORED` lists. `doc` carries the
    export's fields: `type`, `question`, `answers` (list), `eval`, `bbox`."""
    kind, answers, how = doc["type"], list(doc["answers"]), doc.get("eval")
    if kind in _VQA_EN or kind in _VQA_CN:
        if how == "multiple choice":
            assert len(answers) == 1, f"{kind}: a multiple-choice question has one answer"
            return float("".join(c for c in predict if c.isalpha()) == answers[0])
        if how == "case sensitive":
            return float(vqa_evaluation_case_sensitive(predict, answers))
        return float((vqa_evaluation if kind in _VQA_EN else cn_vqa_evaluation)(predict, answers))
    if kind == "handwritten answer extraction cn":
        return None if HANDWRITTEN_SHORT_ANSWER in doc["question"] else _handwritten(predict, answers)
    if kind == "formula recognition cn":  # utils.is_nan_value: the text "nan" (any case) scores 0
        return 0.0 if predict.lower() == "nan" else cn_math_expression_evaluation(predict, answers)
    if kind == "formula recognition en":
        return math_expression_evaluation(predict, answers)
    if kind == "text counting en":
        return float(counting_evaluation(predict, answers, how or ""))
    if kind in ("key information extraction en", "key information mapping en"):
        assert len(answers) == 1, f"{kind}: one answer (a dict written as text)"
        return float(_kie(predict, generate_combinations(answers[0])))
    if kind == "key information extraction cn":
        assert len(answers) == 1, f"{kind}: one answer (a dict written as text)"
        parsed = ast.literal_eval(answers[0])
        return float(_kie(predict, generate_combinations({k: v if isinstance(v, list) else [v]
                                                          for k, v in parsed.items()})))  # fmt: skip
    if kind == "VQA with position en":
        got = convert_str_to_dict(predict)
        content = vqa_evaluation(got["answer"], answers) if "answer" in got else 0.0
        box = 0.0
        if "bbox" in got:
            try:
                box = calculate_iou(ast.literal_eval(got["bbox"]), doc.get("bbox"))
            except Exception:  # noqa: BLE001 - as the reference: an unreadable box scores 0
                box = 0
        return 0.5 * content + 0.5 * box
    if kind == "text grounding en":
        found = extract_coordinates(predict)
        return float(calculate_iou(found, answers)) if found else 0.0
    if kind in UNSCORED:
        return None
    raise ValueError(f"unknown OCRBench v2 type {kind!r}")


def ocrbench_v2_score_supported(meta: dict[str, Any]) -> bool:
    """Whether a sample (its `type`, and `question` for handwritten extraction) has a ported rule."""
    if meta["type"] == "handwritten answer extraction cn":
        return HANDWRITTEN_SHORT_ANSWER not in meta.get("question", "")
    return meta["type"] in SCORED


def unscored_reason(kind: str) -> str:
    if kind == "handwritten answer extraction cn":
        return f"questions containing {HANDWRITTEN_SHORT_ANSWER!r} (short answer): " + _METEOR
    return UNSCORED[kind]


def subset_means(rows: list[tuple[str, float]]) -> dict[str, Any]:
    """utils.ocrbench_v2_aggregate_accuracy over (type, score) rows: the English and Chinese subset scores
    (sample-weighted means over their buckets), the final score (the sample-weighted mean of the two, so the
    mean over all rows) and each bucket's mean; values in [0, 1]."""
    buckets: dict[str, list[float]] = {}
    for kind, score in rows:
        buckets.setdefault(BUCKETS[kind], []).append(score)

    def mean(names: list[str]) -> float:
        values = [s for n in names for s in buckets.get(n, [])]
        return sum(values) / len(values) if values else 0.0

    en = [b for b in dict.fromkeys(BUCKETS.values()) if b.endswith("_en")]
    cn = [b for b in dict.fromkeys(BUCKETS.values()) if b.endswith("_cn")]
    n_en, n_cn = sum(len(buckets.get(b, [])) for b in en), sum(len(buckets.get(b, [])) for b in cn)
    total = n_en + n_cn
    final = (mean(en) * n_en + mean(cn) * n_cn) / total if total else 0.0
    return {"final": final, "en": mean(en), "cn": mean(cn), "en_samples": n_en, "cn_samples": n_cn,
            "buckets": {b: {"score": mean([b]), "samples": len(v)} for b, v in sorted(buckets.items())}}


__all__ = ["BUCKETS", "SCORED", "UNSCORED", "ocrbench_v2_score", "ocrbench_v2_score_supported", "subset_means",
           "unscored_reason"]
