"""How each benchmark turns predictions into scores: a `Scorer` per metric, which a task carries (`Task.scorer`)
and `stitch.eval.runner.score_dataset` calls, so the runner needs no per-metric branches.

A scorer judges one non-empty prediction at a time (`judge`), or, for a corpus-level metric (CIDEr), all of them
at once (`corpus`). Its headline is the mean as a percentage, or for a benchmark counted in points (OCRBench)
the sum; `report` adds the lines a benchmark's own report has. The arithmetic is `stitch.eval.metrics`'s.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stitch.errors import StitchError
from stitch.eval import metrics, reference
from stitch.eval import reference_choice as C
from stitch.eval import reference_hallusion as HB
from stitch.eval import reference_ocrbench_v2 as O2
from stitch.eval import reference_table as T
from stitch.eval.readers.common import Sample, clean_answers

__all__ = ["Judged", "Scorer", "SCORERS", "get_scorer", "judge"]


@dataclass
class Judged:
    """One sample's headline score in [0, 1], what the parser read from the prediction, and its status: "ok",
    "missing" (no prediction, scores 0), "empty", "unparsable" or "guessed" (MMMU's random option); the
    `readings` are the same sample under Stitch's other readings (by name)."""

    score: float
    extracted: Any = None
    status: str = "ok"
    readings: dict[str, float] = field(default_factory=dict)


# corpus(predictions by id, samples, caption tokenizer) -> (score by sample id, extra summary fields)
Corpus = Callable[[dict[str, str], list[Sample], str], tuple[dict[str, float], dict[str, Any]]]
# A reading: (sample, non-empty prediction) -> score in [0, 1].
Reading = Callable[[Sample, str], float]


@dataclass(frozen=True)
class Scorer:
    """A benchmark's metric: `judge(sample, prediction)` for a per-sample one (by the reference rules; it also
    sees empty predictions, since the reference scores them), `corpus` for a corpus-level one; `points`: the
    headline and breakdown are sums of points (else percentages of the mean) in `unit`; `report(samples,
    judged)`: extra summary lines; `rules`: what the headline follows, as the summary records it;
    `readings`: Stitch's stricter or more lenient readings, reported beside the headline, each with its rule."""

    metric: str
    judge: Callable[[Sample, str], Judged] | None = None
    corpus: Corpus | None = None
    points: bool = False
    unit: str = "%"
    report: Callable[[list[Sample], list[Judged]], dict[str, Any]] | None = None
    rules: str = ""
    readings: dict[str, tuple[Reading, str]] = field(default_factory=dict)
    # The headline mean when it is not the mean over samples (MMBench's circular groups, MMStar's macro
    # average, POPE's F1): (samples, judged) -> a number in [0, 1].
    aggregate: Callable[[list[Sample], list[Judged]], float] | None = None

    def headline(self, judged: list[Judged], mean: float) -> dict[str, Any]:
        """The number the benchmark reports: a percentage, points (out of 1000 on OCRBench's full set), or
        CIDEr x100."""
        if self.points:
            return {"score": float(sum(j.score for j in judged)), "unit": f"points of {len(judged)}"}
        return {"score": 100.0 * mean, "unit": self.unit}

    def group_scores(self, scores: list[float]) -> float:
        """One breakdown group's number, in the headline's terms."""
        return sum(scores) if self.points else 100.0 * sum(scores) / len(scores)


R = reference


def _vqav2(sample: Sample, prediction: str) -> Judged:
    return Judged(R.vqav2_accuracy(prediction, sample.references))


def _textvqa(sample: Sample, prediction: str) -> Judged:
    return Judged(R.textvqa_accuracy(prediction, sample.references))


def _anls(sample: Sample, prediction: str) -> Judged:
    return Judged(float(R.anls(prediction, sample.references)))


def _relaxed_accuracy(sample: Sample, prediction: str) -> Judged:
    return Judged(float(any(R.relaxed_correctness(prediction, r) for r in sample.references)))


def _exact_match(sample: Sample, prediction: str) -> Judged:
    return Judged(metrics.exact_match(prediction, sample.references))


def _ocrbench(sample: Sample, prediction: str) -> Judged:
    return Judged(float(R.ocrbench_match(prediction, sample.references, sample.meta.get("dataset_name", ""))))


def _ai2d(sample: Sample, prediction: str) -> Judged:
    """Reported "unparsable" when what is read is not one of the option letters (it then cannot match)."""
    read = R.ai2d_read(prediction)
    letters = [c.lower() for c in metrics.choice_letters(len(sample.choices or []))]
    status = "ok" if read in letters else "unparsable"
    return Judged(float(R.ai2d_correct(prediction, sample.references[0])), read.upper() if status == "ok" else read,
                  status)


# Video-MME's `extract_characters_regex` (lmms-eval `videomme/utils.py`): answer prefixes dropped, then the first
# option letter (capital, as there), none read: wrong; MVBench's `check_ans` reads "(B) stood" the same way.
_ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                    "The correct option is", "Best answer:", "Best option:", "Answer:", "Option:")


