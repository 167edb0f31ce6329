"""MMBench (circular), MMStar, POPE, SEED-Bench, ScienceQA-IMG: readers on small parquet files laid out like the
HF hub exports, prompts as lmms-eval writes them, and answer reading checked per sample against lmms-eval."""

from __future__ import annotations

import random

import pytest
from eval_fixtures import image_cell, write_parquet

from stitch.eval import reference_choice as C
from stitch.eval import runner
from stitch.eval.tasks import load_task


def test_mmbench_circular(tmp_path):
    rows = [
        {"index": 0, "question": "What is it?", "hint": None, "A": "cat", "B": "dog", "C": "bird", "D": None,
         "answer": "B", "category": "recognition", "L2-category": "perception", "image": image_cell()},
        {"index": 1, "question": "Colour?", "hint": "Look closely.", "A": "red", "B": "blue", "C": None, "D": None,
         "answer": "A", "category": "attribute", "L2-category": "perception", "image": image_cell()},
        {"index": 2, "question": "Bad", "hint": None, "A": "x", "B": "y", "answer": "D", "category": "c",
         "L2-category": "p", "image": image_cell()},
    ]  # fmt: skip
    write_parquet(tmp_path / "en" / "dev-00000-of-00001.parquet", rows)
    data = load_task("mmbench", tmp_path)
    assert data.skipped["malformed row"] == 1
    by_id = data.by_id()
    assert sorted(by_id) == ["0", "1", "1000000", "1000001", "2000000"]  # 3 + 2 rotations
    assert by_id["1"].prompt == ("Look closely. Colour? There are several options:\nA. red\nB. blue\n\n"
                                 "Answer with the option's letter from the given choices directly.")  # fmt: skip
    # Rotation 1 of question 0: options (dog, bird, cat), so the right letter moves from B to A.
    assert by_id["1000000"].choices == ["dog", "bird", "cat"] and by_id["1000000"].references == ["A"]
    assert by_id["2000000"].references == ["C"]
    preds = {"0": "B", "1000000": "A. dog", "2000000": "The answer is C", "1": "A", "1000001": "A"}
    s, _ = runner.score_dataset(data, preds)
    assert s["score"] == pytest.approx(50.0)  # question 0 right in every rotation; question 1 wrong once
    assert s["breakdown"]["recognition"]["score"] == 100.0 and s["breakdown"]["attribute"]["score"] == 0.0


def test_mmstar_pope_seed_scienceqa(tmp_path):
    write_parquet(tmp_path / "star" / "val-00000-of-00001.parquet", [
        {"index": i, "question": "Which? Options: A: x, B: y", "answer": a, "category": "math",
         "l2_category": l2, "image": image_cell()}
        for i, (a, l2) in enumerate([("A", "geometry"), ("B", "geometry"), ("A", "statistics")])
    ])  # fmt: skip
    data = load_task("mmstar", tmp_path / "star")
    assert data.samples[0].prompt.endswith("Options: A: x, B: y\nAnswer with the option's letter from the given "
                                           "choices directly")  # fmt: skip
    s, _ = runner.score_dataset(data, {"0": "A", "1": "(A)", "2": "The answer is A."})
    assert s["score"] == pytest.approx(75.0)  # macro over l2 categories: (1/2 + 1) / 2, not 2/3

    write_parquet(tmp_path / "pope" / "data" / "test-00000-of-00001.parquet", [
        {"question_id": str(i), "question": "Is there a dog in the image?", "answer": a, "category": c,
         "image": image_cell()}
        for i, (a, c) in enumerate([("yes", "random"), ("no", "random"), ("yes", "popular"), ("no", "popular")])
    ])  # fmt: skip
    data = load_task("pope", tmp_path / "pope")
    s, _ = runner.score_dataset(data, {"0": "Yes", "1": "yes", "2": "no", "3": "No."})
    # tp=1, fp=1, fn=1: precision 0.5, recall 0.5, F1 0.5; "No." is neither yes nor no.
    assert s["score"] == pytest.approx(50.0) and s["unparsable"] == 1
    assert s["extra"]["all"]["accuracy"] == 0.25 and s["extra"]["by_split"]["random"]["precision"] == 0.5
    assert s["extra"]["by_split"]["popular"]["recall"] == 0.0

    write_parquet(tmp_path / "seed" / "test-00000-of-00001.parquet", [
        {"question_id": "q1", "question": "What?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
         "choice_d": "d", "answer": "B", "data_type": "image", "question_type_id": 1, "image": [image_cell()]},
        {"question_id": "q2", "question": "Video?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
         "choice_d": "d", "answer": "A", "data_type": "video", "question_type_id": 10, "image": [image_cell()]},
    ])  # fmt: skip
    data = load_task("seedbench", tmp_path / "seed")
    assert [x.id for x in data.samples] == ["q1"] and data.skipped["video question"] == 1
    assert data.samples[0].prompt == ("What?\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from the "
                                      "given choices directly.")  # fmt: skip
    assert runner.score_dataset(data, {"q1": "b) because"})[0]["score"] == 100.0

    write_parquet(tmp_path / "sqa" / "ScienceQA-IMG" / "test-00000-of-00001.parquet", [
        {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "Think.",
         "subject": "natural science", "image": image_cell()},
        {"question": "No image?", "choices": ["a", "b"], "answer": 0, "hint": "", "subject": "x", "image": None},
    ])  # fmt: skip
    data = load_task("scienceqa", tmp_path / "sqa")
    assert data.samples[0].prompt.startswith("Context: Think.\nWhich is a mammal?\nA. frog\nB. whale\n")
    assert data.skipped["missing image"] == 1
    assert runner.score_dataset(data, {"0": "B. whale"})[0]["score"] == 100.0
    assert runner.score_dataset(data, {"0": "b. whale"})[0]["score"] == 0.0  # the reference needs a capital


