"""RD-TableBench: table similarity by Reducto's grading rules, on cases whose expected values the official
`grading.py` / `convert.py` (github.com/reductoai/rd-tablebench, not installable as a package) computed; the
reader on a folder laid out like the unzipped release; `stitch eval` end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest
from eval_fixtures import png

from stitch.eval import runner
from stitch.eval.reference_table import extract_table_html, html_to_grid, table_similarity
from stitch.eval.tasks import get_task, load_task

pytest.importorskip("lxml")

GT = ('<table><tr><th>Year</th><th colspan="2">Revenue</th></tr><tr><td rowspan="2">2019</td><td>1,000</td>'
      '<td>12</td></tr><tr><td>2,000</td><td>x-y</td></tr></table>')  # fmt: skip
# Predictions and the official code's `table_similarity(html_to_numpy(GT), html_to_numpy(pred))`.
CASES = {
    "same": (GT, 1.0),
    "whitespace_hyphens": (GT.replace("x-y", "x y").replace("Revenue", "Reve-\nnue"), 1.0),
    "typo": (GT.replace("1,000", "1,00O"), 0.9833333492279053),
    "rows_swapped": ('<table><tr><td>2019</td><td>2,000</td><td>x-y</td></tr><tr><th>Year</th><th colspan="2">'
                     'Revenue</th></tr><tr><td>2019</td><td>1,000</td><td>12</td></tr></table>', 0.6666666865348816),
    "cropped": ("<table><tr><td>2019</td><td>1,000</td><td>12</td></tr></table>", 0.5),
    "extra_row": (GT.replace("</table>", "<tr><td>Total</td><td>3,000</td><td></td></tr></table>"), 1.0),
    "no_spans": ("<table><tr><th>Year</th><th>Revenue</th></tr><tr><td>2019</td><td>1,000</td><td>12</td></tr>"
                 "<tr><td>2,000</td><td>x-y</td></tr></table>", 0.875),
    "wrong": ("<table><tr><td>cat</td></tr></table>", 0.2083333283662796),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_similarity_is_the_official_codes(name):
    pred, want = CASES[name]
    assert table_similarity(html_to_grid(GT), html_to_grid(pred)) == want


def test_grid_expands_spans_and_answers_are_cut_as_reducto_cuts_them():
    assert html_to_grid(GT) == [["Year", "Revenue", "Revenue"], ["2019", "1,000", "12"], ["2019", "2,000", "x-y"]]
    assert html_to_grid("<table><tr><td>a</td></tr><tr><td>b</td><td>c</td></tr></table>") == [["a", ""], ["b", "c"]]
    assert extract_table_html(f"Here it is:\n{GT}\nDone.") == GT
    assert extract_table_html("no table") is None
    assert extract_table_html("Sure! <table><tr><td>a</td></tr>") == "<"  # no </table>: cut at character 7
    with pytest.raises(ValueError):
        html_to_grid('<table><tr><td rowspan="two">a</td></tr></table>')  # the reference's int() raises too


def test_reader_and_scores(tmp_path):
    for name in ("t1", "t2", "t3"):
        (tmp_path / "groundtruth").mkdir(exist_ok=True)
        (tmp_path / "groundtruth" / f"{name}.html").write_text(GT)
    png(tmp_path / "images" / "t1.png")
    png(tmp_path / "images" / "t3.jpg")
    (tmp_path / "groundtruth" / "t4.html").write_text("<p>no table here</p>")
    png(tmp_path / "images" / "t4.png")
    (tmp_path / "groundtruth" / "t5.html").write_text(GT)
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "t5.pdf").write_bytes(b"%PDF-1.4")
    data = load_task("rd-tablebench", tmp_path)
    want_ids = ["t1", "t3"] + (["t5"] if importlib.util.find_spec("pdf2image") else [])
    assert [s.id for s in data.samples] == want_ids
    assert data.skipped["missing image"] == 1 and data.skipped["malformed row"] == 1
    assert data.samples[0].prompt == get_task("rdtablebench").prompt and data.samples[0].references == [GT]
    summary, rows = runner.score_dataset(data, {"t1": f"```html\n{GT}\n```", "t3": "I cannot read it."})
    assert summary["score"] == pytest.approx(100.0 / len(want_ids)) and summary["unparsable"] == 1
    assert rows[0]["score"] == 1.0 and rows[1]["status"] == "unparsable"
    assert "grading.table_similarity" in summary["rules"]


def test_stitch_eval_runs_rdtablebench_end_to_end(tmp_path):
    from stitch.checkpoint.build import stitch_build
    from stitch.cli import main

    (tmp_path / "rd" / "groundtruth").mkdir(parents=True)
    (tmp_path / "rd" / "groundtruth" / "t1.html").write_text(GT)
    png(tmp_path / "rd" / "images" / "t1.png")
    ckpt = stitch_build(vision="internvit-tiny", llm="llama-tiny", out=tmp_path / "ckpt")
    out = tmp_path / "rd.json"
    assert main(["eval", str(ckpt), "--task", "rdtablebench", "--data", str(tmp_path / "rd"), "--out", str(out),
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0  # fmt: skip
    summary = json.loads(out.read_text())
    assert summary["task"] == "rdtablebench" and summary["samples"] == 1 and summary["generated"] == 1
    assert summary["task_version"] == "1" and summary["prompt"].startswith("Convert the image to an HTML table.")
    assert summary["score"] == 0.0 and summary["unparsable"] == 1  # 3 random tokens hold no table
