"""Document, chart and OCR readers: DocVQA, InfographicVQA, ChartQA, OCRBench."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stitch.errors import DataError
from stitch.eval.readers.common import (
    ImageRef,
    Sample,
    Skip,
    conversation,
    find_file,
    first_file,
    has_parquet,
    iter_parquet,
    load_json,
    parquet_files,
    parquet_image,
    raw_answers_of,
    raw_text_of,
    text_of,
)
from stitch.eval.readers.vqa import read_parquet_vqa, vqa_sample


def _read_doc_json(root: Path, skip: Skip, patterns: list[str], what: str, image_dirs: list[str]) -> Iterator[Sample]:
    path = find_file(root, patterns, what)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected an object with a 'data' list")
    base = path.parent
    for row in data["data"]:
        if not isinstance(row, dict):
            skip("malformed row")
            continue
        name = row.get("image") or row.get("image_local_name")
        if not isinstance(name, str):
            skip("malformed row")
            continue
        candidates = [base / name] + [base / d / Path(name).name for d in image_dirs]
        s = vqa_sample(row.get("questionId"), row.get("question"), row.get("answers"),
                        first_file(candidates), skip)  # fmt: skip
        if s:
            yield s


def read_docvqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """DocVQA val: val_v1.0.json (a 'data' list; 'image' is relative to the JSON) plus documents/, or parquet."""
    if has_parquet(root):
        yield from read_parquet_vqa(root, skip, "validation", "questionId")
        return
    yield from _read_doc_json(root, skip, ["val_v1.0*.json", "*val*.json", "*.json"],
                              "DocVQA JSON (val_v1.0.json)", ["documents", "images"])  # fmt: skip


def read_infovqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """InfographicVQA val: infographicVQA_val_v1.0_withQT.json plus its images folder, or parquet."""
    if has_parquet(root):
        yield from read_parquet_vqa(root, skip, "validation", "questionId")
        return
    yield from _read_doc_json(root, skip, ["infographicVQA_val*.json", "*val*.json", "*.json"],
                              "InfographicVQA JSON (infographicVQA_val_v1.0_withQT.json)",
                              ["infographicVQA_val_v1.0_images", "images"])  # fmt: skip



# lmms-eval `chartqa.yaml`'s default post prompt (not VQAv2's "single word or phrase").
CHARTQA_POST_PROMPT = "\nAnswer the question with a single word."


def read_chartqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """ChartQA test: test/test_human.json and test/test_augmented.json plus test/png/, or parquet
    (column 'type' = human_test / augmented_test). Prompt as lmms-eval's `chartqa_doc_to_text`: the question as
    released, then its post prompt."""

    def sample(sid: str, question: Any, answer: Any, image, split: str) -> Sample | None:
        q, a = raw_text_of(question), raw_text_of(answer)
        if q is None or a is None:
            skip("no question or answer")
            return None
        if image is None:
            skip("missing image")
            return None
        return Sample(sid, [image], conversation(f"{q}{CHARTQA_POST_PROMPT}"), [a], meta={"split": split})

    if has_parquet(root):
        counts: Counter = Counter()
        for _, row in iter_parquet(parquet_files(root, "test")):
            split = str(row.get("type") or "test").replace("_test", "")
            sid = f"{split}-{counts[split]}"
            counts[split] += 1
            s = sample(sid, row.get("question") or row.get("query"), row.get("answer") or row.get("label"),
                       parquet_image(row.get("image"), root), split)  # fmt: skip
            if s:
                yield s
        return
    test = root / "test" if (root / "test").is_dir() else root
    files = [(split, test / f"test_{split}.json") for split in ("human", "augmented")]
    if not any(f.is_file() for _, f in files):
        raise DataError(f"{root}: no ChartQA test_human.json / test_augmented.json (looked in {test})")
    for split, f in files:
        if not f.is_file():
            continue
        rows = load_json(f)
        if not isinstance(rows, list):
            raise DataError(f"{f}: expected a list of {{imgname, query, label}}")
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("imgname"), str):
                skip("malformed row")
                continue
            image = first_file([test / "png" / row["imgname"], test / "images" / row["imgname"]])
            s = sample(f"{split}-{i}", row.get("query"), row.get("label"), image, split)
            if s:
                yield s



def _ocr_sample(
    sid: Any, question: Any, answers: Any, category: Any, dataset: Any, image: ImageRef | None, skip: Skip
) -> Sample | None:
    q, refs = text_of(question), raw_answers_of(answers)
    if q is None or not refs or not text_of(category):
        skip("malformed row")
        return None
    if image is None:
        skip("missing image")
        return None
    meta = {"category": text_of(category), "dataset_name": text_of(dataset) or ""}
    return Sample(str(sid), [image], conversation(q), refs, meta=meta)


def read_ocrbench(root: Path, skip: Skip) -> Iterator[Sample]:
    """OCRBench: OCRBench.json plus OCRBench_Images/, or the parquet export."""
    if has_parquet(root):
        for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "test"))):
            s = _ocr_sample(row.get("id", i), row.get("question"), row.get("answer") or row.get("answers"),
                            row.get("question_type") or row.get("type"),
                            row.get("dataset") or row.get("dataset_name"),
                            parquet_image(row.get("image"), root), skip)  # fmt: skip
            if s:
                yield s
        return
    path = find_file(root, ["OCRBench.json", "*.json"], "OCRBench.json")
    rows = load_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of {{dataset_name, id, image_path, question, answers, type}}")
    base = path.parent
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
            skip("malformed row")
            continue
        rel = row["image_path"]
        image = first_file([base / "OCRBench_Images" / rel, base / rel, base.parent / "OCRBench_Images" / rel])
        s = _ocr_sample(row.get("id", i), row.get("question"), row.get("answers"), row.get("type"),
                        row.get("dataset_name"), image, skip)  # fmt: skip
        if s:
            yield s


