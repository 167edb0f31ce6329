"""Readers for the perception benchmarks papers report most (MMBench, MMStar, POPE, SEED-Bench image,
ScienceQA-IMG), from their HF hub parquet exports, prompting as lmms-eval does so scores are comparable."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stitch.eval.readers.common import (
    MULTIPLE_CHOICE,
    SHORT_ANSWER,
    Sample,
    Skip,
    conversation,
    iter_parquet,
    parquet_files,
    parquet_image,
    raw_text_of,
    text_of,
)

MMSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly"
MMSTAR_REPLACED = " Please answer yes or no."
# MMBench rotations get index + k * 1e6, as MMBench's circular files number them.
_CIRCULAR_STEP = 1_000_000


def _present(value: Any) -> bool:
    """An option cell that holds text (MMBench leaves absent options as None, NaN or "nan")."""
    if not value or (isinstance(value, float) and math.isnan(value)):  # `create_options_prompt` drops falsy ones
        return False
    return str(value) != "nan"


def mmbench_prompt(question: str, hint: Any, options: dict[str, str]) -> str:
    """lmms-eval `mmbench_doc_to_text`: "[hint ]question There are several options:\\nA. ...", then "\\n" and
    the default post prompt, which itself starts with "\\n" (so a blank line before the instruction). The hint
    is left out only when it is None, NaN or "nan": an empty hint still puts a space before the question."""
    opts = "There are several options:\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    has_hint = hint is not None and not (isinstance(hint, float) and math.isnan(hint)) and hint != "nan"
    head = f"{hint} {question}" if has_hint else question
    return f"{head} {opts}\n\n{MULTIPLE_CHOICE}"


def read_mmbench(root: Path, skip: Skip) -> Iterator[Sample]:
    """MMBench (English dev): `dev-*.parquet` (index, question, hint, A-E, answer, category, L2-category, image).

    Circular evaluation: a question with n options is asked n times, the options rotated each time (VLMEvalKit's
    CircularEval); when the file already holds rotations (index >= 1e6) they are used as they are.
    """
    rows = [row for _, row in iter_parquet(parquet_files(root, "dev"))]
    has_rotations = any(int(r.get("index") or 0) >= _CIRCULAR_STEP for r in rows)
    for row in rows:
        q, answer, index = raw_text_of(row.get("question")), text_of(row.get("answer")), row.get("index")
        options = {k: str(row[k]) for k in "ABCDE" if _present(row.get(k))}
        image = parquet_image(row.get("image"), root)
        if q is None or index is None or answer not in options:
            skip("malformed row")
            continue
        if image is None:
            skip("missing image")
            continue
        index = int(index)
        meta = {"category": row.get("category"), "l2_category": row.get("L2-category"),
                "circular_group": str(index % _CIRCULAR_STEP)}  # fmt: skip
        rotations = [0] if has_rotations else range(len(options))
        letters, texts = list(options), list(options.values())
        for k in rotations:
            rotated = dict(zip(letters, texts[k:] + texts[:k]))
            correct = letters[(letters.index(answer) - k) % len(letters)]
            yield Sample(str(index + k * _CIRCULAR_STEP), [image],
                         conversation(mmbench_prompt(q, row.get("hint"), rotated)), [correct],
                         choices=list(rotated.values()), meta=meta)  # fmt: skip


def read_mmstar(root: Path, skip: Skip) -> Iterator[Sample]:
    """MMStar: `val-*.parquet` or `mmstar.parquet` (index, question with its options, image, answer,
    category, l2_category). The prompt is the question and "Answer with the option's letter from the given
    choices directly" (lmms-eval's, without a final period)."""
    for _, row in iter_parquet(parquet_files(root, "val")):
        q, answer = text_of(row.get("question")), text_of(row.get("answer"))
        image = parquet_image(row.get("image"), root)
        if q is None or answer is None or row.get("index") is None:
            skip("malformed row")
            continue
        if image is None:
            skip("missing image")
            continue
        meta = {"category": row.get("category"), "l2_category": row.get("l2_category")}
        # `mmstar_doc_to_text`: the stripped question; a non-empty post prompt first removes " Please answer yes
        # or no." wherever it stands.
        prompt = f"{q.replace(MMSTAR_REPLACED, '')}\n{MMSTAR_INSTRUCTION}"
        yield Sample(str(row["index"]), [image], conversation(prompt), [answer], meta=meta)


