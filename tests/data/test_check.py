"""`stitch data check`: counts, skips by reason, histograms, rendered samples; --json; exit status."""

from __future__ import annotations

import json

import pytest
import yaml

from stitch.cli import main

from .conftest import make_image
from .test_sources import write_jsonl


@pytest.fixture
def ckpt(tmp_path, processor):
    out = tmp_path / "ckpt"
    processor.save_pretrained(out)
    return out


@pytest.fixture
def blend(tmp_path):
    make_image(tmp_path / "a.png", size=(150, 60))
    write_jsonl(tmp_path / "good.jsonl", [
        {"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"},
                                             {"from": "gpt", "value": f"Answer {i}."}]} for i in range(30)])
    write_jsonl(tmp_path / "some_bad.jsonl", [
        {"image": "missing.png", "caption": "gone"} if i % 3 == 0 else {"caption": f"text {i}"}
        if i % 3 == 1 else "{oops" for i in range(30)])
    path = tmp_path / "blend.yaml"
    path.write_text(yaml.safe_dump({"__module__": "megatron.energon", "__class__": "Metadataset", "splits": {
        "train": {"datasets": [{"weight": 2, "path": "good.jsonl"},
                               {"weight": 1, "path": "some_bad.jsonl"}]}}}))
    return path


def test_check_json(blend, ckpt, capsys):
    code = main(["data", "check", str(blend), "--checkpoint", str(ckpt), "--samples", "30", "--show", "2",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False  # the bad dataset skips far more than 5%
    good, bad = report["datasets"]
    assert good["used"] == 20 and good["skipped"] == {} and not good["over_limit"]
    # captions without a question are fine records but have no image -> fine; missing files and bad JSON skip
    assert set(bad["skipped"]) == {"missing_file", "malformed_record"} and bad["over_limit"]
    assert report["skips"]["missing_file"] >= 1 and report["samples"] == 30
    assert sum(report["tiles"].values()) == 30 and report["tiles"]["4"] == 20  # 3x1 grid + thumbnail
    assert report["tokens"]["count"] == 30 and report["tokens"]["max"] <= report["seq_length"]
    shown = report["shown"][0]
    kinds = {k for k, _ in shown["runs"]}
    assert {"context", "loss", "image"} <= kinds
    trained = "".join(t for k, t in shown["runs"] if k == "loss")
    assert trained.startswith("Answer") and trained.endswith("<|im_end|>")


def test_check_rich_output_and_ok_status(tmp_path, ckpt, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Hello!"}]}
        for i in range(10)])
    code = main(["data", "check", str(data), "--checkpoint", str(ckpt), "--samples", "10", "--show", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "datasets" in out and "tokens per sample" in out and "OK" in out and "Hello!" in out


def test_check_reads_a_config_data_section(tmp_path, ckpt, capsys, blend, monkeypatch):
    """A training config is checked as `stitch train` reads it: its `base:` applied, relative paths from the
    current folder (the blend's own entries from the blend's folder)."""
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "base.yaml").write_text(yaml.safe_dump({"data": {"seq_length": 300}}))
    cfg = tmp_path / "cfgs" / "train.yaml"
    cfg.write_text(yaml.safe_dump({"base": "base.yaml", "data": {"blend": "blend.yaml", "max_skip_fraction": 0.9}}))
    monkeypatch.chdir(tmp_path)
    code = main(["data", "check", "cfgs/train.yaml", "--checkpoint", str(ckpt), "--samples", "12", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["seq_length"] == 300 and report["max_skip_fraction"] == 0.9
    (tmp_path / "sub").mkdir()  # a blend in a subfolder, named by a relative path
    (tmp_path / "sub" / "blend.yaml").write_text(blend.read_text().replace("path: ", "path: ../"))
    main(["data", "check", "sub/blend.yaml", "--checkpoint", str(ckpt), "--samples", "12", "--json"])
    # both datasets found from the blend's folder; whether the bad one crosses the skip limit in 12 samples
    # depends on its shuffle, which is seeded by the dataset's name (here its absolute tmp path)
    report = json.loads(capsys.readouterr().out)
    assert report["fatal"] is None and [d["records"] for d in report["datasets"]] == [30, 30]


def test_check_user_errors_are_one_line(tmp_path, ckpt, capsys):
    assert main(["data", "check", str(tmp_path / "nope.yaml"), "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "nope.yaml: no such file" in err and len(err.strip().splitlines()) == 1
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{x"] * 5)
    assert main(["data", "check", str(all_bad), "--checkpoint", str(ckpt), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert "nothing usable" in report["fatal"]
    (row,) = report["datasets"]  # the counts of the attempts that failed are kept, with examples
    assert row["attempted"] > 0 and row["skipped"] and row["skip_fraction"] == 1.0 and report["skip_examples"]


def test_help_has_example(capsys):
    with pytest.raises(SystemExit):
        main(["data", "check", "--help"])
    out = capsys.readouterr().out
    assert "Example:" in out and "--samples" in out and "--checkpoint" in out


def test_skip_examples_name_the_record(tmp_path, ckpt, capsys):
    """A record refused while rendering (turns out of order) is reported with its file and line."""
    rows = [{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}] * 3
    bad = write_jsonl(tmp_path / "order.jsonl", rows)
    main(["data", "check", str(bad), "--checkpoint", str(ckpt), "--samples", "2", "--json"])
    examples = json.loads(capsys.readouterr().out)["skip_examples"]
    assert any(str(bad) + ":" in text and "expected 'user'" in text for text in examples.values()), examples
