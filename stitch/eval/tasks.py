"""Benchmark readers: each task reads its benchmark's released files from a local folder into `Sample`s.

A task knows three things: how to read the official release (the JSON files the benchmark's authors publish,
or the parquet export on the HF hub), the prompt customary for it, and which metric scores it. Nothing is
downloaded. Rows that cannot be used (a missing image, a row without a question or answers, a duplicate id)
are skipped and counted by reason, so `stitch eval` can say what it left out. `docs/eval.md` lists the layout
each task expects.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stitch.errors import DataError, StitchError

# An image as a reader leaves it: a file path, encoded bytes (from a parquet cell), or a PIL image.
ImageRef = Any
# How a reader reports a row it cannot use: skip("missing image").
Skip = Callable[[str], None]

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."

METRICS = (
    "vqa_accuracy",
    "anls",
    "relaxed_accuracy",
    "multiple_choice",
    "mmmu",
    "mathvista",
    "ocrbench",
    "cider",
    "exact_match",
)


@dataclass
class Sample:
    """One benchmark question, ready to prompt and to score.

    `conversation` is `[{"role": "user", "content": "<image>\\n..."}]` with one `<image>` per entry of
    `images`; `references` are the accepted answers (10 human answers for VQA, captions for COCO, the correct
    letter for multiple choice); `choices` are the option texts for multiple choice; `meta` holds what a
    metric or a breakdown needs (question type, category, precision, ...).
    """

    id: str
    images: list[ImageRef]
    conversation: list[dict[str, str]]
    references: list[str]
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user turn without its image placeholders."""
        return self.conversation[-1]["content"].replace("<image>\n", "").replace("<image>", "").strip()


@dataclass
class TaskData:
    """The usable samples of one benchmark, and how many rows were skipped for which reason."""

    task: str
    source: str
    samples: list[Sample]
    skipped: Counter = field(default_factory=Counter)

    def by_id(self) -> dict[str, Sample]:
        return {s.id: s for s in self.samples}


@dataclass(frozen=True)
class Task:
    """A benchmark: its reader, its metric, and the `meta` key its results are broken down by."""

    name: str
    title: str
    metric: str
    reader: Callable[[Path, Skip], Iterable[Sample]]
    group: str | None = None
    needs_data: bool = True
    # Enough for the customary short answers; captions, OCR transcripts and MathVista's values run longer.
    max_new_tokens: int = 16


def conversation(text: str, n_images: int = 1) -> list[dict[str, str]]:
    """A single user turn with `n_images` image placeholders before the text."""
    return [{"role": "user", "content": "<image>\n" * n_images + text}]


def multiple_choice_prompt(question: str, choices: list[str], style: str = "dot") -> str:
    """`question`, then the options lettered "A. text" (style "dot") or "(A) text" (style "paren", MMMU's),
    then the customary instruction to answer with the letter."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    fmt = "{}. {}" if style == "dot" else "({}) {}"
    options = "\n".join(fmt.format(letter, c) for letter, c in zip(letters, choices))
    return f"{question}\n{options}\n{MULTIPLE_CHOICE}"


def open_image(ref: ImageRef):
    """Decode an image reference to an RGB PIL image (paths, parquet bytes, or PIL images)."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, (bytes, bytearray)):
        image = Image.open(io.BytesIO(ref))
    else:
        image = Image.open(ref)
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------------------------
# Shared reading helpers
# ------------------------------------------------------------------------------------------------------------

_SPLIT_TOKENS = ("train", "validation", "val", "test", "testmini", "dev")


def _split_of(path: Path) -> str | None:
    """The split a parquet file belongs to, from its file or folder name ("validation-00000-of-00002")."""
    for part in reversed(path.parts):
        m = re.match(r"^(train|validation|val|testmini|test|dev)(?:[-_.]|$)", part)
        if m:
            return m.group(1)
    return None