def _video_choice(sample: Sample, prediction: str) -> Judged:
    text = prediction.strip()
    for prefix in _ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    letters = "".join(metrics.choice_letters(len(sample.choices or [])))
    found = re.search(f"[{letters}]", text) if letters else None
    if found is None:
        return Judged(0.0, text[:40], "unparsable")
    return Judged(float(found.group(0) == sample.references[0].strip().upper()), found.group(0))


def _mmmu(sample: Sample, prediction: str) -> Judged:
    """MMMU mixes multiple-choice questions (with choices) and open ones."""
    if sample.choices:
        letter, guessed = R.mmmu_multiple_choice(prediction, sample.choices, sample.id)
        return Judged(float(letter == sample.references[0]), letter, "guessed" if guessed else "ok")
    candidates = R.mmmu_parse_open(prediction)
    gold = sample.meta.get("raw_answer", sample.references)
    return Judged(float(R.mmmu_open_correct(gold, candidates)), candidates)


def _mathvista(sample: Sample, prediction: str) -> Judged:
    m = sample.meta
    right, value, extraction = R.mathvista_correct(prediction, sample.references[0], m["question_type"],
                                                   m["answer_type"], sample.choices, m.get("precision"))  # fmt: skip
    # Nothing read: for options the reference takes the nearest one ("guessed"), else the answer is wrong.
    status = "ok" if extraction else "guessed" if m["question_type"] == "multi_choice" else "unparsable"
    return Judged(float(right), value, status)


# Stitch's readings (the rules `stitch score` used before the headline followed the reference).


def _vqa_stitch(sample: Sample, prediction: str) -> float:
    return metrics.vqa_accuracy(prediction, clean_answers(sample.references))


def _anls_stitch(sample: Sample, prediction: str) -> float:
    return metrics.anls(prediction, clean_answers(sample.references))


def _relaxed_lenient(sample: Sample, prediction: str) -> float:
    return max(metrics.relaxed_accuracy(prediction, r) for r in clean_answers(sample.references))


def _mmmu_parser(sample: Sample, prediction: str) -> float:
    return metrics.multiple_choice_accuracy(prediction, sample.references[0], sample.choices or [])[0]


def _mmmu_no_guess(sample: Sample, prediction: str) -> float:
    if sample.choices:
        return _mmmu_parser(sample, prediction)
    candidates = metrics.parse_open_response(prediction)
    return float(metrics.open_answer_correct(sample.references, candidates))


def _mathvista_rules(sample: Sample, prediction: str) -> float:
    m = sample.meta
    value = metrics.mathvista_extract(prediction, m["question_type"], m["answer_type"], sample.choices,
                                      m.get("precision"))  # fmt: skip
    return float(metrics.mathvista_correct(value, sample.references[0], m["answer_type"]))


def _ocrbench_stitch(sample: Sample, prediction: str) -> float:
    return metrics.ocrbench_match(prediction, clean_answers(sample.references), sample.meta.get("dataset_name", ""))


def _cider(texts: dict[str, str], samples: list[Sample], caption_tokenizer: str):
    refs = {s.id: s.references for s in samples}
    corpus, per_image, used = metrics.cider(texts, refs, caption_tokenizer)
    return per_image, {"tokenizer": used, "cider": corpus}


def _ocrbench_lines(samples: list[Sample], judged: list[Judged]) -> dict[str, float]:
    """OCRBench's report: the six recognition categories summed as "Text Recognition", then the total."""
    by_cat: dict[str, float] = defaultdict(float)
    for s, j in zip(samples, judged):
        by_cat[s.meta.get("category", "")] += j.score
    recognition = sum(by_cat[c] for c in metrics.OCRBENCH_TEXT_RECOGNITION)
    return {"text_recognition": recognition, "final_score": sum(by_cat.values())}


