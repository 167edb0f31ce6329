"""Video benchmarks: MVBench, Video-MME, MotionBench, PhysGameBench — readers of their HF hub exports.

Each reader yields multiple-choice `Sample`s whose `videos` hold one video path and whose conversation has one
`<video>` placeholder; the references are the correct letter and `choices` the option texts, so the shared
multiple-choice scorer applies, with a per-task breakdown (`meta` key named by the task's `group`). Nothing
is downloaded; `docs/video.md` gives each layout. Rows without a question, options, a valid answer or their
video file are skipped and counted by reason.

Prompts follow each benchmark's own evaluation code:
- MVBench (OpenGVLab's `mvbench.ipynb`, as InternVL's `evaluate_mvbench.py` uses it): the system text
  `MVBENCH_SYSTEM`, then "Question: q\\nOptions:\\n(A) ...\\n(B) ...", then "Only give the best option.";
  answers are the correct candidate's letter. The questions of the tasks MVBench's `data_list` flags as bounded
  (`MVBENCH_BOUNDED`) have their frames sampled within [start, end] seconds (a `VideoClip`), frame folders
  (TVQA's) at 3 fps counted from 1, as its `get_index` does; except for videos in `*_segment` folders (the HF
  export lmms-eval reads), which are already cut to the clip, so lmms-eval samples them whole, and so do we.
- Video-MME (lmms-eval's `videomme`): `VIDEOMME_PROMPT`, the question, the options as given ("A. ..."), then
  "Answer with the option's letter from the given choices directly."; broken down by duration.
- MotionBench (THUDM's release): the question with its options inline, then the letter instruction; broken down
  by question type.
- PhysGameBench (PhysGame): the question, "A. ..." options, the letter instruction; broken down by category.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stitch.data.video import VideoClip
from stitch.errors import DataError
from stitch.eval.readers.common import (
    MULTIPLE_CHOICE,
    Sample,
    Skip,
    has_parquet,
    iter_parquet,
    load_json,
    parquet_files,
)

__all__ = ["read_mvbench", "read_videomme", "read_motionbench", "read_physgame", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".gif")
MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
    "objects, and the action and pose of persons. Based on your observations, select the best option that "
    "accurately addresses the question."
)
VIDEOMME_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. Respond with only the "
    "letter (A, B, C, or D) of the correct option."
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# MVBench's data_list: the tasks whose questions carry a start/end that its evaluation samples within
# (the fourth field, "has start & end"), and the rate of its frame folders (TVQA's frames_fps3_hq).
MVBENCH_BOUNDED = {"action_sequence", "action_prediction", "object_interaction", "action_localization",
                   "episodic_reasoning"}
MVBENCH_FRAMES_FPS = 3.0


def _video_index(root: Path) -> dict[str, Path]:
    """Every video file (or frame folder) under `root` by name and by name without suffix: the releases nest
    their videos in per-source folders that the annotations do not always spell out."""
    index: dict[str, Path] = {}
    folders = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            index.setdefault(p.name, p)
            index.setdefault(p.stem, p)
        elif p.is_dir():
            folders.append(p)
    for p in folders:  # frame folders (MVBench's TVQA frames), after files so a file of that name wins
        index.setdefault(p.name, p)
    return index


def _find_video(ref: Any, root: Path, index: dict[str, Path]) -> Path | None:
    if not isinstance(ref, str) or not ref:
        return None
    direct = root / ref
    if direct.exists():
        return direct
    name = Path(ref).name
    return index.get(name) or index.get(Path(name).stem)


def _sample(sid: str, video: Path | None, question: Any, options: list[str] | None, letter: str | None,
            prompt: str, skip: Skip, meta: dict[str, Any]) -> Sample | None:
    if not isinstance(question, str) or not question.strip() or not options:
        skip("no question or options")
        return None
    if letter is None:
        skip("answer is not an option")
        return None
    if video is None:
        skip("missing video")
        return None
    return Sample(sid, [], [{"role": "user", "content": f"<video>\n{prompt}"}], [letter], choices=options,
                  meta=meta, videos=[str(video)])


def _strip_letter(option: str) -> str:
    """ "A. text" / "(A) text" / "A) text" -> "text" (the scorer matches option texts as well as letters)."""
    return re.sub(r"^\s*\(?[A-Z]\s*[.):]\s*", "", option).strip()


# ------------------------------------------------------------------------------------------------ MVBench
def read_mvbench(root: Path, skip: Skip) -> Iterator[Sample]:
    """MVBench (OpenGVLab/MVBench): `json/<task>.json` (lists of {video, question, candidates, answer}) and the
    videos under `video/`; the task is the JSON file's name."""
    files = sorted((root / "json").glob("*.json")) if (root / "json").is_dir() else sorted(root.glob("*.json"))
    if not files:
        raise DataError(f"{root}: no MVBench json/<task>.json files")
    index = _video_index(root / "video" if (root / "video").is_dir() else root)
    for f in files:
        task = f.stem
        rows = load_json(f)
        if not isinstance(rows, list):
            raise DataError(f"{f}: expected a JSON list of questions")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                skip("malformed row")
                continue
            candidates = [str(c) for c in row.get("candidates") or []]
            answer = row.get("answer")
            letter = LETTERS[candidates.index(str(answer))] if str(answer) in candidates else None
            options = "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(candidates))
            prompt = (f"{MVBENCH_SYSTEM}\nQuestion: {row.get('question')}\nOptions:\n{options}\n"
                      "Only give the best option.")
            meta = {"task": task}
            video = _find_video(row.get("video"), root / "video", index)
            if "start" in row and "end" in row:
                meta["bound"] = [row["start"], row["end"]]
            s = _sample(f"{task}/{i}", video, row.get("question"), candidates, letter, prompt, skip, meta)
            if s:
                try:
                    clip = _mvbench_clip(task, video, row)
                except (TypeError, ValueError):
                    skip("bad start/end")
                    continue
                if clip is not None:
                    s.videos = [clip]
                yield s


