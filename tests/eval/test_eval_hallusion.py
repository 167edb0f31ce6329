"""HallusionBench (image part): the reader on a parquet laid out like `lmms-lab/HallusionBench`'s export, aAcc /
fAcc / qAcc checked against lmms-eval's own `hallusion_bench` counting code, and `stitch eval` end to end."""

from __future__ import annotations

import json
import random

import pytest
from eval_fixtures import image_cell, write_parquet

from stitch.eval import runner
from stitch.eval.tasks import get_task, load_task


def _row(cat, sub, set_id, fig, q, gt, question="Is the bar for 2020 higher than 2019?", image=True):
    return {"category": cat, "subcategory": sub, "visual_input": "1" if fig != "0" or cat == "VD" else "0",
            "set_id": set_id, "figure_id": fig, "sample_note": "note", "question_id": q, "question": question,
            "gt_answer_details": "details", "gt_answer": gt, "filename": f"./{cat}/{sub}/{set_id}_{fig}.png",
            "image": image_cell() if image else None}  # fmt: skip


def test_reader_takes_the_image_split(tmp_path):
    rows = [_row("VD", "illusion", "0", "0", "0", "1", question="Is the left line longer? "),
            _row("VD", "illusion", "0", "1", "0", "0"),
            _row("VS", "chart", "3", "1", "0", "1", image=False),
            {**_row("VS", "chart", "3", "1", "1", "1"), "gt_answer": "yes"}]  # fmt: skip
    write_parquet(tmp_path / "data" / "image-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "data" / "non_image-00000-of-00001.parquet", [_row("VS", "chart", "3", "0", "0", "1")])
    data = load_task("hallusion_bench", tmp_path)
    assert [s.id for s in data.samples] == ["VD_illusion_0_0_0", "VD_illusion_0_1_0"]
    assert data.skipped == {"missing image": 1, "malformed row": 1}
    assert data.samples[0].conversation[0]["content"] == "<image>\nIs the left line longer? "
    assert data.samples[1].references == ["0"] and data.samples[0].meta["category"] == "VD"
    task = get_task("hallusionbench")
    assert task.max_new_tokens == 128 and task.prompt == "<question>"
    evaluate_hb = pytest.importorskip("lmms_eval.tasks.hallusion_bench.evaluate_hb")
    assert evaluate_hb.hb_doc_to_text(rows[0], {"pre_prompt": "", "post_prompt": ""}) == "Is the left line longer? "


def test_reader_without_an_image_split_says_so(tmp_path):
    from stitch.errors import DataError

    write_parquet(tmp_path / "data" / "non_image-00000-of-00001.parquet", [_row("VS", "chart", "3", "0", "0", "1")])
    with pytest.raises(DataError, match="no HallusionBench image split"):
        load_task("hallusionbench", tmp_path)


PREDICTIONS = ["Yes", "No", "yes, it is", "no.", "", "The eyes are open", "NO", "I cannot tell", "YES!", "nope"]


def _dataset(rng: random.Random, with_vs_control: bool) -> list[dict]:
    """Sets of figures each asked the same questions (so question pairs span figures), in VD and VS."""
    rows = []
    for cat, sub in [("VD", "illusion"), ("VD", "math"), ("VS", "chart"), ("VS", "table")]:
        for set_id in range(rng.randint(1, 3)):
            first = 0 if cat == "VD" or with_vs_control else 1
            for fig in range(first, first + rng.randint(1, 3)):
                for q in range(rng.randint(1, 3)):
                    rows.append(_row(cat, sub, str(set_id), str(fig), str(q), rng.choice("01")))
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_lmms_eval(tmp_path, seed):
    hb = pytest.importorskip("lmms_eval.tasks.hallusion_bench.utils")
    evaluate_hb = pytest.importorskip("lmms_eval.tasks.hallusion_bench.evaluate_hb")
    rng = random.Random(seed)
    rows = _dataset(rng, with_vs_control=seed == 3)
    write_parquet(tmp_path / f"image-{seed}.parquet", rows)
    data = load_task("hallusionbench", tmp_path / f"image-{seed}.parquet")
    assert len(data.samples) == len(rows)
    preds = {s.id: rng.choice(PREDICTIONS) for s in data.samples}
    summary, _ = runner.score_dataset(data, preds)

    # The reference: each row's verdict by the judge-free rule, then utils' counting as hb_aggregation_result
    # does it after its judge (correctness 1 right, 0 wrong).
    docs = []
    for s, row in zip(data.samples, rows):
        doc = {k: v for k, v in row.items() if k != "image"}
        doc["model_prediction"] = preds[s.id]
        doc["check"] = "1" if ("1" if preds[s.id].lower().find("yes") != -1 else "0") == row["gt_answer"] else "0"
        docs.append(doc)
    docs = hb.assign_correctness(docs, correctness_entry="check")
    a, f, q = hb.get_eval_all(docs, "check"), hb.get_eval_fig(docs), hb.get_eval_pair_all(docs, "check")
    want = {name: round(100 * x["correct"] / x["total"], 4) for name, x in (("aAcc", a), ("fAcc", f), ("qAcc", q))}
    got = summary["extra"]
    assert {k: got[k] for k in want} == want
    assert got["figures"] == f["total"] and got["question_pairs"] == q["total"]
    assert summary["score"] == pytest.approx(want["aAcc"], abs=1e-4)
    if seed != 3:  # no VS figure-0 controls: lmms-eval's judge-free `_intern` aggregation agrees on all three
        for name in ("aAcc", "fAcc", "qAcc"):
            intern = evaluate_hb.hb_aggregation_result_intern([dict(d) for d in docs], name)
            assert got[name] == pytest.approx(100 * intern, abs=1e-4), name


def test_stitch_eval_runs_hallusionbench_end_to_end(tmp_path):
    from stitch.checkpoint.build import stitch_build
    from stitch.cli import main

    write_parquet(tmp_path / "hb" / "data" / "image-00000-of-00001.parquet",
                  [_row("VD", "illusion", "0", "0", "0", "1"), _row("VD", "illusion", "0", "1", "0", "0")])
    ckpt = stitch_build(vision="internvit-tiny", llm="llama-tiny", out=tmp_path / "ckpt")
    out = tmp_path / "hb.json"
    argv = ["eval", str(ckpt), "--task", "hallusionbench", "--data", str(tmp_path / "hb"), "--out", str(out),
            "--max-new-tokens", "3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["task"] == "hallusionbench" and summary["samples"] == 2 and summary["generated"] == 2
    assert summary["task_version"] == "2" and summary["prompt"] == "<question>"
    assert {"aAcc", "fAcc", "qAcc"} <= set(summary["extra"]) and summary["extra"]["question_pairs"] == 1
    assert "hallusion_bench" in summary["rules"] and summary["decoding"]["max_new_tokens"] == 3
