"""RD-TableBench (Reducto's 1,000 human-annotated tables) from its released archive, unzipped.

The release (`reducto/rd-tablebench` on the HF hub, `rd-tablebench.zip`) holds each table's page and its
ground-truth HTML; Reducto's own scripts read `.../pdfs/<name>.pdf` and write a provider's answers to the same
path with `pdfs` replaced. This reader takes every `groundtruth/<name>.html` under the folder and the page beside
it: `images/<name>.png|.jpg|.jpeg` (pre-rendered), else `pdfs/<name>.pdf`, whose first page is rendered when the
image is opened (with pdf2image, as Reducto's GPT-4o script does).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from stitch.errors import DataError
from stitch.eval.readers.common import Sample, Skip, conversation, first_file

# Reducto's prompt for GPT-4o (providers/gpt4o.py), the one vision-language models are asked with.
TABLE_PROMPT = ("Convert the image to an HTML table. The output should begin with <table> and end with </table>. "
                "Specify rowspan and colspan attributes when they are greater than 1. Do not specify any other "
                "attributes. Only use table related HTML tags, no additional formatting is required.")  # fmt: skip


def read_rdtablebench(root: Path, skip: Skip) -> Iterator[Sample]:
    """Samples with id `<name>`, the page image, and the ground-truth HTML as the one reference."""
    truths = sorted(root.rglob("groundtruth/*.html")) if root.is_dir() else []
    if not truths:
        raise DataError(f"{root}: no RD-TableBench ground truth (groundtruth/<name>.html) found")
    can_render = importlib.util.find_spec("pdf2image") is not None
    for path in truths:
        base, name = path.parent.parent, path.stem
        image = first_file(base / "images" / f"{name}{ext}" for ext in (".png", ".jpg", ".jpeg"))
        if image is None:
            pdf = base / "pdfs" / f"{name}.pdf"
            if not pdf.is_file():
                skip("missing image")
                continue
            if not can_render:
                skip("pdf page not rendered (pip install pdf2image, or put images/<name>.png beside it)")
                continue
            image = str(pdf)
        html = path.read_text(encoding="utf-8", errors="replace")
        if "<tr" not in html.lower():
            skip("malformed row")
            continue
        yield Sample(name, [image], conversation(TABLE_PROMPT), [html])