def parquet_files(root: Path, split: str) -> list[Path]:
    """The parquet files of `split` under `root` (or `root` itself when it is a parquet file).

    HF exports name files `SPLIT-0000k-of-0000n.parquet` (sometimes inside a `SPLIT/` folder); files whose
    name says no split are taken when no file names one.
    """
    if root.is_file():
        return [root]
    files = sorted(root.rglob("*.parquet"))
    chosen = [f for f in files if _split_of(f.relative_to(root)) == split]
    if not chosen:
        chosen = [f for f in files if _split_of(f.relative_to(root)) is None]
    if not chosen:
        found = ", ".join(sorted({str(_split_of(f.relative_to(root))) for f in files}))
        raise DataError(f"{root}: no '{split}' parquet files (splits found: {found})")
    return chosen


def has_parquet(root: Path) -> bool:
    return root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet")))


def iter_parquet(files: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of parquet files as dicts, each with a "file:row N" label for messages."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise StitchError("reading the benchmark's parquet files needs pyarrow: pip install pyarrow") from e
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{f}: not a readable parquet file ({e})") from e
        row = 0
        for batch in pf.iter_batches(batch_size=64):
            for record in batch.to_pylist():
                yield f"{f}:row {row}", record
                row += 1


def parquet_image(cell: Any, base: Path) -> ImageRef | None:
    """An image cell of an HF parquet export: {"bytes": ..., "path": ...}, raw bytes, or a relative path."""
    if cell is None:
        return None
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell) if cell else None
    if isinstance(cell, str) and cell:
        for candidate in (Path(cell), base / cell):
            if candidate.is_file():
                return str(candidate)
    return None


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def find_file(root: Path, patterns: list[str], what: str) -> Path:
    """The annotation file of a release: `root` itself, or the first pattern that matches one file under it
    (validation files preferred when a pattern matches several)."""
    if root.is_file():
        return root
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder")
    for pattern in patterns:
        hits = sorted(root.glob(pattern))
        if len(hits) > 1:
            val = [h for h in hits if re.search(r"val", h.name)]
            hits = val or hits
        if hits:
            return hits[0]
    raise DataError(f"{root}: no {what} found (looked for {', '.join(patterns)})")


def first_file(candidates: Iterable[Path]) -> str | None:
    for c in candidates:
        if c.is_file():
            return str(c)
    return None


def _text(value: Any) -> str | None:
    """A non-empty string (numbers become strings), or None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _answers(value: Any) -> list[str]:
    """A list of non-empty answer strings from a list (of strings or {"answer": ...} dicts) or a string."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        value = [value]
    out = []
    for a in value:
        if isinstance(a, dict):
            a = a.get("answer")
        t = _text(a)
        if t is not None:
            out.append(t)
    return out


# ------------------------------------------------------------------------------------------------------------
# Short-answer VQA: VQAv2, TextVQA, DocVQA, InfographicVQA
# ------------------------------------------------------------------------------------------------------------


def _vqa_sample(sid: Any, question: Any, answers: Any, image: ImageRef | None, skip: Skip, meta=None) -> Sample | None:
    q, refs = _text(question), _answers(answers)
    if sid is None or q is None:
        skip("no id or question")
        return None
    if not refs:
        skip("no answers")
        return None
    if image is None:
        skip("missing image")
        return None
    return Sample(str(sid), [image], conversation(f"{q}\n{SHORT_ANSWER}"), refs, meta=meta or {})


def _read_parquet_vqa(root: Path, skip: Skip, split: str, id_key: str, group_key: str | None = None):
    for _, row in iter_parquet(parquet_files(root, split)):
        meta = {group_key: row.get(group_key)} if group_key and row.get(group_key) else {}
        s = _vqa_sample(row.get(id_key), row.get("question"), row.get("answers"),
                        parquet_image(row.get("image"), root), skip, meta)  # fmt: skip
        if s:
            yield s


def read_vqav2(root: Path, skip: Skip) -> Iterator[Sample]:
    """VQAv2 val: the questions and annotations JSON plus the COCO images, or the parquet export."""
    if has_parquet(root):
        yield from _read_parquet_vqa(root, skip, "validation", "question_id", "answer_type")
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
        s = _vqa_sample(q["question_id"], q.get("question"), ann.get("answers"), image, skip,
                        {"answer_type": ann.get("answer_type", "")})  # fmt: skip
        if s:
            yield s


