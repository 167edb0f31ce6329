"""HallusionBench (image part) scoring by lmms-eval 0.7.3's `hallusion_bench` code, without its GPT judge.

lmms-eval's configured aggregation asks GPT-4 whether each answer agrees with `gt_answer_details` (correct,
incorrect, unclear) before `assign_correctness` and the `get_eval_*` counts in `hallusion_bench/utils.py`; that
needs a network judge, so Stitch takes the per-answer verdict from the judge-free rule the same package ships
(`evaluate_hb.hb_aggregation_result_intern`: "1" when "yes" occurs anywhere in the lower-cased answer, else "0",
right when that equals `gt_answer`) and then counts exactly as `utils.py` does:

- aAcc (`get_eval_all`): right questions / questions;
- fAcc (`get_eval_fig`): figures (category, subcategory, set_id, figure_id) whose questions are all right /
  figures, VS figure 0 (the no-image control) left out;
- qAcc (`get_eval_pair_all`): questions (category, subcategory, set_id, question_id) right on every figure they
  are asked about / such questions.

Each is `round(100 * correct / total, 4)` as `hb_aggregation_result` returns it. On the image split (which has
no VS figure 0 rows) the judge-free `_intern` aggregations give the same three numbers.
Quirk kept: "yes" is a substring test, so "eyes", "yesterday" and "no, not yes" all read as yes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["hallusion_answer", "hallusion_metrics", "question_key", "figure_key", "pair_key"]


def hallusion_answer(prediction: str) -> str:
    """The judge-free reading: "1" (yes) when "yes" occurs in the lower-cased prediction, else "0"."""
    return "1" if prediction.lower().find("yes") != -1 else "0"


def _key(row: Mapping[str, object], fields: Sequence[str]) -> str:
    return "_".join(str(row[f]) for f in fields)


def question_key(row: Mapping[str, object]) -> str:
    return _key(row, ("category", "subcategory", "set_id", "figure_id", "question_id"))


def figure_key(row: Mapping[str, object]) -> str:
    return _key(row, ("category", "subcategory", "set_id", "figure_id"))


def pair_key(row: Mapping[str, object]) -> str:
    return _key(row, ("category", "subcategory", "set_id", "question_id"))


def _all_right(groups: dict[str, list[bool]]) -> tuple[int, int]:
    return sum(1 for v in groups.values() if all(v)), len(groups)


def hallusion_metrics(rows: Sequence[Mapping[str, object]], correct: Sequence[bool]) -> dict[str, float | int]:
    """aAcc, fAcc, qAcc (percent, rounded to 4 places as lmms-eval rounds them) and the counts behind them, from
    the rows' HallusionBench keys (category, subcategory, set_id, figure_id, question_id) and each row's
    verdict."""
    figures: dict[str, list[bool]] = {}
    pairs: dict[str, list[bool]] = {}
    for row, ok in zip(rows, correct):
        pairs.setdefault(pair_key(row), []).append(bool(ok))
        if not (row["category"] == "VS" and str(row["figure_id"]) == "0"):  # no figure
            figures.setdefault(figure_key(row), []).append(bool(ok))
    n = len(rows)
    right = sum(bool(c) for c in correct)
    f_right, f_total = _all_right(figures)
    q_right, q_total = _all_right(pairs)

    def pct(c: int, t: int) -> float:
        return round(100 * c / t, 4) if t else 0.0

    return {"aAcc": pct(right, n), "fAcc": pct(f_right, f_total), "qAcc": pct(q_right, q_total),
            "questions": n, "figures": f_total, "question_pairs": q_total}  # fmt: skip
