"""Fixtures: tiny benchmark releases in tmp_path (helpers in eval_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_fixtures import png, write_json


@pytest.fixture
def vqav2_dir(tmp_path: Path) -> Path:
    root = tmp_path / "vqav2"
    png(root / "val2014" / "COCO_val2014_000000000001.jpg")
    png(root / "val2014" / "COCO_val2014_000000000002.jpg")
    questions = [
        {"image_id": 1, "question": "What color is it?", "question_id": 10},
        {"image_id": 2, "question": "How many?", "question_id": 20},
        {"image_id": 3, "question": "Where is the image?", "question_id": 30},  # image missing
        {"image_id": 1, "question": "Is there an answer?", "question_id": 40},  # no annotation
        {"question": "no ids"},  # malformed
    ]
    annotations = [
        {"question_id": 10, "image_id": 1, "answer_type": "other", "question_type": "what color",
         "answers": [{"answer": "red", "answer_id": i + 1, "answer_confidence": "yes"} for i in range(10)]},
        {"question_id": 20, "image_id": 2, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"}
                     for i, a in enumerate(["2"] * 3 + ["3"] * 7)]},
        {"question_id": 30, "image_id": 3, "answer_type": "other", "question_type": "where",
         "answers": [{"answer": "here", "answer_id": 1, "answer_confidence": "yes"}]},
    ]  # fmt: skip
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json",
               {"data_subtype": "val2014", "questions": questions})  # fmt: skip
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    return root


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    png(root / "val2014" / "COCO_val2014_000000000001.jpg")
    png(root / "val2014" / "COCO_val2014_000000000002.jpg")
    images = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": "A cat sat."}, {"raw": "A cat sitting."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "split": "test", "cocoid": 2,
         "sentences": [{"raw": "Dog runs fast."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000003.jpg", "split": "test", "cocoid": 3,
         "sentences": [{"raw": "Missing image."}]},
        {"filepath": "train2014", "filename": "x.jpg", "split": "train", "cocoid": 4,
         "sentences": [{"raw": "Training only."}]},
    ]  # fmt: skip
    write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return root