def read_textvqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """TextVQA val: TextVQA_0.5.1_val.json plus train_images/ (the val images ship with train), or parquet."""
    if has_parquet(root):
        yield from _read_parquet_vqa(root, skip, "validation", "question_id")
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
        s = _vqa_sample(row.get("question_id", i), row.get("question"), row.get("answers"), image, skip)
        if s:
            yield s


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
        s = _vqa_sample(row.get("questionId"), row.get("question"), row.get("answers"),
                        first_file(candidates), skip)  # fmt: skip
        if s:
            yield s


def read_docvqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """DocVQA val: val_v1.0.json (a 'data' list; 'image' is relative to the JSON) plus documents/, or parquet."""
    if has_parquet(root):
        yield from _read_parquet_vqa(root, skip, "validation", "questionId")
        return
    yield from _read_doc_json(root, skip, ["val_v1.0*.json", "*val*.json", "*.json"],
                              "DocVQA JSON (val_v1.0.json)", ["documents", "images"])  # fmt: skip


def read_infovqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """InfographicVQA val: infographicVQA_val_v1.0_withQT.json plus its images folder, or parquet."""
    if has_parquet(root):
        yield from _read_parquet_vqa(root, skip, "validation", "questionId")
        return
    yield from _read_doc_json(root, skip, ["infographicVQA_val*.json", "*val*.json", "*.json"],
                              "InfographicVQA JSON (infographicVQA_val_v1.0_withQT.json)",
                              ["infographicVQA_val_v1.0_images", "images"])  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# ChartQA
# ------------------------------------------------------------------------------------------------------------


def read_chartqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """ChartQA test: test/test_human.json and test/test_augmented.json plus test/png/, or parquet
    (column 'type' = human_test / augmented_test)."""

    def sample(sid: str, question: Any, answer: Any, image, split: str) -> Sample | None:
        q, a = _text(question), _text(answer)
        if q is None or a is None:
            skip("no question or answer")
            return None
        if image is None:
            skip("missing image")
            return None
        return Sample(sid, [image], conversation(f"{q}\n{SHORT_ANSWER}"), [a], meta={"split": split})

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


# ------------------------------------------------------------------------------------------------------------
# Multiple choice: AI2D, MMMU; MathVista
# ------------------------------------------------------------------------------------------------------------


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
    q, options = _text(question), _choices(choices)
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
    return _answers(value)


def read_mmmu(root: Path, skip: Skip) -> Iterator[Sample]:
    """MMMU validation: the parquet export (one folder per subject, files validation-*.parquet)."""
    if not has_parquet(root):
        raise DataError(f"{root}: MMMU is read from its parquet export (no .parquet files found)")
    for _, row in iter_parquet(parquet_files(root, "validation")):
        sid = _text(row.get("id"))
        if sid is None:
            skip("no id or question")
            continue
        subject = re.sub(r"^(validation|dev|test)_|_\d+$", "", sid)
        images = [parquet_image(row.get(f"image_{k}"), root) for k in range(1, 8) if row.get(f"image_{k}")]
        meta = {"subject": subject, "question_type": row.get("question_type") or "multiple-choice"}
        if meta["question_type"] == "multiple-choice":
            s = _mc_sample(sid, row.get("question"), row.get("options"), row.get("answer"), images, skip,
                           style="paren", meta=meta)  # fmt: skip
        else:
            q, refs = _text(row.get("question")), _mmmu_answer(row.get("answer"))
            if q is None or not refs:
                skip("no question or answer")
                continue
            if not images or any(i is None for i in images):
                skip("missing image")
                continue
            s = Sample(sid, images, conversation(f"{q}\n{SHORT_ANSWER}", len(images)), refs, meta=meta)
        if s:
            yield s


def _mathvista_sample(row: dict[str, Any], image: ImageRef | None, skip: Skip) -> Sample | None:
    sid, answer = _text(row.get("pid")), _text(row.get("answer"))
    question = _text(row.get("query")) or _text(row.get("question"))
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
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    meta = {"question_type": qtype, "answer_type": atype or "text", "task": metadata.get("task", "")}
    if isinstance(precision, (int, float)) and precision == precision:  # not NaN
        meta["precision"] = int(precision)
    return Sample(sid, [image], conversation(question), [answer], choices=choices, meta=meta)


