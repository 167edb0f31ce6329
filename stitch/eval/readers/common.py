"""What every benchmark reader shares: `Sample` and `TaskData`, the customary prompts, image decoding, and the
helpers that read the released files (JSON, parquet exports) and clean their values."""

from __future__ import annotations

import io
import json
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
    videos: list[Any] = field(default_factory=list)  # video paths, one per <video> (eval/readers/video.py)

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



def conversation(text: str, n_images: int = 1) -> list[dict[str, str]]:
    """A single user turn with `n_images` image placeholders before the text."""
    return [{"role": "user", "content": "<image>\n" * n_images + text}]


def multiple_choice_prompt(question: str, choices: list[str], style: str = "dot") -> str:
    """`question`, then the options lettered "A. text" (style "dot") or "(A) text" (style "paren"),
    then the customary instruction to answer with the letter ("mmmu": "A. text" and a blank line before it, as
    lmms-eval prompts MMMU)."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    fmt = "({}) {}" if style == "paren" else "{}. {}"
    options = "\n".join(fmt.format(letter, c) for letter, c in zip(letters, choices))
    if style == "mmmu":  # lmms-eval's MMMU `construct_prompt`: a blank line before the instruction
        return f"{question}\n{options}\n\n{MULTIPLE_CHOICE}"
    return f"{question}\n{options}\n{MULTIPLE_CHOICE}"


def open_image(ref: ImageRef):
    """Decode an image reference to an RGB PIL image (paths, parquet bytes, PIL images, or a PDF's first page)."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, (bytes, bytearray)):
        image = Image.open(io.BytesIO(ref))
    elif str(ref).lower().endswith(".pdf"):  # a document page (RD-TableBench): its first page, as pdf2image renders
        try:
            from pdf2image import convert_from_path
        except ImportError as e:
            raise StitchError(f"{ref}: rendering a PDF page needs pdf2image: pip install pdf2image") from e
        image = convert_from_path(str(ref), first_page=1, last_page=1)[0]
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


def text_of(value: Any) -> str | None:
    """A non-empty string (numbers become strings), or None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def raw_text_of(value: Any) -> str | None:
    """A string as released (not stripped; numbers become strings), or None when it is blank or not text.
    Headline metrics see the raw text because the reference code does (ANLS lengths count raw spaces)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value


def raw_answers_of(value: Any) -> list[str]:
    """Answer strings as released, empty ones included (the reference scores against them: an empty human
    answer matches an empty prediction), from a list of strings or {"answer": ...} dicts, or a string.
    [] when there is no non-empty answer at all."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        value = [value]
    out = []
    for a in value:
        if isinstance(a, dict):
            a = a.get("answer")
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if isinstance(a, str):
            out.append(a)
    return out if any(a.strip() for a in out) else []


def clean_answers(answers: list[str]) -> list[str]:
    """Stitch's readings drop empty answers and surrounding whitespace."""
    return [a.strip() for a in answers if a.strip()]


def answers_of(value: Any) -> list[str]:
    """A list of non-empty answer strings from a list (of strings or {"answer": ...} dicts) or a string."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        value = [value]
    out = []
    for a in value:
        if isinstance(a, dict):
            a = a.get("answer")
        t = text_of(a)
        if t is not None:
            out.append(t)
    return out


