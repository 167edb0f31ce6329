"""Caption readers: COCO captions (the Karpathy test split, or the official captions files).

Each layout is prompted as the lmms-eval 0.7.3 task that reads the same data: Karpathy's test split as
`coco_karpathy_test` ("Describe the image briefly."), the official val captions and the hub's parquet export
(lmms-lab COCO-Caption / COCO-Caption2017) as `coco2014_cap_val` / `coco2017_cap_val` (`CAPTION`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stitch.errors import DataError
from stitch.eval.readers.common import (
    CAPTION,
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
    parquet_files,
    parquet_image,
    text_of,
)

# lmms-eval's coco_karpathy_test prompt (its doc_to_text is this literal string).
KARPATHY_CAPTION = "Describe the image briefly."


def _caption_sample(sid: Any, captions: list[str], image: ImageRef | None, skip: Skip,
                    prompt: str = CAPTION) -> Sample | None:  # fmt: skip
    if not captions:
        skip("no captions")
        return None
    if image is None:
        skip("missing image")
        return None
    return Sample(str(sid), [image], conversation(prompt), captions)


def read_coco(root: Path, skip: Skip) -> Iterator[Sample]:
    """COCO captions: the Karpathy test split (dataset_coco.json, or coco_karpathy_test.json) or an official
    captions_*.json, with the image folders beside it; or a parquet export with an 'answer' list column."""
    if has_parquet(root):
        for i, (_, row) in enumerate(iter_parquet(parquet_files(root, "val"))):
            sid = row.get("question_id") or row.get("file_name") or i
            captions = answers_of(row.get("answer") or row.get("captions"))
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
            captions = [text_of(s.get("raw")) for s in row.get("sentences", []) if isinstance(s, dict)]
            rel = f"{row.get('filepath', '')}/{row['filename']}".lstrip("/")
            s = _caption_sample(row.get("cocoid", row["filename"]), [c for c in captions if c],
                                image_file(rel), skip, KARPATHY_CAPTION)  # fmt: skip
            if s:
                yield s
    elif isinstance(data, list):
        # LAVIS/BLIP coco_karpathy_test.json: [{"image": "val2014/...jpg", "caption": [...]}]
        for row in data:
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                skip("malformed row")
                continue
            s = _caption_sample(Path(row["image"]).stem.split("_")[-1].lstrip("0") or row["image"],
                                answers_of(row.get("caption")), image_file(row["image"]), skip,
                                KARPATHY_CAPTION)  # fmt: skip
            if s:
                yield s
    elif isinstance(data, dict) and isinstance(data.get("annotations"), list):
        # Official captions_val2014.json: images and caption annotations joined by image_id.
        captions: dict[Any, list[str]] = {}
        for a in data["annotations"]:
            if isinstance(a, dict) and text_of(a.get("caption")) and "image_id" in a:
                captions.setdefault(a["image_id"], []).append(text_of(a["caption"]))
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
