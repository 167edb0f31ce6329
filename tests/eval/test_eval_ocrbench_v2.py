"""OCRBench v2: per-sample scores against lmms-eval 0.7.3's `ocrbench_v2_process_results` for every type Stitch
scores, the unscored types reported as such, the subsets' aggregation against the reference's, and the task end
to end on a generated parquet export."""

from __future__ import annotations

import json
import random

import pytest
from eval_fixtures import image_cell, write_parquet

from stitch.eval import reference_ocrbench_v2 as O2
from stitch.eval.runner import score_dataset
from stitch.eval.scoring import SCORERS
from stitch.eval.tasks import Sample, load_task


def _reference():
    for dep in ("jieba", "nltk", "distance", "apted", "zss", "editdistance"):  # what its utils import
        pytest.importorskip(dep)
    return pytest.importorskip("lmms_eval.tasks.ocrbench_v2.utils")


WORDS = ["Hello", "hello", "world", "42", "3.5", "The", "cat", "  ", "\n", "A", "B", "b", "ß", "中国", "上海 市"]
PREDS = ["", "hello", "Hello world", "The answer is 42.", "A", "(B)", "b.", "x" * 30, "12 apples", "0", "9",
         "[10, 20, 110, 220]", "(0, 0, 50, 50) then [10, 20, 110, 220]", "[1,2,3]", "nan", "NaN",
         '{"answer": "hello", "bbox": "[10, 20, 110, 220]"}', "answer: hello\nbbox: [0, 0, 5, 5]",
         '```json\n{"name": "Tom", "date": "1 May"}\n```', "name = Tom, date = 1 May", "{'name': 'tom'}",
         "\\frac{1}{2}", "x ^ 2", "\\text{m}/s", "中 国", "上,海", "a和b", "a、b", "[1, 2]", "{}", "[]"]  # fmt: skip


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).strip() or "hello"


def _case(rng: random.Random, kind: str) -> dict:
    doc = {"type": kind, "question": rng.choice(["What is it?", "Read the text.", "请简答", "写出答案"]),
           "eval": rng.choice(["None", "multiple choice", "case sensitive"]), "bbox": None}
    if kind in ("key information extraction en", "key information mapping en"):
        doc["answers"] = [rng.choice(['{"name": "Tom", "date": "1 May"}', "{'name': ['Tom', 'tom'], 'date': '1 May'}",
                                      '"{\\"name\\": \\"Tom\\"}"', "not a dict", '{"name": ["Tom"], "n": ["1", "2"]}'])]
    elif kind == "key information extraction cn":
        doc["answers"] = [rng.choice(["{'name': 'Tom'}", "{'name': ['Tom', '汤姆'], 'date': '1 May'}"])]
    elif kind == "text counting en":
        doc["eval"] = rng.choice(["exact match", "regression"])
        doc["answers"] = [rng.choice(["12", "9", "1", "40"])]
    elif kind == "text grounding en":
        doc["answers"] = [str(v) for v in rng.choice([[10, 20, 110, 220], [0, 0, 50, 50], [5, 5, 6, 6]])]
    elif kind == "VQA with position en":
        doc["answers"], doc["bbox"] = [rng.choice(["hello", "Hello world"])], [10, 20, 110, 220]
    elif kind in ("formula recognition en", "formula recognition cn", "handwritten answer extraction cn"):
        doc["answers"] = [rng.choice(["\\frac{1}{2}", "x^2", "m/s", "中国", "ab", "a"])]
    elif doc["eval"] == "multiple choice":
        doc["answers"] = [rng.choice(["A", "B", "b"])]
    else:
        doc["answers"] = [_text(rng, rng.choice([1, 2, 5, 7])) for _ in range(rng.choice([1, 2]))]
    return doc


def _prediction(rng: random.Random, doc: dict) -> str:
    """From the pool, random words, or a variant of an answer (as is, re-cased, in a sentence, with a typo, as
    a JSON answer), so that both full, partial and zero scores occur."""
    r = rng.random()
    if r < 0.35:
        return rng.choice(PREDS)
    if r < 0.5:
        return _text(rng, rng.choice([1, 3, 6]))
    answer = rng.choice(doc["answers"])
    variants = [answer, answer.upper(), answer.lower(), f"The answer is {answer}.", answer[:-1] + "x",
                answer.replace(" ", ""), f' {answer} \n', json.dumps({"answer": answer, "bbox": "[10, 20, 60, 220]"}),
                "[" + ", ".join(doc["answers"]) + "]", answer.replace("'", '"')]  # fmt: skip
    return rng.choice(variants)


