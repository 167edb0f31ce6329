"""Multiple-choice readers: AI2D, MMMU (with its open questions), MathVista; prompts as lmms-eval 0.7.3's."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stitch.errors import DataError
from stitch.eval.readers.common import (
    MULTIPLE_CHOICE,
    SHORT_ANSWER,
    ImageRef,
    Sample,
    Skip,
    answers_of,
    conversation,
    find_file,
    first_file,
    has_parquet,
    iter_parquet,
    load_json,
    multiple_choice_prompt,
    parquet_files,
    parquet_image,
    raw_text_of,
    text_of,
)


def _choices(value: Any) -> list[str] | None:
    """Option texts from a list or from the string form of a Python list (MMMU's 'options' column)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
    if not isinstance(value, (list, tuple)) or not value:
        return None
    return [str(v) for v in value]


def _letter(answer: Any, n: int) -> str | None:
    """The correct option letter from a letter ("B") or a 0-based index (0, "1")."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        i = int(answer)
        return chr(ord("A") + i) if 0 <= i < n else None
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        letter = answer.strip().upper()
        return letter if ord(letter) - ord("A") < n else None
    return None


def _mc_sample(sid: str, question: Any, choices: Any, answer: Any, images: list, skip: Skip, style="dot",
               meta=None) -> Sample | None:  # fmt: skip
    # The question as released (lmms-eval's AI2D and MMMU prompts do not strip it).
    q, options = raw_text_of(question), _choices(choices)
    if q is None or options is None or len(options) > 26:
        skip("no question or options")
        return None
    letter = _letter(answer, len(options))
    if letter is None:
        skip("answer is not an option")
        return None
    if not images or any(i is None for i in images):
        skip("missing image")
        return None
    prompt = multiple_choice_prompt(q, options, style)
    return Sample(sid, images, conversation(prompt, len(images)), [letter], choices=options, meta=meta or {})


def read_ai2d(root: Path, skip: Skip) -> Iterator[Sample]:
    """AI2D test: the parquet export (question, options, answer index, image), or the original release
    (questions/*.json, images/, and optionally ai2d_test_ids.csv to keep only the test images)."""
    if has_parquet(root):
        for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "test"))):
            s = _mc_sample(str(row.get("id", i)), row.get("question"), row.get("options"), row.get("answer"),
                           [parquet_image(row.get("image"), root)], skip)  # fmt: skip
            if s:
                yield s
        return
    qdir = root / "questions"
    if not qdir.is_dir():
        raise DataError(f"{root}: no AI2D parquet files and no questions/ folder")
    keep: set[str] | None = None
    ids_file = root / "ai2d_test_ids.csv"
    if ids_file.is_file():
        keep = {line.strip().split(",")[0] for line in ids_file.read_text().splitlines() if line.strip()}
    for qfile in sorted(qdir.glob("*.json"), key=lambda p: (len(p.name), p.name)):
        image_name = qfile.name[: -len(".json")]
        if keep is not None and image_name.split(".")[0] not in keep:
            continue
        try:
            data = load_json(qfile)
            questions = data["questions"]
            assert isinstance(questions, dict)
        except (DataError, KeyError, TypeError, AssertionError):
            skip("malformed row")
            continue
        image = first_file([root / "images" / image_name])
        for text, q in questions.items():
            if not isinstance(q, dict):
                skip("malformed row")
                continue
            sid = str(q.get("questionId") or f"{image_name}-{text}")
            s = _mc_sample(sid, text, q.get("answerTexts"), q.get("correctAnswer"), [image], skip)
            if s:
                yield s


def _mmmu_answer(value: Any) -> list[str]:
    """MMMU open answers are a string, or the string form of a list of accepted answers."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
        except (ValueError, SyntaxError):
            pass
    return answers_of(value)


def read_mmmu(root: Path, skip: Skip) -> Iterator[Sample]:
    """MMMU validation: the parquet export (one folder per subject, files validation-*.parquet)."""
    if not has_parquet(root):
        raise DataError(f"{root}: MMMU is read from its parquet export (no .parquet files found)")
    for _, row in iter_parquet(parquet_files(root, "validation")):
        sid = text_of(row.get("id"))
        if sid is None:
            skip("no id or question")
            continue
        subject = re.sub(r"^(validation|dev|test)_|_\d+$", "", sid)
        images = [parquet_image(row.get(f"image_{k}"), root) for k in range(1, 8) if row.get(f"image_{k}")]
        meta = {"subject": subject, "question_type": row.get("question_type") or "multiple-choice"}
        if meta["question_type"] == "multiple-choice":
            s = _mc_sample(sid, row.get("question"), row.get("options"), row.get("answer"), images, skip,
                           style="mmmu", meta=meta)  # fmt: skip
        else:
            # The question as released: construct_prompt does not strip it.
            q, refs = raw_text_of(row.get("question")), _mmmu_answer(row.get("answer"))
            if q is None or not refs:
                skip("no question or answer")
                continue
            if not images or any(i is None for i in images):
                skip("missing image")
                continue
            # The reference compares against the answer cell as it is (a list written as a string included).
            meta["raw_answer"] = str(row.get("answer"))
            s = Sample(sid, images, conversation(f"{q}\n\n{SHORT_ANSWER}", len(images)), refs, meta=meta)
        if s:
            yield s


# lmms-eval's mathvista_testmini_format ("format-prompt" shot type): the instruction after the question.
_MATHVISTA_HINTS = {
    "integer": "Answer the question using a single integer number.",
    ("float", 1): "Answer the question using a single floating-point number with one decimal place.",
    ("float", 2): "Answer the question using a single floating-point number with two decimal places.",
    "list": "Answer the question using a Python list.",
}


def mathvista_format_prompt(question: str, unit: Any, choices: list[str] | None, qtype: str, atype: str,
                            precision: Any) -> str | None:  # fmt: skip
    """The prompt lmms-eval's `mathvista_testmini_format` renders (`create_one_query`, zero shots, shot type
    "format-prompt"): the question (and " (Unit: u)"), the options as "A. text" lines, the answer-format
    instruction, joined by newlines and stripped. None where the reference has no instruction for the type
    (a float of another precision: its code fails there)."""
    if qtype == "multi_choice":
        hint = MULTIPLE_CHOICE
    else:
        key = (atype, int(precision)) if atype == "float" and isinstance(precision, (int, float)) else atype
        hint = _MATHVISTA_HINTS.get(key)  # type: ignore[arg-type]
        if hint is None:
            return None
    text = f"{question} (Unit: {unit})" if unit else question
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices or []))
    return ("\n\n" + "\n".join(e for e in (text, options, hint) if e != "")).strip()


def _mathvista_sample(row: dict[str, Any], image: ImageRef | None, skip: Skip) -> Sample | None:
    sid, answer = text_of(row.get("pid")), text_of(row.get("answer"))
    question = row.get("question") if isinstance(row.get("question"), str) else None
    qtype, atype = row.get("question_type"), row.get("answer_type")
    if sid is None or question is None or answer is None or qtype not in ("multi_choice", "free_form"):
        skip("malformed row")
        return None
    choices = _choices(row.get("choices")) if qtype == "multi_choice" else None
    if qtype == "multi_choice" and not choices:
        skip("no question or options")
        return None
    if image is None:
        skip("missing image")
        return None
    precision = row.get("precision")
    if not (isinstance(precision, (int, float)) and precision == precision):  # None or NaN
        precision = None
    unit = row.get("unit") if isinstance(row.get("unit"), str) else ""
    prompt = mathvista_format_prompt(question, unit, choices, qtype, atype or "text", precision)
    if prompt is None:
        skip("no reference prompt for the answer type")
        return None
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    meta = {"question_type": qtype, "answer_type": atype or "text", "task": metadata.get("task", "")}
    if precision is not None:
        meta["precision"] = int(precision)
    return Sample(sid, [image], conversation(prompt), [answer], choices=choices, meta=meta)


def read_mathvista(root: Path, skip: Skip) -> Iterator[Sample]:
    """MathVista testmini: the parquet export (testmini-*.parquet), or annot_testmini.json / testmini.json
    with images/. Prompted as lmms-eval's `mathvista_testmini_format` (`mathvista_format_prompt`)."""
    if has_parquet(root):
        for _, row in iter_parquet(parquet_files(root, "testmini")):
            image = parquet_image(row.get("decoded_image"), root) or parquet_image(row.get("image"), root)
            s = _mathvista_sample(row, image, skip)
            if s:
                yield s
        return
    path = find_file(root, ["annot_testmini.json", "testmini.json", "*.json"], "MathVista testmini JSON")
    data = load_json(path)
    rows = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected an object pid -> problem, or a list of problems")
    for row in rows:
        if not isinstance(row, dict):
            skip("malformed row")
            continue
        image = None
        if isinstance(row.get("image"), str):
            image = first_file([path.parent / row["image"], path.parent / "images" / Path(row["image"]).name])
        s = _mathvista_sample(row, image, skip)
        if s:
            yield s