_STITCH_VQA = (_vqa_stitch, "Stitch: empty human answers dropped, an empty prediction is wrong, every answer "
               "through the full EvalAI processor")  # fmt: skip
_LMMS = R.REFERENCE

def _mmbench(sample: Sample, prediction: str) -> Judged:
    letters = metrics.choice_letters(len(sample.choices or []))
    letter = C.mmbench_read(prediction, dict(zip(letters, sample.choices or [])))
    return Judged(float(letter == sample.references[0]), letter, "ok" if letter else "unparsable")


def _mmbench_circular(samples: list[Sample], judged: list[Judged]) -> float:
    groups: dict[str, list[float]] = defaultdict(list)
    for s, j in zip(samples, judged):
        groups[s.meta.get("circular_group", s.id)].append(j.score)
    return C.circular_accuracy(groups)


def _mmstar(sample: Sample, prediction: str) -> Judged:
    right, letter = C.mmstar_correct(prediction, sample.references[0])
    return Judged(float(right), letter, "ok" if letter else "unparsable")


def _mmstar_macro(samples: list[Sample], judged: list[Judged]) -> float:
    groups: dict[str, list[float]] = defaultdict(list)
    for s, j in zip(samples, judged):
        groups[str(s.meta.get("l2_category"))].append(j.score)
    return C.macro_average(groups)


def _realworldqa(sample: Sample, prediction: str) -> Judged:
    right, read = C.realworldqa_correct(prediction, sample.references[0])
    letter_answer = sample.references[0].strip().upper() in ("A", "B", "C", "D")
    return Judged(float(right), read, "unparsable" if letter_answer and not read else "ok")


def _exact_stitch(sample: Sample, prediction: str) -> float:
    return metrics.exact_match(prediction, sample.references)


def _hallusion(sample: Sample, prediction: str) -> Judged:
    answer = HB.hallusion_answer(prediction)
    return Judged(float(answer == sample.references[0]), answer)


def _hallusion_lines(samples: list[Sample], judged: list[Judged]) -> dict[str, Any]:
    """HallusionBench's three numbers: aAcc (per question), fAcc (per figure), qAcc (per question pair)."""
    return HB.hallusion_metrics([s.meta for s in samples], [j.score == 1.0 for j in judged])


def _table(sample: Sample, prediction: str) -> Judged:
    """A prediction without a "<table>", with an unreadable span, or without rows scores 0 as "unparsable" (the
    reference parser returns None or raises there)."""
    html = T.extract_table_html(prediction)
    try:
        grid = T.html_to_grid(html) if html is not None else []
    except ValueError:
        grid = []
    if not grid:
        return Judged(0.0, None, "unparsable")
    return Judged(T.table_similarity(T.html_to_grid(sample.references[0]), grid), f"{len(grid)} rows")


def _seed(sample: Sample, prediction: str) -> Judged:
    right, letter = C.seed_correct(prediction, sample.references[0])
    return Judged(float(right), letter)


def _scienceqa(sample: Sample, prediction: str) -> Judged:
    return Judged(float(C.scienceqa_correct(prediction, sample.references[0])))


def _pope(sample: Sample, prediction: str) -> Judged:
    pred = prediction.lower().strip()
    return Judged(float(pred == sample.references[0]), pred, "ok" if pred in ("yes", "no") else "unparsable")


def _pope_pairs(samples: list[Sample], judged: list[Judged]) -> list[tuple[str, str, str]]:
    # A missing prediction reads as "" (neither yes nor no), as an empty response would.
    return [(s.meta.get("split", "unknown"), j.extracted or "", s.references[0]) for s, j in zip(samples, judged)]


def _pope_f1(samples: list[Sample], judged: list[Judged]) -> float:
    return C.pope_metrics([(p, g) for _, p, g in _pope_pairs(samples, judged)])["f1"]


def _pope_lines(samples: list[Sample], judged: list[Judged]) -> dict[str, Any]:
    """POPE's report: accuracy, precision, recall, F1 and yes ratio over all and per split."""
    pairs = _pope_pairs(samples, judged)
    return {"all": C.pope_metrics([(p, g) for _, p, g in pairs]), "by_split": C.pope_by_split(pairs)}


