"""HallusionBench (image part) from the HF hub export lmms-eval reads (`lmms-lab/HallusionBench`).

The export has two splits, `data/image-*.parquet` (the questions asked about a figure) and
`data/non_image-*.parquet` (VS questions asked without one); lmms-eval's `hallusion_bench_image` task, and this
reader, use only the first. Neither split name is one `parquet_files` knows, so files are chosen here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from stitch.errors import DataError
from stitch.eval.readers.common import Sample, Skip, conversation, iter_parquet, parquet_image, raw_text_of

_KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id")
_IMAGE_SPLIT = re.compile(r"^image(?:[-_.]|$)")


def hallusion_files(root: Path) -> list[Path]:
    """The image split's parquet files: `image-0000k-of-0000n.parquet` or files inside an `image/` folder
    (the hub's refs/convert/parquet layout); `non_image` files are not taken."""
    if root.is_file():
        return [root]
    files = sorted(root.rglob("*.parquet"))
    chosen = [f for f in files if any(_IMAGE_SPLIT.match(p) for p in f.relative_to(root).parts)]
    if not chosen:
        names = ", ".join(f.name for f in files[:5]) or "none"
        raise DataError(f"{root}: no HallusionBench image split (image-*.parquet) found (parquet files: {names})")
    return chosen


def read_hallusionbench(root: Path, skip: Skip) -> Iterator[Sample]:
    """HallusionBench image questions: category (VD / VS), subcategory, visual_input, set_id, figure_id,
    question_id, question, gt_answer ("1" yes / "0" no), gt_answer_details, filename, image.

    The id is `category_subcategory_set_id_figure_id_question_id`, the key lmms-eval's `get_eval_all` counts
    questions by. The prompt is the question as released (lmms-eval `hb_doc_to_text`, empty pre/post prompts).
    """
    for _, row in iter_parquet(hallusion_files(root)):
        q, gt = raw_text_of(row.get("question")), raw_text_of(row.get("gt_answer"))
        if q is None or any(row.get(k) is None for k in _KEYS) or gt is None or gt.strip() not in ("0", "1"):
            skip("malformed row")
            continue
        image = parquet_image(row.get("image"), root)
        if image is None:
            skip("missing image")
            continue
        meta = {k: str(row[k]) for k in _KEYS}
        meta["visual_input"] = str(row.get("visual_input"))
        sid = "_".join(meta[k] for k in _KEYS)
        yield Sample(sid, [image], conversation(q), [gt.strip()], meta=meta)