def read_mathvista(root: Path, skip: Skip) -> Iterator[Sample]:
    """MathVista testmini: the parquet export (testmini-*.parquet), or annot_testmini.json / testmini.json
    with images/. The prompt is the benchmark's own 'query' field."""
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


# ------------------------------------------------------------------------------------------------------------
# OCRBench, COCO captions, RealWorldQA, easy-vqa
# ------------------------------------------------------------------------------------------------------------


def _ocr_sample(
    sid: Any, question: Any, answers: Any, category: Any, dataset: Any, image: ImageRef | None, skip: Skip
) -> Sample | None:
    q, refs = _text(question), _answers(answers)
    if q is None or not refs or not _text(category):
        skip("malformed row")
        return None
    if image is None:
        skip("missing image")
        return None
    meta = {"category": _text(category), "dataset_name": _text(dataset) or ""}
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


def _caption_sample(sid: Any, captions: list[str], image: ImageRef | None, skip: Skip) -> Sample | None:
    if not captions:
        skip("no captions")
        return None
    if image is None:
        skip("missing image")
        return None
    return Sample(str(sid), [image], conversation(CAPTION), captions)


def read_coco(root: Path, skip: Skip) -> Iterator[Sample]:
    """COCO captions: the Karpathy test split (dataset_coco.json, or coco_karpathy_test.json) or an official
    captions_*.json, with the image folders beside it; or a parquet export with an 'answer' list column."""
    if has_parquet(root):
        for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "val"))):
            sid = row.get("question_id") or row.get("file_name") or i
            captions = _answers(row.get("answer") or row.get("captions"))
            s = _caption_sample(sid, captions, parquet_image(row.get("image"), root), skip)
            if s:
                yield s
        return
    path = find_file(root, ["dataset_coco.json", "coco_karpathy_test.json", "captions_val*.json",
                            "annotations/captions_val*.json", "*.json"], "COCO caption JSON")  # fmt: skip
    data = load_json(path)
    base = root if root.is_dir() else path.parent

    def image_file(rel: str) -> str | None:
        name = Path(rel).name
        folder = "val2014" if "val2014" in name else "val2017" if "val2017" in name else ""
        return first_file([base / rel, path.parent / rel, base / folder / name, base / "images" / name])

    if isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" not in data:
        # Karpathy's dataset_coco.json: every image with its split and sentences.
        for row in data["images"]:
            if not isinstance(row, dict) or "filename" not in row:
                skip("malformed row")
                continue
            if row.get("split") != "test":
                continue
            captions = [_text(s.get("raw")) for s in row.get("sentences", []) if isinstance(s, dict)]
            rel = f"{row.get('filepath', '')}/{row['filename']}".lstrip("/")
            s = _caption_sample(row.get("cocoid", row["filename"]), [c for c in captions if c],
                                image_file(rel), skip)  # fmt: skip
            if s:
                yield s
    elif isinstance(data, list):
        # LAVIS/BLIP coco_karpathy_test.json: [{"image": "val2014/...jpg", "caption": [...]}]
        for row in data:
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                skip("malformed row")
                continue
            s = _caption_sample(Path(row["image"]).stem.split("_")[-1].lstrip("0") or row["image"],
                                _answers(row.get("caption")), image_file(row["image"]), skip)  # fmt: skip
            if s:
                yield s
    elif isinstance(data, dict) and isinstance(data.get("annotations"), list):
        # Official captions_val2014.json: images and caption annotations joined by image_id.
        captions: dict[Any, list[str]] = {}
        for a in data["annotations"]:
            if isinstance(a, dict) and _text(a.get("caption")) and "image_id" in a:
                captions.setdefault(a["image_id"], []).append(_text(a["caption"]))
            else:
                skip("malformed row")
        for row in data.get("images", []):
            if not isinstance(row, dict) or "id" not in row or "file_name" not in row:
                skip("malformed row")
                continue
            s = _caption_sample(row["id"], captions.get(row["id"], []), image_file(row["file_name"]), skip)
            if s:
                yield s
    else:
        raise DataError(f"{path}: not a COCO caption file (Karpathy dataset_coco.json or captions_*.json)")