def _ocrbench_v2(sample: Sample, prediction: str) -> Judged:
    """Scored by the reference rule for its type; "unscored" where that rule is not ported (O2.UNSCORED, left out
    of the headline); "unparsable" (0) where the reference's own code would raise on the sample."""
    doc = {**sample.meta, "answers": list(sample.references)}
    try:
        score = O2.ocrbench_v2_score(prediction, doc)
    except (ValueError, TypeError, AttributeError, SyntaxError, AssertionError, ZeroDivisionError):
        return Judged(0.0, None, "unparsable")
    return Judged(0.0, None, "unscored") if score is None else Judged(score)


def _o2_scored(samples: list[Sample], judged: list[Judged]) -> list[tuple[Sample, Judged]]:
    return [(s, j) for s, j in zip(samples, judged) if O2.ocrbench_v2_score_supported(s.meta)]


def _ocrbench_v2_final(samples: list[Sample], judged: list[Judged]) -> float:
    return O2.subset_means([(s.meta["type"], j.score) for s, j in _o2_scored(samples, judged)])["final"]


def _ocrbench_v2_lines(samples: list[Sample], judged: list[Judged]) -> dict[str, Any]:
    """The reference's report over the scored types (English, Chinese, final, per bucket and per type, each in
    [0, 1]), and what was left unscored, by type, with the reason."""
    rows = [(s.meta["type"], j.score) for s, j in _o2_scored(samples, judged)]
    means = O2.subset_means(rows)
    by_type: dict[str, list[float]] = defaultdict(list)
    for kind, score in rows:
        by_type[kind].append(score)
    unscored: dict[str, int] = defaultdict(int)
    for s in samples:
        if not O2.ocrbench_v2_score_supported(s.meta):
            unscored[s.meta["type"]] += 1
    return {**means, "by_type": {k: {"score": sum(v) / len(v), "samples": len(v)} for k, v in sorted(by_type.items())},
            "unscored": {k: {"samples": n, "reason": O2.unscored_reason(k)} for k, n in sorted(unscored.items())},
            "complete": not unscored}  # fmt: skip


