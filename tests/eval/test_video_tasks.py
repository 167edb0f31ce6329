"""Video benchmarks read from small copies of their HF hub layouts (videos written with PyAV): prompts,
references, skips by reason, `stitch score` with the per-task breakdown, and `stitch eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stitch.data.video import VideoClip
from stitch.eval import runner
from stitch.eval.tasks import get_task, load_task
from tests.data.video_clips import encode, moving_square


def _clip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encode(moving_square(8, size=32, square=6), path, fps=4)
    return path


def test_mvbench_layout_prompt_and_breakdown(tmp_path):
    root = tmp_path / "MVBench"
    _clip(root / "video" / "star" / "Charades_v1_480" / "a.mp4")
    _clip(root / "video" / "clevrer" / "b.mp4")
    (root / "json").mkdir(parents=True)
    (root / "json" / "action_sequence.json").write_text(json.dumps([
        {"video": "a.mp4", "question": "What did the person do first?", "candidates": ["sat", "stood", "ran"],
         "answer": "stood", "start": 1.0, "end": 3.0},
        {"video": "missing.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "x"},
        {"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "z"},
    ]))
    (root / "json" / "counterfactual_inference.json").write_text(json.dumps([
        {"video": "b.mp4", "question": "What if?", "candidates": ["A thing", "Another"], "answer": "Another"}]))
    data = load_task("mvbench", root)
    assert [s.id for s in data.samples] == ["action_sequence/0", "counterfactual_inference/0"]
    assert dict(data.skipped) == {"missing video": 1, "answer is not an option": 1}
    first = data.samples[0]
    assert first.references == ["B"] and first.choices == ["sat", "stood", "ran"]
    # action_sequence is one of MVBench's bounded tasks: frames sampled within [start, end]
    assert first.videos == [VideoClip(str(root / "video" / "star" / "Charades_v1_480" / "a.mp4"), 1.0, 3.0)]
    content = first.conversation[0]["content"]
    assert content.startswith("<video>\nCarefully watch the video")
    options = "Options:\n(A) sat\n(B) stood\n(C) ran\nOnly give the best option."
    assert f"Question: What did the person do first?\n{options}" in content
    assert first.meta["bound"] == [1.0, 3.0]
    summary, _ = runner.score_dataset(data, {"action_sequence/0": "(B) stood", "counterfactual_inference/0": "A"})
    assert summary["score"] == pytest.approx(50.0)
    assert {k: v["samples"] for k, v in summary["breakdown"].items()} == {
        "action_sequence": 1, "counterfactual_inference": 1}


def test_mvbench_bounds_follow_its_evaluation(tmp_path):
    """Only the tasks MVBench's data_list flags get their start/end; lmms-eval's pre-cut `*_segment` videos are
    sampled whole; TVQA frame folders are clips at 3 fps counted from 1; a bad start/end is a counted skip. The
    clip's frames come from within the bounds (the processor's use of clips: tests/data/test_video_processor.py)."""
    from PIL import Image

    from stitch.data.video import load_video
    from tests.data.video_clips import frame_number, numbered_frames

    root = tmp_path / "MVBench"
    full = root / "video" / "sta" / "sta_video" / "full.mp4"
    full.parent.mkdir(parents=True)
    encode(numbered_frames(80), full, fps=8, gop=10)
    _clip(root / "video" / "sta" / "sta_video_segment" / "cut.mp4")
    _clip(root / "video" / "clevrer" / "c.mp4")
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "ep1_clip"
    frames.mkdir(parents=True)
    for t in range(12):
        Image.new("RGB", (16, 16), (t * 20, 0, 0)).save(frames / f"{t + 1:05d}.jpg")
    (root / "json").mkdir(parents=True)
    row = {"question": "Q?", "candidates": ["a", "b"], "answer": "a", "start": 2.0, "end": 6.0}
    (root / "json" / "action_localization.json").write_text(json.dumps([
        {**row, "video": "full.mp4"}, {**row, "video": "cut.mp4"}, {**row, "video": "full.mp4", "end": "soon"}]))
    (root / "json" / "moving_count.json").write_text(json.dumps([{**row, "video": "c.mp4"}]))
    (root / "json" / "episodic_reasoning.json").write_text(json.dumps([{**row, "video": "ep1_clip"}]))
    data = load_task("mvbench", root)
    by_id = {s.id: s for s in data.samples}
    assert dict(data.skipped) == {"bad start/end": 1}
    assert by_id["action_localization/0"].videos == [VideoClip(str(full), 2.0, 6.0)]
    assert by_id["action_localization/1"].videos == [str(root / "video" / "sta" / "sta_video_segment" / "cut.mp4")]
    assert by_id["moving_count/0"].videos == [str(root / "video" / "clevrer" / "c.mp4")]  # not a bounded task
    assert by_id["episodic_reasoning/0"].videos == [VideoClip(str(frames), 2.0, 6.0, first_frame=1, fps=3.0)]
    # InternVL's rule in [2 s, 6 s] of the 8 fps video: get_index((2, 6), 8, 79, 0, 4) = 20, 28, 36, 44
    video = load_video(by_id["action_localization/0"].videos[0], num_frames=4, rule="internvl")
    assert video.indices == [20, 28, 36, 44] and [frame_number(f) for f in video.frames] == video.indices


def test_videomme_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "Video-MME"
    _clip(root / "data" / "fFjv93ACGo8.mp4")
    (root / "videomme").mkdir(parents=True)
    table = pa.table({
        "video_id": ["001", "001", "002"], "duration": ["short", "short", "long"], "domain": ["Knowledge"] * 3,
        "task_type": ["Counting Problem"] * 3, "videoID": ["fFjv93ACGo8", "fFjv93ACGo8", "absent"],
        "question_id": ["001-1", "001-2", "002-1"], "question": ["How many?", "Which?", "Why?"],
        "options": [["A. one", "B. two", "C. three", "D. four"]] * 3, "answer": ["C", "A", "B"],
    })
    pq.write_table(table, root / "videomme" / "test-00000-of-00001.parquet")
    data = load_task("video-mme", root)
    assert [s.id for s in data.samples] == ["001-1", "001-2"] and data.skipped["missing video"] == 1
    s = data.samples[0]
    assert s.choices == ["one", "two", "three", "four"] and s.references == ["C"]
    assert "Respond with only the letter" in s.conversation[0]["content"] and "\nA. one\nB. two" in s.prompt
    summary, _ = runner.score_dataset(data, {"001-1": "C", "001-2": "The answer is B"})
    assert summary["score"] == pytest.approx(50.0) and summary["breakdown"]["short"]["samples"] == 2
    assert get_task("videomme").group == "duration"


def test_motionbench_and_physgame_layouts(tmp_path):
    mb = tmp_path / "MotionBench"
    _clip(mb / "videos" / "v1.mp4")
    rows = [
        {"video_path": "v1.mp4", "question_type": "Motion Recognition", "qa": [
            {"uid": "u1", "question": "What moves?\nA. a square\nB. a circle", "answer": "A"},
            {"uid": "u2", "question": "Hidden?\nA. x\nB. y", "answer": "NA"}]},
        "{not json",
    ]
    (mb / "video_info.meta.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                                       for r in rows))
    data = load_task("motionbench", mb)
    assert [s.id for s in data.samples] == ["u1"] and s_choices(data) == [["a square", "a circle"]]
    assert dict(data.skipped) == {"answer hidden": 1, "malformed row": 1}
    assert data.samples[0].meta["question_type"] == "Motion Recognition"

    pg = tmp_path / "PhysGame"
    _clip(pg / "PhysGame-Benchmark" / "videos" / "q7.mp4")
    (pg / "PhysGame_880_annotation.json").write_text(json.dumps([
        {"question_id": "q7", "question": "What glitch?", "options": {"A": "floating car", "B": "none",
         "C": "a", "D": "b"}, "answer": "A", "class_anno": "mechanics", "video": "q7.mp4"}]))
    data = load_task("physgame", pg)
    assert data.samples[0].references == ["A"] and data.samples[0].meta["category"] == "mechanics"
    summary, _ = runner.score_dataset(data, {"q7": "A"})
    assert summary["score"] == 100.0 and list(summary["breakdown"]) == ["mechanics"]


def s_choices(data):
    return [s.choices for s in data.samples]


def test_stitch_eval_runs_a_video_task_end_to_end(tmp_path):
    from stitch.checkpoint.build import stitch_build
    from stitch.cli import main

    root = tmp_path / "PhysGame"
    _clip(root / "videos" / "q1.mp4")
    (root / "annotation.json").write_text(json.dumps([
        {"question_id": "q1", "question": "Glitch?", "options": {"A": "yes", "B": "no"}, "answer": "A",
         "class_anno": "optics", "video": "q1.mp4"}]))
    ckpt = stitch_build(vision="internvit-tiny", llm="llama-tiny", out=tmp_path / "ckpt")
    out = tmp_path / "results.json"
    assert main(["eval", str(ckpt), "--task", "physgame", "--data", str(root), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "physgame" and result["samples"] == 1 and "optics" in result["breakdown"]