def test_scored_types_match_the_reference_per_sample():
    ref = _reference()
    rng = random.Random(0)
    seen: dict[str, int] = {}
    for kind in sorted(O2.SCORED):
        for _ in range(60):
            doc = _case(rng, kind)
            pred = _prediction(rng, doc)
            got = O2.ocrbench_v2_score(pred, dict(doc, answers=list(doc["answers"])))
            if got is None:  # handwritten short-answer questions: page-OCR metrics
                assert kind == "handwritten answer extraction cn" and O2.HANDWRITTEN_SHORT_ANSWER in doc["question"]
                continue
            try:
                want = ref.ocrbench_v2_process_results(dict(doc, answers=list(doc["answers"])), [pred])
            except Exception:  # noqa: BLE001 - the reference raises on this sample; Stitch's scorer reports 0
                judged = SCORERS["ocrbench_v2"].judge(_sample(doc), pred)
                assert (judged.score, judged.status) == (0.0, "unparsable"), (kind, doc, pred)
                continue
            assert got == pytest.approx(want["ocrbench_v2_accuracy"]["score"], abs=1e-12), (kind, doc, pred)
            seen[kind] = seen.get(kind, 0) + 1
    assert set(seen) == O2.SCORED and min(seen.values()) >= 25  # every type exercised, mostly scored


def _sample(doc: dict, sid: str = "0") -> Sample:
    meta = {k: doc[k] for k in ("type", "question", "eval", "bbox")}
    return Sample(sid, ["img"], [{"role": "user", "content": "<image>\nq"}], list(doc["answers"]), meta=meta)


def test_every_reference_type_is_bucketed_as_the_reference_does_and_unscored_ones_say_why():
    ref = _reference()
    for kind, bucket in O2.BUCKETS.items():
        _, buckets = ref._fill_score_buckets([{"question_type": kind, "score": 1}])
        assert buckets[bucket] == [1], kind
    for kind in O2.UNSCORED:
        judged = SCORERS["ocrbench_v2"].judge(_sample({"type": kind, "question": "q", "eval": None, "bbox": None,
                                                       "answers": ["x"]}), "x")  # fmt: skip
        assert judged.status == "unscored" and O2.unscored_reason(kind)
    assert (len(O2.BUCKETS), len(O2.SCORED), len(O2.UNSCORED)) == (30, 20, 10)  # the 30 types utils.py buckets


def test_subset_means_match_the_reference_aggregation():
    ref = _reference()
    rng = random.Random(1)
    rows = [(rng.choice(sorted(O2.BUCKETS)), rng.random()) for _ in range(300)]
    _, buckets = ref._fill_score_buckets([{"question_type": k, "score": s} for k, s in rows])
    means = O2.subset_means(rows)
    en = ref.calculate_average_score(ref.ENGLISH_TASKS, buckets)
    cn = ref.calculate_average_score(ref.CHINESE_TASKS, buckets)
    assert means["en"] == pytest.approx(en) and means["cn"] == pytest.approx(cn)
    n_en = sum(len(buckets[t]) for t in ref.ENGLISH_TASKS)
    assert means["final"] == pytest.approx((en * n_en + cn * (len(rows) - n_en)) / len(rows))


def test_ocrbench_v2_end_to_end_on_a_parquet_export(tmp_path):
    rows = [
        {"id": 0, "dataset_name": "a", "question": " What is written? ", "type": "text recognition en",
         "answers": ["Hello"], "eval": "None", "bbox": None, "bbox_list": None, "content": None},
        {"id": 1, "dataset_name": "b", "question": "Which option?", "type": "science QA en", "answers": ["B"],
         "eval": "multiple choice", "bbox": None, "bbox_list": None, "content": None},
        {"id": 2, "dataset_name": "c", "question": "Where is the word?", "type": "text grounding en",
         "answers": ["10", "20", "110", "220"], "eval": "None", "bbox": None, "bbox_list": None, "content": None},
        {"id": 3, "dataset_name": "d", "question": "Read the whole page.", "type": "full-page OCR en",
         "answers": ["a long page"], "eval": "None", "bbox": None, "bbox_list": None, "content": None},
        {"id": 4, "dataset_name": "e", "question": "q", "type": "no such type", "answers": ["x"], "eval": "None",
         "bbox": None, "bbox_list": None, "content": None},
        {"id": 5, "dataset_name": "f", "question": "识别", "type": "cognition VQA cn", "answers": ["上海"],
         "eval": "None", "bbox": None, "bbox_list": None, "content": None},
    ]  # fmt: skip
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [{**r, "image": image_cell()} for r in rows])
    data = load_task("ocrbench-v2", tmp_path)
    assert [s.id for s in data.samples] == ["0", "1", "2", "3", "5"]
    assert data.skipped == {"unknown type 'no such type'": 1}
    assert data.samples[0].conversation[0]["content"] == "<image>\nWhat is written?"
    preds = {"0": "It says hello.", "1": "(B)", "2": "[10, 20, 60, 220]", "3": "a long page", "5": "上 海"}
    summary, details = score_dataset(data, preds)
    # 1 + 1 + IoU 0.5 + 1 over the four scored samples; the full-page OCR one is unscored and left out.
    assert summary["score"] == pytest.approx(100 * 3.5 / 4) and summary["samples"] == 5
    extra = summary["extra"]
    assert extra["complete"] is False and extra["unscored"]["full-page OCR en"]["samples"] == 1
    assert extra["en_samples"] == 3 and extra["cn_samples"] == 1 and extra["cn"] == 1.0
    assert extra["by_type"]["text grounding en"] == {"score": 0.5, "samples": 1}
    assert {d["id"]: d["status"] for d in details}["3"] == "unscored"
    assert json.dumps(summary)  # serialisable as the summary file