POOL = ["", "A", "B", "(C)", "D.", "The answer is B", "I choose (A) then D", "A cat", "THE A", "b", "E",
        "answer: C", "C) foo", " D ", "dog", "It is a dog and a cat", "A B", "none of these", "答案是B", "yes", "No.",
        " Yes "]  # fmt: skip


def test_choice_reading_matches_lmms_eval():
    mcq = pytest.importorskip("lmms_eval.tasks._task_utils.mcq_extract")
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator
    from lmms_eval.tasks.pope.utils import pope_process_results
    from lmms_eval.tasks.scienceqa.utils import sqa_process_results
    from lmms_eval.tasks.seedbench.utils import seed_aggregation_result, seed_process_result

    evaluator = MMBench_Evaluator()
    rng = random.Random(7)
    for i in range(300):
        pred = rng.choice(POOL) + rng.choice(["", " ", ".", " dog", " B"])
        assert C.extract_mcq_answer(pred, ["A", "B", "C", "D"]) == mcq.extract_mcq_answer(pred, ["A", "B", "C", "D"])
        choices = dict(zip("ABCD", ["cat", "dog", "bird", "fish"][: rng.randint(2, 4)]))
        ref = evaluator.prefetch_answer({"prediction": pred.strip(), **choices, **{k: float("nan") for k in "ABCD"
                                                                                   if k not in choices}})  # fmt: skip
        want = ref or mcq.extract_mcq_answer(pred.strip(), sorted(choices))
        assert C.mmbench_read(pred, choices) == want, pred
        letter = rng.choice("ABCD")
        doc = {"choices": ["a", "b", "c", "d"], "answer": "ABCD".index(letter)}
        assert C.scienceqa_correct(pred, letter) == bool(sqa_process_results(doc, [pred])["exact_match"])
        r = seed_process_result({"answer": letter, "data_type": "image", "question_id": i}, [pred])["seed_all"]
        assert float(C.seed_correct(pred, letter)[0]) == seed_aggregation_result([r])
    pairs = []
    for i in range(200):
        pred, gt = rng.choice(POOL), rng.choice(["yes", "no"])
        pairs.append(pope_process_results({"question_id": i, "answer": gt}, [pred])["pope_accuracy"])
    from lmms_eval.tasks.pope import utils as pope

    got = C.pope_metrics([(p["prediction"], p["ground_truth"]) for p in pairs])
    assert got == {"accuracy": pope.pope_aggregate_accuracy(pairs), "precision": pope.pope_aggregate_precision(pairs),
                   "recall": pope.pope_aggregate_recall(pairs), "f1": pope.pope_aggregate_f1_score(pairs),
                   "yes_ratio": pope.pope_aggregate_yes_ratio(pairs)}  # fmt: skip


def test_realworldqa_scoring_matches_lmms_eval():
    """Letter answers through extract_mcq_answer, open ones (numbers, words) by the cleaned exact string."""
    ref = pytest.importorskip("lmms_eval.tasks.realworldqa.utils")
    rng = random.Random(11)
    open_pool = ["0", "2", "Downhill", "downhill.", "2..", " 2 ", "Two", "Yes", "yes.", "", "0.", "The answer is 2"]
    for _ in range(400):
        gt = rng.choice(["A", "B", "C", "D", "b", " C ", "0", "2", "Downhill", "Yes.", "No"])
        pred = rng.choice(POOL + open_pool) + rng.choice(["", " ", ".", "..", " dog", " B"])
        want = ref.realworldqa_process_results({"answer": gt}, [pred])["exact_match"]
        assert float(C.realworldqa_correct(pred, gt)[0]) == want, (pred, gt)