# Keyed by metric, or "metric/variant" where one metric has per-benchmark rules (TextVQA's processor).
SCORERS: dict[str, Scorer] = {
    "vqa_accuracy": Scorer("vqa_accuracy", _vqav2, rules=f"{_LMMS} vqav2_process_results (EvalAI punctuation and "
                           "digit/article steps, no tokenising step; leave-one-out over 10)",
                           readings={"stitch": _STITCH_VQA}),
    "vqa_accuracy/textvqa": Scorer("vqa_accuracy", _textvqa, rules=f"{_LMMS} textvqa_process_results (full "
                                   "EvalAI processor on both sides; leave-one-out)", readings={"stitch": _STITCH_VQA}),
    "anls": Scorer("anls", _anls, rules=f"{_LMMS} anls (threshold 0.5; raw-length denominator)",
                   readings={"stitch": (_anls_stitch, "Stitch: length of the normalised strings, empty answers "
                                        "dropped, an empty prediction scores 0")}),
    "relaxed_accuracy": Scorer("relaxed_accuracy", _relaxed_accuracy,
                               rules=f"{_LMMS} chartqa relaxed_correctness (5%; '45%' = 0.45; target 0 exact)",
                               readings={"lenient": (_relaxed_lenient, "Stitch: trailing % optional, thousands "
                                                     "separators accepted, target 0 matched numerically")}),
    "multiple_choice": Scorer("multiple_choice", _ai2d, rules=f"{_LMMS} ai2d (letter filter '^\\s*([A-Z])\\.', "
                              "exact match ignoring case and punctuation)",
                              readings={"mmmu_parser": (_mmmu_parser, "MMMU's rule-based parser, no guess")}),
    "video_choice": Scorer("video_choice", _video_choice, rules=f"{_LMMS} videomme extract_characters_regex (answer "
                           "prefixes dropped, first option letter; MVBench's check_ans reads the same letter)"),
    "mmmu": Scorer("mmmu", _mmmu, rules=f"{_LMMS} mmmu parse_multi_choice_response / parse_open_response / "
                   f"eval_open; random option when nothing parses, seeded ({R.MMMU_FALLBACK_SEED}, sample id)",
                   readings={"no_guess": (_mmmu_no_guess, "Stitch: unparsable answers wrong, no guess; list-form "
                                          "open answers parsed")}),
    "mathvista": Scorer("mathvista", _mathvista, rules=f"{_LMMS} mathvista extract_answer (quick_extract off, no "
                        "LLM judge: ''), normalize_extracted_answer (nearest option), safe_equal",
                        readings={"rules": (_mathvista_rules, "Stitch: MMMU parser for options, last number for "
                                            "values, no nearest-option guess")}),
    "ocrbench": Scorer("ocrbench", _ocrbench, points=True, report=_ocrbench_lines,
                       rules=f"{_LMMS} ocrbench_process_results (substring; full-width folded; HME100k spaceless)",
                       readings={"stitch": (_ocrbench_stitch, "Stitch: no full-width folding, empty answers "
                                            "never match")}),
    "ocrbench_v2": Scorer("ocrbench_v2", _ocrbench_v2, aggregate=_ocrbench_v2_final, report=_ocrbench_v2_lines,
                          rules=f"{_LMMS} ocrbench_v2_process_results for the types it scores in plain Python "
                          "(VQA substring/ANLS, multiple choice, counting, formula, grounding IoU, VQA with position, "
                          "KIE F1, handwritten extraction); headline = mean over the scored samples "
                          "(ocrbench_v2_aggregate_accuracy's final score); TEDS, page-OCR and spotting types "
                          "unscored (extra.unscored)"),
    "cider": Scorer("cider", corpus=_cider, unit="CIDEr x100", rules="pycocoevalcap CIDEr-D (PTB or simple "
                    "tokenizer, as the summary's extra.tokenizer says)"),
    "mmbench": Scorer("mmbench", _mmbench, aggregate=_mmbench_circular, rules=f"{_LMMS} MMBench static "
                      "evaluation (can_infer, else extract_mcq_answer; no GPT), circular: a question counts when "
                      "every rotation of its options is right"),
    "mmstar": Scorer("mmstar", _mmstar, aggregate=_mmstar_macro, rules=f"{_LMMS} mmstar exact_match "
                     "(extract_mcq_answer A-D); headline = mean of the l2-category means"),
    "seedbench": Scorer("seedbench", _seed, rules=f"{_LMMS} seed_process_result (first character of the stripped "
                        "prediction, case-insensitive)"),
    "scienceqa": Scorer("scienceqa", _scienceqa, rules=f"{_LMMS} sqa_process_results (the letter, or 'X.' with a "
                        "capital X)"),
    "pope": Scorer("pope", _pope, aggregate=_pope_f1, report=_pope_lines, rules=f"{_LMMS} pope (lower-cased, "
                   "stripped exact yes/no); headline = F1 of 'yes' over all splits; extra has accuracy, "
                   "precision, recall, F1 and yes_ratio (share of 'yes' answers) per split"),
    "exact_match/realworldqa": Scorer("exact_match", _realworldqa, rules=f"{_LMMS} realworldqa_process_results "
                                      "(letter answers: extract_mcq_answer A-D; others: lower-cased, stripped, "
                                      "final periods removed, exact)",
                                      readings={"stitch": (_exact_stitch, "Stitch: equal ignoring case, surrounding "
                                                           "space and a final period")}),
    "hallusionbench": Scorer("hallusionbench", _hallusion, report=_hallusion_lines, rules=f"{_LMMS} "
                             "hallusion_bench without its GPT judge: answer 'yes' when 'yes' is in the lower-cased "
                             "prediction (hb_aggregation_result_intern), right when it equals gt_answer; headline "
                             "aAcc; extra has aAcc, fAcc, qAcc counted as utils.get_eval_all / get_eval_fig / "
                             "get_eval_pair_all"),
    "table_similarity": Scorer("table_similarity", _table, rules="Reducto rd-tablebench grading.table_similarity "
                               "(row/cell Needleman-Wunsch, free end gaps, float32) on convert.html_to_numpy "
                               "grids; the answer cut from its first <table> to </table> as parse_gpt4o_response"),
    "exact_match": Scorer("exact_match", _exact_match, rules="equal ignoring case, surrounding space and a final "
                          "period"),
}


def get_scorer(metric: str) -> Scorer:
    if metric not in SCORERS:
        raise StitchError(f"no scorer for metric {metric!r}")
    return SCORERS[metric]


def judge(metric: str, sample: Sample, prediction: str) -> Judged:
    """Score one prediction with the metric called `metric` (everything but CIDEr, which is corpus-level)."""
    scorer = get_scorer(metric)
    if scorer.judge is None:
        raise StitchError(f"no scorer for metric {metric!r}")
    return scorer.judge(sample, prediction)