def _mvbench_clip(task: str, video: Path, row: dict) -> VideoClip | None:
    """The clip MVBench's evaluation samples for this question, or None for the whole video; ValueError or
    TypeError for a start/end that is not a pair of numbers with start <= end."""
    if task not in MVBENCH_BOUNDED or "start" not in row or "end" not in row:
        return None
    if any(part.endswith("_segment") for part in video.parts):
        return None  # already cut to [start, end]
    start, end = float(row["start"]), float(row["end"])
    if video.is_dir():
        return VideoClip(str(video), start, end, first_frame=1, fps=MVBENCH_FRAMES_FPS)
    return VideoClip(str(video), start, end)


# ---------------------------------------------------------------------------------------------- Video-MME
def read_videomme(root: Path, skip: Skip) -> Iterator[Sample]:
    """Video-MME (lmms-lab/Video-MME): `videomme/test-*.parquet` (video_id, videoID, duration, domain,
    task_type, question_id, question, options ["A. ..."], answer letter) and the videos `data/<videoID>.mp4`."""
    if not has_parquet(root):
        raise DataError(f"{root}: no Video-MME parquet files (videomme/test-*.parquet)")
    index = _video_index(root)
    for label, row in iter_parquet(parquet_files(root, "test")):
        options = [str(o) for o in row.get("options") or []]
        answer = str(row.get("answer") or "").strip().upper()
        letter = answer if answer and answer in LETTERS[: len(options)] else None
        prompt = "\n".join([VIDEOMME_PROMPT, str(row.get("question")), *options, MULTIPLE_CHOICE])
        video = _find_video(str(row.get("videoID") or row.get("video_id") or ""), root, index)
        s = _sample(str(row.get("question_id") or label), video, row.get("question"),
                    [_strip_letter(o) for o in options], letter, prompt, skip,
                    {"duration": row.get("duration"), "domain": row.get("domain"), "task_type": row.get("task_type")})
        if s:
            yield s


# -------------------------------------------------------------------------------------------- MotionBench
def read_motionbench(root: Path, skip: Skip) -> Iterator[Sample]:
    """MotionBench (THUDM/MotionBench): a JSONL annotation file (`*.jsonl`) of videos, each
    {video_path, question_type, qa: [{uid, question (options inline "A. ..."), answer letter}]}; videos by name
    anywhere under the folder. Rows whose answer is hidden ("NA", the test split) are skipped."""
    files = [root] if root.is_file() else sorted(root.rglob("*.jsonl"))
    if not files:
        raise DataError(f"{root}: no MotionBench *.jsonl annotation file")
    base = root.parent if root.is_file() else root
    index = _video_index(base)
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qas = row["qa"]
                assert isinstance(qas, list)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                skip("malformed row")
                continue
            video = _find_video(row.get("video_path") or row.get("video"), base, index)
            for k, qa in enumerate(qas):
                question = qa.get("question") if isinstance(qa, dict) else None
                if not isinstance(question, str):
                    skip("no question or options")
                    continue
                lines = question.strip().splitlines()
                options = [ln for ln in lines if re.match(r"^\s*\(?[A-Z][.)]\s", ln)]
                stem = "\n".join(ln for ln in lines if ln not in options)
                answer = str(qa.get("answer") or "").strip().upper()
                if answer in ("", "NA"):
                    skip("answer hidden")
                    continue
                letter = answer if answer in LETTERS[: len(options)] else None
                prompt = f"{question.strip()}\n{MULTIPLE_CHOICE}"
                s = _sample(str(qa.get("uid") or f"{f.stem}:{n}:{k}"), video, stem, [_strip_letter(o) for o in options],
                            letter, prompt, skip, {"question_type": row.get("question_type")})
                if s:
                    yield s


# ------------------------------------------------------------------------------------------ PhysGameBench
def read_physgame(root: Path, skip: Skip) -> Iterator[Sample]:
    """PhysGameBench (PhysGame/PhysGame-Benchmark): `PhysGame_880_annotation.json` (or any annotation JSON
    list) of {question_id, question, options {"A": ...}, answer, class_anno, video} and the videos by name."""
    if root.is_file():
        ann, base = root, root.parent
    else:
        found = sorted(root.rglob("*annotation*.json")) or sorted(root.glob("*.json"))
        if not found:
            raise DataError(f"{root}: no PhysGameBench annotation JSON")
        ann, base = found[0], root
    rows = load_json(ann)
    if not isinstance(rows, list):
        raise DataError(f"{ann}: expected a JSON list of questions")
    index = _video_index(base)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("options"), dict):
            skip("malformed row")
            continue
        keys = sorted(k for k in row["options"] if isinstance(k, str) and len(k) == 1 and k in LETTERS)
        options = [str(row["options"][k]) for k in keys]
        answer = str(row.get("answer") or "").strip().upper()
        letter = LETTERS[keys.index(answer)] if answer in keys else None
        prompt = "\n".join([str(row.get("question")), *(f"{LETTERS[j]}. {o}" for j, o in enumerate(options)),
                            MULTIPLE_CHOICE])
        video = _find_video(row.get("video") or f"{row.get('question_id')}.mp4", base, index)
        s = _sample(str(row.get("question_id") or i), video, row.get("question"), options, letter, prompt, skip,
                    {"category": row.get("class_anno") or row.get("category")})
        if s:
            yield s
