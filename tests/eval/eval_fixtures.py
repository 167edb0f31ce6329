"""Helpers that write tiny benchmark releases into tmp_path, in each benchmark's own file layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image


def png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def png_bytes(color=(30, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def image_cell(color=(30, 200, 30)) -> dict:
    """An HF `datasets` Image cell as its parquet export stores it."""
    return {"bytes": png_bytes(color), "path": None}
