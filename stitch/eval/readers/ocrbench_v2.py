"""OCRBench v2 reader: the hub's parquet export (`ling99/OCRBench_v2`, the one lmms-eval 0.7.3 reads) or the
released `OCRBench_v2.json` with its image folders.

Answers are kept as released (not stripped): the reference's substring and ANLS rules see them raw. The JSON
release is turned into the export's form as lmms-eval's `upload_ocrbench_v2.py` did (dict answers written as
JSON text, numbers as strings; a text-spotting row's boxes moved to `bbox_list`).
"""

from __future__ import annotations

import json
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
)
from stitch.eval.reference_ocrbench_v2 import BUCKETS


def _serializable(answer: Any) -> Any:
    """upload_ocrbench_v2.convert_to_serializable: a dict as JSON text, an int as a string."""
    if isinstance(answer, dict):
        return json.dumps(answer, ensure_ascii=False)
    if isinstance(answer, int):
        return str(answer)
    return answer


def _box(value: Any) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        return None


def _sample(row: dict[str, Any], image: ImageRef | None, skip: Skip, fallback_id: int) -> Sample | None:
    kind, question, answers = row.get("type"), row.get("question"), row.get("answers")
    if not isinstance(kind, str) or not isinstance(question, str) or answers is None:
        skip("malformed row")
        return None
    if kind not in BUCKETS:
        skip(f"unknown type {kind!r}")
        return None
    answers = [str(_serializable(a)) for a in (answers if isinstance(answers, (list, tuple)) else [answers])]
    if not answers:
        skip("no answers")
        return None
    if image is None:
        skip("missing image")
        return None
    sid = row.get("id", fallback_id)
    meta = {"type": kind, "eval": row.get("eval") if isinstance(row.get("eval"), str) else None,
            "question": question, "bbox": _box(row.get("bbox")), "dataset_name": row.get("dataset_name") or ""}
    # ocrbench_v2_doc_to_text: the stripped question is the whole prompt.
    return Sample(str(sid), [image], conversation(question.strip()), answers, meta=meta)


def read_ocrbench_v2(root: Path, skip: Skip) -> Iterator[Sample]:
    """OCRBench v2: `test-*.parquet` (id, dataset_name, question, type, answers, image, eval, bbox, bbox_list,
    content), or `OCRBench_v2.json` ([{id, dataset_name, image_path, question, answers, type, eval, bbox,
    content}]) with the images at `image_path` beside it."""
    if has_parquet(root):
        for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "test"))):
            s = _sample(row, parquet_image(row.get("image"), root), skip, i)
            if s:
                yield s
        return
    path = find_file(root, ["OCRBench_v2.json", "*.json"], "OCRBench v2 JSON (OCRBench_v2.json)")
    rows = load_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of questions")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
            skip("malformed row")
            continue
        if row.get("type") == "text spotting en":
            row = {**row, "bbox_list": row.get("bbox"), "bbox": None}
        image = first_file([path.parent / row["image_path"], root / row["image_path"]])
        s = _sample(row, image, skip, i)
        if s:
            yield s