def read_pope(root: Path, skip: Skip) -> Iterator[Sample]:
    """POPE: `test-*.parquet` (question_id, question, answer yes/no, category = adversarial/popular/random,
    image). Prompt: the question and the short-answer instruction."""
    for _, row in iter_parquet(parquet_files(root, "test")):
        q, answer = text_of(row.get("question")), text_of(row.get("answer"))
        sid = row.get("question_id", row.get("id"))
        if q is None or sid is None or answer is None or answer.lower() not in ("yes", "no"):
            skip("malformed row")
            continue
        image = parquet_image(row.get("image"), root)
        if image is None:
            skip("missing image")
            continue
        yield Sample(str(sid), [image], conversation(f"{q}\n{SHORT_ANSWER}"), [answer.lower()],
                     meta={"split": text_of(row.get("category")) or "unknown"})  # fmt: skip


def read_seedbench(root: Path, skip: Skip) -> Iterator[Sample]:
    """SEED-Bench image questions: `test-*.parquet` (question_id, question, choice_a-d, answer, data_type,
    question_type_id, image = a list of images); video rows are left out (`video question`)."""
    for _, row in iter_parquet(parquet_files(root, "test")):
        if row.get("data_type") not in (None, "image"):
            skip("video question")
            continue
        q, answer, sid = raw_text_of(row.get("question")), text_of(row.get("answer")), row.get("question_id")
        # As released, not stripped (lmms-eval `seed_doc_to_text` formats the raw cells).
        choices = ["" if row.get(f"choice_{c}") is None else str(row.get(f"choice_{c}")) for c in "abcd"]
        if q is None or answer is None or sid is None:
            skip("malformed row")
            continue
        cells = row.get("image") if isinstance(row.get("image"), list) else [row.get("image")]
        images = [parquet_image(c, root) for c in cells]
        if not images or any(i is None for i in images):
            skip("missing image")
            continue
        prompt = q + "\n" + "\n".join(f"{c}. {t}" for c, t in zip("ABCD", choices)) + f"\n{MULTIPLE_CHOICE}"
        yield Sample(str(sid), images, conversation(prompt, len(images)), [answer], choices=choices,
                     meta={"question_type": str(row.get("question_type_id", "unknown"))})  # fmt: skip


def read_scienceqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """ScienceQA-IMG test: `test-*.parquet` (question, choices, answer index, hint, subject, image). Rows
    without an image are skipped (the IMG subset has one on every row). Prompt: "Context: <hint>\\n" when there
    is a hint, the question, "A. ..." options, and the letter instruction."""
    for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "test"))):
        q, choices, answer = raw_text_of(row.get("question")), row.get("choices"), row.get("answer")
        if q is None or not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(
                choices):  # fmt: skip
            skip("malformed row")
            continue
        image = parquet_image(row.get("image"), root)
        if image is None:
            skip("missing image")
            continue
        options = "\n".join(f"{chr(ord('A') + k)}. {c}" for k, c in enumerate(choices))
        hint = row.get("hint")
        context = f"Context: {hint}\n" if hint else ""
        yield Sample(str(row.get("id", i)), [image], conversation(f"{context}{q}\n{options}\n{MULTIPLE_CHOICE}"),
                     [chr(ord("A") + answer)], choices=[str(c) for c in choices],
                     meta={"subject": row.get("subject") or "unknown"})  # fmt: skip
