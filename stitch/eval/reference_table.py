"""RD-TableBench table similarity, reimplemented from Reducto's published grading rules (`grading.py`,
`convert.py` and the GPT-4o answer parsing in `parsing.py` of github.com/reductoai/rd-tablebench).

Why a reimplementation and not a cleaner metric: the benchmark's published numbers come from these rules, so
their quirks are kept: the alignment scores are accumulated in float32 matrices as there; the traceback that
sets the denominator walks back to the origin through the free leading gaps; the denominator uses the ground
truth's first-row width for every aligned row; and a prediction is cut from its first "<table>" to its first
"</table>" (whose end is `find + 8`, so a missing "</table>" cuts at character 7).

A table is a grid of strings: every `<tr>`, its `td`/`th` cells' text (stripped) repeated over their
colspan, and carried down over their rowspan; short rows padded with "". Cells are compared after removing
hyphens and all whitespace. Rows are aligned to rows (Needleman-Wunsch, free end gaps, gap -3), each pair
scored by aligning their cells (gap -1; a cell pair scores from -1 to +1 by normalised Levenshtein similarity)
plus 5; the best end score over the last row and column is divided by (aligned rows x (5 + columns)), clipped
to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from stitch.errors import StitchError
from stitch.eval.metrics import levenshtein

__all__ = ["extract_table_html", "html_to_grid", "table_similarity"]

ROW_MATCH, ROW_GAP, CELL_MATCH, CELL_MISMATCH, COL_GAP = 5, -3, 1, -1, -1
_DIAG, _UP, _LEFT = 1, 2, 3


def extract_table_html(text: str) -> str | None:
    """`parse_gpt4o_response`: the text from the first "<table>" to the first "</table>" inclusive (quirk: when
    there is no "</table>" the slice ends at character 7); None when there is no "<table>"."""
    start = text.find("<table>")
    end = text.find("</table>") + 8
    return text[start:end] if start != -1 else None


def html_to_grid(html: str) -> list[list[str]]:
    """`html_to_numpy`: the table's cells as rows of strings, spans expanded, rows padded with "".

    Raises ValueError for a rowspan/colspan that is not an integer (the reference's `int()` does).
    """
    try:
        from lxml import etree
    except ImportError as e:
        raise StitchError("RD-TableBench parses tables with lxml: pip install lxml") from e
    root = etree.HTML(html, parser=etree.HTMLParser()) if html.strip() else None
    rows: list[list[str]] = []
    carried: dict[int, list] = {}  # column -> [text, rows still to fill]

    def fill(row: list[str], col: int) -> int:
        while carried.get(col, [None, 0])[1] > 0:
            row.append(carried[col][0])
            carried[col][1] -= 1
            if carried[col][1] == 0:
                del carried[col]
            col += 1
        return col

    for tr in root.xpath("//tr") if root is not None else []:
        row: list[str] = []
        col = fill(row, 0)
        for cell in tr.xpath("td|th"):
            col = fill(row, col)
            rowspan, colspan = int(cell.get("rowspan", "1")), int(cell.get("colspan", "1"))
            text = "".join(cell.itertext()).strip()
            if rowspan > 1:
                for k in range(colspan):
                    carried[col + k] = [text, rowspan - 1]
            row.extend([text] * colspan)
            col += colspan
        fill(row, col)
        rows.append(row)
    width = max(map(len, rows)) if rows else 0
    return [r + [""] * (width - len(r)) for r in rows]


def _cell_score(a: str, b: str) -> float:
    if a == b:
        return CELL_MATCH
    longest = max(len(a), len(b))
    similarity = 1.0 - (levenshtein(a, b) / longest if longest else 0.0)
    return CELL_MISMATCH + similarity * (CELL_MATCH - CELL_MISMATCH)


def _align(m: int, n: int, pair: Callable[[int, int], float], gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Needleman-Wunsch score and traceback matrices (float32 scores, ties: diagonal, then up, then left)."""
    score = np.zeros((m + 1, n + 1), dtype=np.float32)
    trace = np.zeros((m + 1, n + 1), dtype=np.int8)
    trace[1:, 0], trace[0, 1:] = _UP, _LEFT
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            diag = score[i - 1, j - 1] + pair(i - 1, j - 1)
            up = score[i - 1, j] + gap
            left = score[i, j - 1] + gap
            best = max(diag, up, left)
            score[i, j] = best
            trace[i, j] = _DIAG if best == diag else _UP if best == up else _LEFT
    return score, trace


def _best_end(score: np.ndarray) -> tuple[int, int, np.float32]:
    """Free end gaps: the best score in the last column, then the last row, replacing the corner's only when
    strictly higher (first index on ties)."""
    m, n = score.shape[0] - 1, score.shape[1] - 1
    bi, bj, best = m, n, score[m, n]
    if score[:, n].max() > best:
        bi, best = int(score[:, n].argmax()), score[:, n].max()
    if score[m, :].max() > best:
        bi, bj, best = m, int(score[m, :].argmax()), score[m, :].max()
    return bi, bj, best


def _row_score(a: Sequence[str], b: Sequence[str]) -> np.float32:
    score, _ = _align(len(a), len(b), lambda i, j: _cell_score(a[i], b[j]), COL_GAP)
    return _best_end(score)[2]


def _normalise(cell: str) -> str:
    return "".join(cell.replace("-", "").split())


def table_similarity(truth: Sequence[Sequence[str]], prediction: Sequence[Sequence[str]]) -> float:
    """`table_similarity(ground_truth, prediction)` in [0, 1]; 0.0 for a prediction without rows (the reference
    raises there: numpy cannot vectorise over an empty array)."""
    gt = [[_normalise(c) for c in row] for row in truth]
    pred = [[_normalise(c) for c in row] for row in prediction]
    if not gt or not pred or not gt[0]:
        return 0.0
    m, n = len(gt), len(pred)
    pairs = np.zeros((m, n), dtype=np.float32)
    for i in range(m):
        for j in range(n):
            pairs[i, j] = _row_score(gt[i], pred[j]) + ROW_MATCH
    score, trace = _align(m, n, lambda i, j: pairs[i, j], ROW_GAP)
    i, j, best = _best_end(score)
    steps = 0
    while i > 0 or j > 0:
        t = trace[i, j]
        if i > 0 and j > 0 and t == _DIAG:
            i, j = i - 1, j - 1
        elif i > 0 and (j == 0 or t == _UP):
            i -= 1
        elif j > 0 and (i == 0 or t == _LEFT):
            j -= 1
        else:
            break
        steps += 1
    if steps == 0:
        return 0.0
    similarity = best / (steps * (ROW_MATCH + len(gt[0]) * CELL_MATCH))
    return float(max(0.0, min(similarity, 1.0)))
