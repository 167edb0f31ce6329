"""How each benchmark turns predictions into scores: a `Scorer` per metric, which a task carries (`Task.scorer`)
and `stitch.eval.runner.score_dataset` calls, so the runner needs no per-metric branches.

A scorer judges one non-empty prediction at a time (`judge`), or, for a corpus-level metric (CIDEr), all of them
at once (`corpus`). Its headline is the mean as a percentage, or for a benchmark counted in points (OCRBench)
the sum; `report` adds the lines a benchmark's own report has. The arithmetic is `stitch.eval.metrics`'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stitch.errors import StitchError
from stitch.eval import metrics
from stitch.eval.readers.common import Sample

__all__ = ["Judged", "Scorer", "SCORERS", "get_scorer", "judge"]


@dataclass
class Judged:
    """One sample's score in [0, 1], what the parser read from the prediction, and its status: "ok",
    "missing" (no prediction), "empty" or "unparsable" (all three score 0)."""

    score: float
    extracted: Any = None
    status: str = "ok"


# corpus(predictions by id, samples, caption tokenizer) -> (score by sample id, extra summary fields)
Corpus = Callable[[dict[str, str], list[Sample], str], tuple[dict[str, float], dict[str, Any]]]


@dataclass(frozen=True)
class Scorer:
    """A benchmark's metric: `judge(sample, prediction)` for a per-sample one, `corpus` for a corpus-level one;
    `points`: the headline and breakdown are sums of points (else percentages of the mean) in `unit`;
    `report(samples, judged)`: extra summary lines."""

    metric: str
    judge: Callable[[Sample, str], Judged] | None = None
    corpus: Corpus | None = None
    points: bool = False
    unit: str = "%"
    report: Callable[[list[Sample], list[Judged]], dict[str, float]] | None = None

    def headline(self, judged: list[Judged], mean: float) -> dict[str, Any]:
        """The number the benchmark reports: a percentage, points (out of 1000 on OCRBench's full set), or
        CIDEr x100."""
        if self.points:
            return {"score": float(sum(j.score for j in judged)), "unit": f"points of {len(judged)}"}
        return {"score": 100.0 * mean, "unit": self.unit}

    def group_scores(self, scores: list[float]) -> float:
        """One breakdown group's number, in the headline's terms."""
        return sum(scores) if self.points else 100.0 * sum(scores) / len(scores)


def _vqa_accuracy(sample: Sample, prediction: str) -> Judged:
    return Judged(metrics.vqa_accuracy(prediction, sample.references))


def _anls(sample: Sample, prediction: str) -> Judged:
    return Judged(metrics.anls(prediction, sample.references))


def _relaxed_accuracy(sample: Sample, prediction: str) -> Judged:
    return Judged(max(metrics.relaxed_accuracy(prediction, r) for r in sample.references))


def _exact_match(sample: Sample, prediction: str) -> Judged:
    return Judged(metrics.exact_match(prediction, sample.references))


def _ocrbench(sample: Sample, prediction: str) -> Judged:
    return Judged(metrics.ocrbench_match(prediction, sample.references, sample.meta.get("dataset_name", "")))


def _multiple_choice(sample: Sample, prediction: str) -> Judged:
    score, letter = metrics.multiple_choice_accuracy(prediction, sample.references[0], sample.choices or [])
    return Judged(score, letter, "unparsable" if letter is None else "ok")


def _mmmu(sample: Sample, prediction: str) -> Judged:
    """MMMU mixes multiple-choice questions (with choices) and open ones."""
    if sample.choices:
        return _multiple_choice(sample, prediction)
    candidates = metrics.parse_open_response(prediction)
    return Judged(float(metrics.open_answer_correct(sample.references, candidates)), candidates)


def _mathvista(sample: Sample, prediction: str) -> Judged:
    m = sample.meta
    value = metrics.mathvista_extract(prediction, m["question_type"], m["answer_type"], sample.choices,
                                      m.get("precision"))
    if value is None:
        return Judged(0.0, None, "unparsable")
    return Judged(float(metrics.mathvista_correct(value, sample.references[0], m["answer_type"])), value)


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


SCORERS: dict[str, Scorer] = {
    s.metric: s
    for s in [
        Scorer("vqa_accuracy", _vqa_accuracy),
        Scorer("anls", _anls),
        Scorer("relaxed_accuracy", _relaxed_accuracy),
        Scorer("multiple_choice", _multiple_choice),
        Scorer("mmmu", _mmmu),
        Scorer("mathvista", _mathvista),
        Scorer("ocrbench", _ocrbench, points=True, report=_ocrbench_lines),
        Scorer("cider", corpus=_cider, unit="CIDEr x100"),
        Scorer("exact_match", _exact_match),
    ]
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
