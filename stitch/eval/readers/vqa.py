"""Short-answer VQA readers: VQAv2, TextVQA, RealWorldQA, easy-vqa."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stitch.errors import DataError, StitchError
from stitch.eval.readers.common import (
    SHORT_ANSWER,
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


def short_answer_prompt(question: str) -> str:
    """lmms-eval's VQAv2 / DocVQA / InfoVQA `doc_to_text`: the question as released (not stripped), then the
    default post prompt."""
    return f"{question}\n{SHORT_ANSWER}"


def textvqa_prompt(question: str) -> str:
    """lmms-eval `textvqa_doc_to_text`: `question.capitalize()` (which also lower-cases the rest: "Nokia" becomes
    "nokia"), no OCR tokens, then the default post prompt."""
    return short_answer_prompt(question.capitalize())


def vqa_sample(sid: Any, question: Any, answers: Any, image: ImageRef | None, skip: Skip, meta=None,
               prompt: Callable[[str], str] = short_answer_prompt) -> Sample | None:  # fmt: skip
    q, refs = raw_text_of(question), raw_answers_of(answers)
    if sid is None or q is None:
        skip("no id or question")
        return None
    if not refs:
        skip("no answers")
        return None
    if image is None:
        skip("missing image")
        return None
    return Sample(str(sid), [image], conversation(prompt(q)), refs, meta=meta or {})


def read_parquet_vqa(root: Path, skip: Skip, split: str, id_key: str, group_key: str | None = None,
                     prompt: Callable[[str], str] = short_answer_prompt):  # fmt: skip
    for _, row in iter_parquet(parquet_files(root, split)):
        meta = {group_key: row.get(group_key)} if group_key and row.get(group_key) else {}
        s = vqa_sample(row.get(id_key), row.get("question"), row.get("answers"),
                        parquet_image(row.get("image"), root), skip, meta, prompt)  # fmt: skip
        if s:
            yield s


def read_vqav2(root: Path, skip: Skip) -> Iterator[Sample]:
    """VQAv2 val: the questions and annotations JSON plus the COCO images, or the parquet export."""
    if has_parquet(root):
        yield from read_parquet_vqa(root, skip, "validation", "question_id", "answer_type")
        return
    qfile = find_file(root, ["*questions*.json"], "VQAv2 questions JSON (v2_OpenEnded_mscoco_val2014_questions.json)")
    afile = find_file(root, ["*annotations*.json"], "VQAv2 annotations JSON (v2_mscoco_val2014_annotations.json)")
    qdata, adata = load_json(qfile), load_json(afile)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataError(f"{qfile}: expected an object with a 'questions' list")
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise DataError(f"{afile}: expected an object with an 'annotations' list")
    subtype = qdata.get("data_subtype", "val2014")
    base = qfile.parent
    annotations = {}
    for a in adata["annotations"]:
        if isinstance(a, dict) and "question_id" in a:
            annotations[a["question_id"]] = a
    for q in qdata["questions"]:
        if not isinstance(q, dict) or "question_id" not in q or "image_id" not in q:
            skip("malformed row")
            continue
        ann = annotations.get(q["question_id"])
        if ann is None:
            skip("no answers")
            continue
        iid = str(q["image_id"])
        # COCO 2014 names images COCO_val2014_<12-digit id>.jpg; 2017 drops the prefix.
        names = [f"COCO_{subtype}_{int(iid):012d}.jpg", f"{int(iid):012d}.jpg"] if iid.isdigit() else [iid]
        folders = [base / subtype, base / "images" / subtype, base / "images", base]
        image = first_file(folder / name for name in names for folder in folders)
        s = vqa_sample(q["question_id"], q.get("question"), ann.get("answers"), image, skip,
                        {"answer_type": ann.get("answer_type", "")})  # fmt: skip
        if s:
            yield s


def read_textvqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """TextVQA val: TextVQA_0.5.1_val.json plus train_images/ (the val images ship with train), or parquet."""
    if has_parquet(root):
        yield from read_parquet_vqa(root, skip, "validation", "question_id", prompt=textvqa_prompt)
        return
    path = find_file(root, ["TextVQA_*val*.json", "*val*.json", "*.json"], "TextVQA JSON (TextVQA_0.5.1_val.json)")
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected an object with a 'data' list")
    base = path.parent
    for i, row in enumerate(data["data"]):
        if not isinstance(row, dict) or "image_id" not in row:
            skip("malformed row")
            continue
        name = f"{row['image_id']}.jpg"
        image = first_file([base / "train_images" / name, base / "images" / name, base / "test_images" / name])
        s = vqa_sample(row.get("question_id", i), row.get("question"), row.get("answers"), image, skip,
                       prompt=textvqa_prompt)
        if s:
            yield s



def read_realworldqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """RealWorldQA: the parquet export (image, question with its own instruction, answer). The prompt is the
    stripped question, as lmms-eval's `realworldqa_doc_to_text` gives it by default (its empty post prompt
    leaves the question's own "Please answer directly ..." sentence in place)."""
    if not has_parquet(root):
        raise DataError(f"{root}: RealWorldQA is read from its parquet export (no .parquet files found)")
    for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "test"))):
        q, a = text_of(row.get("question")), text_of(row.get("answer"))
        image = parquet_image(row.get("image"), root)
        if q is None or a is None:
            skip("no question or answer")
        elif image is None:
            skip("missing image")
        else:
            yield Sample(str(row.get("id", i)), [image], conversation(q), [a])


def read_easy_vqa(root: Path | None, skip: Skip) -> Iterator[Sample]:
    """easy-vqa test split: from the installed `easy_vqa` package, or from a folder laid out like its data
    (questions.json as [question, answer, image_id] rows and images/<image_id>.png)."""
    if root is None:
        try:
            import easy_vqa
        except ImportError as e:
            raise StitchError("easy-vqa is read from the easy_vqa package: pip install easy-vqa") from e
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
        rows = list(zip(questions, answers, image_ids))
    else:
        qfile = find_file(root, ["questions.json", "test/questions.json"], "easy-vqa questions.json")
        rows = load_json(qfile)
        if not isinstance(rows, list):
            raise DataError(f"{qfile}: expected a list of [question, answer, image_id]")
        image_dir = qfile.parent / "images"
        paths = {int(p.stem): str(p) for p in image_dir.glob("*.png") if p.stem.isdigit()}
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            skip("malformed row")
            continue
        question, answer, image_id = row
        q, a = text_of(question), text_of(answer)
        if q is None or a is None:
            skip("no question or answer")
            continue
        image = paths.get(image_id) if isinstance(image_id, int) else None
        if image is None or not os.path.isfile(image):
            skip("missing image")
            continue
        yield Sample(str(i), [image], conversation(f"{q}\n{SHORT_ANSWER}"), [a])


