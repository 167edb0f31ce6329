"""Readers: each benchmark's released layout in, samples with prompts out, bad rows skipped and counted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from eval_fixtures import image_cell, png, write_json, write_parquet

from stitch.errors import DataError, StitchError
from stitch.eval import tasks as t


def test_every_task_is_registered_with_a_known_metric():
    assert set(t.TASKS) >= {"vqav2", "textvqa", "docvqa", "infovqa", "chartqa", "ai2d", "mmmu", "mathvista",
                            "ocrbench", "coco", "realworldqa", "easy-vqa", "mmbench", "mmstar", "pope", "seedbench",
                            "scienceqa", "mvbench", "videomme", "motionbench", "physgame",
                            "hallusionbench"}  # fmt: skip
    assert t.get_task("spdocvqa").name == "docvqa"
    assert all(task.metric in t.METRICS for task in t.TASKS.values())
    assert t.get_task("VQA").name == "vqav2" and t.get_task("easy_vqa").name == "easy-vqa"
    with pytest.raises(StitchError, match="unknown task 'nope'"):
        t.get_task("nope")


def test_data_is_required_except_for_easy_vqa(tmp_path):
    with pytest.raises(StitchError, match="needs --data"):
        t.load_task("textvqa", None)
    with pytest.raises(DataError, match="no such file"):
        t.load_task("textvqa", tmp_path / "absent")


def test_vqav2_json(vqav2_dir):
    data = t.load_task("vqav2", vqav2_dir)
    assert [s.id for s in data.samples] == ["10", "20"]
    s = data.samples[0]
    assert s.conversation == [
        {"role": "user", "content": "<image>\nWhat color is it?\nAnswer the question using a single word or phrase."}
    ]
    assert s.references == ["red"] * 10 and s.meta == {"answer_type": "other"}
    assert Path(s.images[0]).name == "COCO_val2014_000000000001.jpg"
    assert data.skipped == {"missing image": 1, "no answers": 1, "malformed row": 1}
    assert s.prompt == "What color is it?\nAnswer the question using a single word or phrase."


def test_limit_stops_after_usable_samples(vqav2_dir):
    assert [s.id for s in t.load_task("vqav2", vqav2_dir, limit=1).samples] == ["10"]


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "TextVQA_0.5.1_val.json").write_text("{not json")
    with pytest.raises(DataError, match="TextVQA_0.5.1_val.json: not valid JSON"):
        t.load_task("textvqa", tmp_path)
    write_json(tmp_path / "TextVQA_0.5.1_val.json", [1, 2])
    with pytest.raises(DataError, match="'data' list"):
        t.load_task("textvqa", tmp_path)


def test_textvqa_json(tmp_path):
    png(tmp_path / "train_images" / "abc.jpg")
    rows = [
        {"question_id": 1, "image_id": "abc", "question": "what brand?", "answers": ["nokia"] * 10},
        {"question_id": 2, "image_id": "zzz", "question": "what?", "answers": ["x"] * 10},  # no image
        {"question_id": 3, "image_id": "abc", "question": "", "answers": ["x"] * 10},  # no question
        {"question_id": 4, "image_id": "abc", "question": "which?", "answers": []},  # no answers
        "not a row",
    ]
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": rows})
    data = t.load_task("textvqa", tmp_path)
    assert [s.id for s in data.samples] == ["1"]
    assert data.skipped == {"missing image": 1, "no id or question": 1, "no answers": 1, "malformed row": 1}


def test_docvqa_and_infovqa_json(tmp_path):
    png(tmp_path / "doc" / "documents" / "p1.png")
    write_json(tmp_path / "doc" / "val_v1.0.json", {"dataset_name": "docvqa", "data": [
        {"questionId": 7, "question": "What is the date?", "image": "documents/p1.png", "answers": ["1 May", "May 1"]},
        {"questionId": 8, "question": "Total?", "image": "documents/p2.png", "answers": ["5"]},
    ]})  # fmt: skip
    data = t.load_task("docvqa", tmp_path / "doc")
    assert [(s.id, s.references) for s in data.samples] == [("7", ["1 May", "May 1"])]
    assert data.skipped == {"missing image": 1}

    png(tmp_path / "info" / "infographicVQA_val_v1.0_images" / "i1.jpeg")
    write_json(tmp_path / "info" / "infographicVQA_val_v1.0_withQT.json", {"data": [
        {"questionId": 65, "question": "How many?", "image_local_name": "i1.jpeg", "answers": ["3"]},
    ]})  # fmt: skip
    assert [s.id for s in t.load_task("infovqa", tmp_path / "info").samples] == ["65"]


def test_chartqa_json(tmp_path):
    png(tmp_path / "test" / "png" / "c1.png")
    write_json(tmp_path / "test" / "test_human.json", [{"imgname": "c1.png", "query": "Max?", "label": "12"}])
    write_json(tmp_path / "test" / "test_augmented.json", [
        {"imgname": "c1.png", "query": "Min?", "label": "-3"},
        {"imgname": "c9.png", "query": "Gone?", "label": "1"},
        {"query": "no image name", "label": "1"},
    ])  # fmt: skip
    data = t.load_task("chartqa", tmp_path)
    assert [(s.id, s.references, s.meta["split"]) for s in data.samples] == [
        ("human-0", ["12"], "human"),
        ("augmented-0", ["-3"], "augmented"),
    ]
    assert data.skipped == {"missing image": 1, "malformed row": 1}


def test_ocrbench_json(tmp_path):
    png(tmp_path / "OCRBench_Images" / "IIIT5K" / "a.png")
    write_json(tmp_path / "OCRBench.json", [
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/a.png", "question": "what is written in the image?",
         "answers": ["CHINA"], "type": "Regular Text Recognition"},
        {"dataset_name": "IIIT5K", "id": 1, "image_path": "IIIT5K/b.png", "question": "what?", "answers": "x",
         "type": "Regular Text Recognition"},
        {"dataset_name": "IIIT5K", "id": 2, "image_path": "IIIT5K/a.png", "question": "what?", "answers": ["x"]},
    ])  # fmt: skip
    data = t.load_task("ocrbench", tmp_path)
    s = data.samples[0]
    assert (s.id, s.references, s.meta) == ("0", ["CHINA"], {"category": "Regular Text Recognition",
                                                             "dataset_name": "IIIT5K"})  # fmt: skip
    assert s.conversation[0]["content"] == "<image>\nwhat is written in the image?"
    assert data.skipped == {"missing image": 1, "malformed row": 1}


def test_coco_karpathy(coco_dir):
    data = t.load_task("coco", coco_dir)
    assert [s.id for s in data.samples] == ["1", "2"]
    assert data.samples[0].references == ["A cat sat.", "A cat sitting."]
    # Karpathy's split is prompted as lmms-eval's coco_karpathy_test
    assert data.samples[0].conversation[0]["content"] == "<image>\nDescribe the image briefly."
    assert data.skipped == {"missing image": 1}


def test_coco_official_captions_and_lavis(tmp_path):
    png(tmp_path / "val2014" / "COCO_val2014_000000000005.jpg")
    write_json(tmp_path / "annotations" / "captions_val2014.json", {
        "images": [{"id": 5, "file_name": "COCO_val2014_000000000005.jpg"}, {"id": 6, "file_name": "none.jpg"}],
        "annotations": [{"image_id": 5, "caption": "a bus"}, {"image_id": 5, "caption": "a red bus"},
                        {"image_id": 6, "caption": "gone"}, {"caption": "no image id"}],
    })  # fmt: skip
    data = t.load_task("coco", tmp_path)
    assert [(s.id, s.references) for s in data.samples] == [("5", ["a bus", "a red bus"])]
    assert data.skipped == {"malformed row": 1, "missing image": 1}

    lavis = tmp_path / "lavis"
    png(lavis / "val2014" / "COCO_val2014_000000000009.jpg")
    write_json(lavis / "coco_karpathy_test.json", [{"image": "val2014/COCO_val2014_000000000009.jpg",
                                                     "caption": ["one", "two"]}])  # fmt: skip
    assert [s.id for s in t.load_task("coco", lavis).samples] == ["9"]


def test_ai2d_original_release(tmp_path):
    png(tmp_path / "images" / "0.png")
    write_json(tmp_path / "questions" / "0.png.json", {"imageName": "0.png", "questions": {
        "Which stage is shown?": {"answerTexts": ["egg", "larva", "pupa", "adult"], "correctAnswer": 2,
                                  "abcLabel": False, "questionId": "0.png-0"},
        "Bad answer?": {"answerTexts": ["a", "b"], "correctAnswer": 5, "questionId": "0.png-1"},
    }})  # fmt: skip
    png(tmp_path / "images" / "1.png")
    write_json(tmp_path / "questions" / "1.png.json", {"questions": {"Only in train?": {
        "answerTexts": ["a", "b"], "correctAnswer": 0, "questionId": "1.png-0"}}})  # fmt: skip
    (tmp_path / "ai2d_test_ids.csv").write_text("0\n")
    data = t.load_task("ai2d", tmp_path)
    [s] = data.samples
    assert (s.id, s.references, s.choices) == ("0.png-0", ["C"], ["egg", "larva", "pupa", "adult"])
    assert s.conversation[0]["content"] == (
        "<image>\nWhich stage is shown?\nA. egg\nB. larva\nC. pupa\nD. adult\n" + t.MULTIPLE_CHOICE
    )
    assert data.skipped == {"answer is not an option": 1}


def test_easy_vqa_from_the_package():
    data = t.load_task("easy-vqa", None, limit=3)
    assert len(data.samples) == 3 and not data.skipped
    s = data.samples[0]
    assert s.id == "0" and Path(s.images[0]).is_file()
    assert s.references[0] in {"circle", "rectangle", "triangle", "red", "green", "blue", "yes", "no", "teal",
                               "black", "gray", "yellow", "brown"}  # fmt: skip
    assert s.conversation[0]["content"].endswith(t.SHORT_ANSWER)
    assert t.open_image(s.images[0]).mode == "RGB"


def test_easy_vqa_from_a_folder(tmp_path):
    png(tmp_path / "images" / "0.png")
    write_json(tmp_path / "questions.json", [["what shape?", "circle", 0], ["what color?", "red", 7], ["bad"]])
    data = t.load_task("easy-vqa", tmp_path)
    assert [s.id for s in data.samples] == ["0"]
    assert data.skipped == {"missing image": 1, "malformed row": 1}


# ------------------------------------------------------------------------------------------------ parquet


def test_mmmu_parquet(tmp_path):
    rows = [
        {"id": "validation_Art_1", "question": "<image 1> Which style?", "options": "['Baroque', 'Gothic']",
         "answer": "B", "question_type": "multiple-choice", "image_1": image_cell(), "image_2": image_cell()},
        {"id": "validation_Math_2", "question": "<image 1> x = ?", "options": "[]", "answer": "['2', '2.0']",
         "question_type": "open", "image_1": image_cell(), "image_2": None},
        {"id": "validation_Art_3", "question": "Which?", "options": "not a list", "answer": "A",
         "question_type": "multiple-choice", "image_1": image_cell(), "image_2": None},
        {"id": "validation_Art_4", "question": "Which?", "options": "['a', 'b']", "answer": "C",
         "question_type": "multiple-choice", "image_1": image_cell(), "image_2": None},
        {"id": "validation_Art_5", "question": "Which?", "options": "['a', 'b']", "answer": "A",
         "question_type": "multiple-choice", "image_1": {"bytes": None, "path": "gone.png"}, "image_2": None},
    ]  # fmt: skip
    write_parquet(tmp_path / "Art" / "validation-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "Art" / "dev-00000-of-00001.parquet", rows[:1])
    write_parquet(tmp_path / "Art" / "test-00000-of-00001.parquet", rows[:1])
    data = t.load_task("mmmu", tmp_path)
    assert [s.id for s in data.samples] == ["validation_Art_1", "validation_Math_2"]
    mc, open_q = data.samples
    assert len(mc.images) == 2 and mc.conversation[0]["content"].startswith("<image>\n<image>\n<image 1> Which")
    assert "\nA. Baroque\nB. Gothic\n\n" + t.MULTIPLE_CHOICE in mc.conversation[0]["content"]
    assert mc.references == ["B"] and mc.meta == {"subject": "Art", "question_type": "multiple-choice"}
    assert open_q.references == ["2", "2.0"] and open_q.choices is None and open_q.meta["subject"] == "Math"
    assert data.skipped == {"no question or options": 1, "answer is not an option": 1, "missing image": 1}
    assert t.open_image(mc.images[0]).size == (8, 8)


def test_mathvista_parquet(tmp_path):
    rows = [
        {"pid": "1", "question": "Angle?", "query": "Hint: ...\nQuestion: Angle?\nChoices:\n(A) 145°\n(B) 155°",
         "choices": ["145°", "155°"], "answer": "145°", "question_type": "multi_choice", "answer_type": "text",
         "precision": None, "decoded_image": image_cell(), "image": "images/1.jpg",
         "metadata": {"task": "geometry problem solving"}},
        {"pid": "2", "question": "Length?", "query": "Question: Length?", "choices": None, "answer": "1.5",
         "question_type": "free_form", "answer_type": "float", "precision": 1.0, "decoded_image": image_cell(),
         "image": "images/2.jpg", "metadata": {"task": "figure question answering"}},
        {"pid": "3", "question": "?", "query": "?", "choices": None, "answer": "1", "question_type": "weird",
         "answer_type": "integer", "precision": None, "decoded_image": image_cell(), "image": "x",
         "metadata": {"task": ""}},
    ]  # fmt: skip
    write_parquet(tmp_path / "data" / "testmini-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows[:1])
    data = t.load_task("mathvista", tmp_path)
    a, b = data.samples
    # mathvista_testmini_format's prompt (not the `query` field; tests/eval/test_eval_prompt_parity.py)
    assert a.conversation[0]["content"] == ("<image>\nAngle?\nA. 145°\nB. 155°\nAnswer with the option's letter from "
                                            "the given choices directly.")
    assert b.conversation[0]["content"] == ("<image>\nLength?\nAnswer the question using a single floating-point "
                                            "number with one decimal place.")
    assert a.choices == ["145°", "155°"] and a.meta["task"] == "geometry problem solving"
    assert b.meta == {"question_type": "free_form", "answer_type": "float", "task": "figure question answering",
                      "precision": 1}  # fmt: skip
    assert data.skipped == {"malformed row": 1}


def test_realworldqa_ai2d_chartqa_docvqa_ocrbench_parquet(tmp_path):
    write_parquet(tmp_path / "rwqa" / "data" / "test-00000-of-00001.parquet", [
        {"image": image_cell(), "question": "Which is closer?\nA. car\nB. tree\nPlease answer directly.",
         "answer": "A"},
        {"image": None, "question": "Q?", "answer": "B"},
    ])  # fmt: skip
    data = t.load_task("realworldqa", tmp_path / "rwqa")
    assert [(s.id, s.references) for s in data.samples] == [("0", ["A"])] and data.skipped == {"missing image": 1}
    assert data.samples[0].conversation[0]["content"].endswith("Please answer directly.")

    write_parquet(tmp_path / "ai2d" / "data" / "test-00000-of-00001.parquet", [
        {"question": "Which?", "options": ["x", "y", "z"], "answer": "1", "image": image_cell()},
    ])  # fmt: skip
    [s] = t.load_task("ai2d", tmp_path / "ai2d").samples
    assert s.references == ["B"] and s.choices == ["x", "y", "z"]

    write_parquet(tmp_path / "chart" / "data" / "test-00000-of-00001.parquet", [
        {"type": "human_test", "question": "Max?", "answer": "5", "image": image_cell()},
        {"type": "augmented_test", "question": "Min?", "answer": "1", "image": image_cell()},
        {"type": "human_test", "question": "Mid?", "answer": "3", "image": image_cell()},
    ])  # fmt: skip
    ids = [(s.id, s.meta["split"]) for s in t.load_task("chartqa", tmp_path / "chart").samples]
    assert ids == [("human-0", "human"), ("augmented-0", "augmented"), ("human-1", "human")]

    write_parquet(tmp_path / "doc" / "DocVQA" / "validation-00000-of-00001.parquet", [
        {"questionId": "q1", "question": "Date?", "answers": ["1 May"], "image": image_cell()},
    ])  # fmt: skip
    write_parquet(tmp_path / "doc" / "DocVQA" / "test-00000-of-00001.parquet", [
        {"questionId": "t1", "question": "Date?", "answers": None, "image": image_cell()},
    ])  # fmt: skip
    assert [s.id for s in t.load_task("docvqa", tmp_path / "doc").samples] == ["q1"]

    write_parquet(tmp_path / "ocr" / "test-00000-of-00001.parquet", [
        {"dataset": "HME100k", "question": "Write the expression", "question_type":
         "Handwritten Mathematical Expression Recognition", "answer": ["x^{2}"], "image": image_cell()},
    ])  # fmt: skip
    [s] = t.load_task("ocrbench", tmp_path / "ocr").samples
    assert s.meta == {"category": "Handwritten Mathematical Expression Recognition", "dataset_name": "HME100k"}


def test_parquet_split_selection(tmp_path):
    write_parquet(tmp_path / "train-00000-of-00001.parquet", [{"x": 1}])
    with pytest.raises(DataError, match="no 'validation' parquet files"):
        t.parquet_files(tmp_path, "validation")
    single = write_parquet(tmp_path / "other" / "anything.parquet", [{"x": 1}])
    assert t.parquet_files(single, "validation") == [single]
    assert t.parquet_files(tmp_path / "other", "validation") == [single]  # no split named: all files


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "validation-0.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(StitchError, match="pip install pyarrow"):
        t.load_task("textvqa", tmp_path)


def test_damaged_parquet_names_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "validation-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="validation-0.parquet: not a readable parquet file"):
        t.load_task("textvqa", tmp_path)