def read_realworldqa(root: Path, skip: Skip) -> Iterator[Sample]:
    """RealWorldQA: the parquet export (image, question with its own instruction, answer)."""
    if not has_parquet(root):
        raise DataError(f"{root}: RealWorldQA is read from its parquet export (no .parquet files found)")
    for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "test"))):
        q, a = _text(row.get("question")), _text(row.get("answer"))
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
        q, a = _text(question), _text(answer)
        if q is None or a is None:
            skip("no question or answer")
            continue
        image = paths.get(image_id) if isinstance(image_id, int) else None
        if image is None or not os.path.isfile(image):
            skip("missing image")
            continue
        yield Sample(str(i), [image], conversation(f"{q}\n{SHORT_ANSWER}"), [a])


# ------------------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("vqav2", "VQAv2 (val)", "vqa_accuracy", read_vqav2, group="answer_type"),
        Task("textvqa", "TextVQA (val)", "vqa_accuracy", read_textvqa),
        Task("docvqa", "DocVQA (val)", "anls", read_docvqa),
        Task("infovqa", "InfographicVQA (val)", "anls", read_infovqa),
        Task("chartqa", "ChartQA (test)", "relaxed_accuracy", read_chartqa, group="split"),
        Task("ai2d", "AI2D (test)", "multiple_choice", read_ai2d),
        Task("mmmu", "MMMU (val)", "mmmu", read_mmmu, group="subject"),
        Task("mathvista", "MathVista (testmini)", "mathvista", read_mathvista, group="task", max_new_tokens=64),
        Task("ocrbench", "OCRBench", "ocrbench", read_ocrbench, group="category", max_new_tokens=64),
        Task("coco", "COCO captions (Karpathy test)", "cider", read_coco, max_new_tokens=48),
        Task("realworldqa", "RealWorldQA", "exact_match", read_realworldqa),
        Task("easy-vqa", "easy-vqa (test)", "exact_match", read_easy_vqa, needs_data=False),
    ]
}
# Other spellings people type.
ALIASES = {"vqa": "vqav2", "vqa-v2": "vqav2", "text-vqa": "textvqa", "doc-vqa": "docvqa",
           "infographicvqa": "infovqa", "info-vqa": "infovqa", "chart-qa": "chartqa", "mmmu-val": "mmmu",
           "ocr-bench": "ocrbench", "coco-caption": "coco", "coco-captions": "coco", "cococaption": "coco",
           "realworld-qa": "realworldqa", "easy_vqa": "easy-vqa", "easyvqa": "easy-vqa"}  # fmt: skip


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive; common spellings accepted)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise StitchError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[key]


def load_task(name: str, data: str | Path | None, limit: int | None = None) -> TaskData:
    """Read benchmark `name` from the local path `data` (None for easy-vqa: the installed package).

    Stops after `limit` usable samples. Duplicate ids are skipped (predictions are matched by id).
    """
    task = get_task(name)
    if data is None and task.needs_data:
        raise StitchError(f"task {task.name} needs --data PATH (see docs/eval.md for the expected layout)")
    root = Path(data).expanduser() if data is not None else None
    if root is not None and not root.exists():
        raise DataError(f"{root}: no such file or folder")
    skipped: Counter = Counter()

    def skip(reason: str) -> None:
        skipped[reason] += 1

    samples: list[Sample] = []
    seen: set[str] = set()
    for s in task.reader(root, skip):
        if s.id in seen:
            skip("duplicate id")
            continue
        seen.add(s.id)
        samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    source = str(root) if root is not None else "easy_vqa package (test split)"
    return TaskData(task.name, source, samples, skipped)


__all__ = [
    "CAPTION",
    "METRICS",
    "MULTIPLE_CHOICE",
    "SHORT_ANSWER",
    "TASKS",
    "Sample",
    "Task",
    "TaskData",
    "conversation",
    "get_task",
    "load_task",
    "multiple_choice_prompt",
    "open_image",
    "parquet_files",
]
