"""Benchmark tasks: the registry that names each benchmark's reader, prompt budget, scorer and breakdown.

A task knows three things: how to read the official release (the JSON files the benchmark's authors publish,
or the parquet export on the HF hub), the prompt customary for it, and which metric scores it. Nothing is
downloaded. Rows that cannot be used (a missing image, a row without a question or answers, a duplicate id)
are skipped and counted by reason, so `stitch eval` can say what it left out. `docs/eval.md` lists the layout
each task expects.

The readers live in `stitch.eval.readers` by family (`vqa`, `docs`, `multiple_choice`, `captions`, and `common`
for `Sample`, `TaskData`, the prompts and the reading helpers); the scorers in `stitch.eval.scoring`. This module
re-exports the names it used to define, so `from stitch.eval.tasks import Sample, open_image, ...` still works.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from stitch.errors import DataError, StitchError
from stitch.eval.readers.captions import read_coco
from stitch.eval.readers.common import (
    CAPTION,
    MULTIPLE_CHOICE,
    SHORT_ANSWER,
    ImageRef,
    Sample,
    Skip,
    TaskData,
    conversation,
    multiple_choice_prompt,
    open_image,
    parquet_files,
)
from stitch.eval.readers.docs import read_chartqa, read_docvqa, read_infovqa, read_ocrbench
from stitch.eval.readers.hallusion import read_hallusionbench
from stitch.eval.readers.mcq_suites import read_mmbench, read_mmstar, read_pope, read_scienceqa, read_seedbench
from stitch.eval.readers.multiple_choice import read_ai2d, read_mathvista, read_mmmu
from stitch.eval.readers.ocrbench_v2 import read_ocrbench_v2
from stitch.eval.readers.tables import TABLE_PROMPT, read_rdtablebench
from stitch.eval.readers.video import read_motionbench, read_mvbench, read_physgame, read_videomme
from stitch.eval.readers.vqa import read_easy_vqa, read_realworldqa, read_textvqa, read_vqav2
from stitch.eval.scoring import SCORERS, Scorer

METRICS = (
    "vqa_accuracy",
    "anls",
    "relaxed_accuracy",
    "multiple_choice",
    "video_choice",
    "mmmu",
    "mathvista",
    "ocrbench",
    "ocrbench_v2",
    "cider",
    "exact_match",
    "mmbench",
    "mmstar",
    "pope",
    "seedbench",
    "scienceqa",
    "hallusionbench",
    "table_similarity",
)


@dataclass(frozen=True)
class Task:
    """A benchmark: its reader, its scorer, and the `meta` key its results are broken down by."""

    name: str
    title: str
    scorer: Scorer
    reader: Callable[[Path, Skip], Iterable[Sample]]
    group: str | None = None
    needs_data: bool = True
    # Greedy decoding budget and stop strings (cut from the answer): lmms-eval 0.7.3's generation_kwargs for the
    # task (GENERATION below; tests/eval/test_eval_generation_parity.py reads the YAMLs).
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    # Bumped whenever the reader, prompt, decoding or metric rules change what a score means (summaries record it).
    version: str = "2"

    @property
    def prompt(self) -> str:
        """The prompt template, as summaries record it."""
        return PROMPTS.get(self.name, "<question>")

    @property
    def metric(self) -> str:
        """The scorer's name, as results report it."""
        return self.scorer.metric


# lmms-eval 0.7.3's generation settings per task, as its TaskConfig completes the YAML's generation_kwargs:
# `until` defaults to ["\n\n"] (the few-shot delimiter) when the YAML gives none; max_new_tokens, where the
# YAML gives none, is 1024, the default of its llava, llava_hf and internvl_hf model classes. Always greedy.
_LMMS_STOP = ("\n\n",)
_ASSISTANT = ("ASSISTANT:",)
GENERATION: dict[str, tuple[int, tuple[str, ...]]] = {
    "vqav2": (16, _LMMS_STOP), "textvqa": (1024, _ASSISTANT), "docvqa": (32, _LMMS_STOP),
    "infovqa": (32, _LMMS_STOP), "chartqa": (16, _LMMS_STOP), "ai2d": (16, _LMMS_STOP),
    "mmmu": (128, _LMMS_STOP), "mathvista": (16384, _LMMS_STOP), "ocrbench": (128, _LMMS_STOP),
    "ocrbench_v2": (128, _LMMS_STOP), "coco": (64, _LMMS_STOP), "realworldqa": (16, _LMMS_STOP),
    "mmbench": (1024, _ASSISTANT), "mmstar": (1024, _LMMS_STOP), "pope": (128, _LMMS_STOP),
    "seedbench": (1024, _ASSISTANT), "scienceqa": (16, _LMMS_STOP), "hallusionbench": (128, _LMMS_STOP),
}  # fmt: skip


def _task(name: str, title: str, metric: str, reader: Callable[[Path, Skip], Iterable[Sample]], **kw) -> Task:
    if name in GENERATION:
        kw["max_new_tokens"], kw["stop"] = GENERATION[name]
    return Task(name, title, SCORERS[metric], reader, **kw)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        # Version 4: lmms-eval's generation settings (GENERATION); version 3: its prompts
        # (tests/eval/test_eval_prompt_parity.py).
        _task("vqav2", "VQAv2 (val)", "vqa_accuracy", read_vqav2, group="answer_type", version="4"),
        _task("textvqa", "TextVQA (val)", "vqa_accuracy/textvqa", read_textvqa, version="4"),
        _task("docvqa", "DocVQA (val)", "anls", read_docvqa, version="4"),
        _task("infovqa", "InfographicVQA (val)", "anls", read_infovqa, version="4"),
        _task("chartqa", "ChartQA (test)", "relaxed_accuracy", read_chartqa, group="split", version="4"),
        _task("ai2d", "AI2D (test)", "multiple_choice", read_ai2d, version="4"),
        _task("mmmu", "MMMU (val)", "mmmu", read_mmmu, group="subject", version="4"),
        # Version 4: prompted as mathvista_testmini_format (was the `query` field), its decoding.
        _task("mathvista", "MathVista (testmini)", "mathvista", read_mathvista, group="task", version="4"),
        _task("ocrbench", "OCRBench", "ocrbench", read_ocrbench, group="category", version="4"),
        _task("ocrbench_v2", "OCRBench v2", "ocrbench_v2", read_ocrbench_v2, version="1"),
        # Version 4: Karpathy files prompted as coco_karpathy_test; its decoding.
        _task("coco", "COCO captions (Karpathy test)", "cider", read_coco, version="4"),
        _task("realworldqa", "RealWorldQA", "exact_match/realworldqa", read_realworldqa, version="4"),
        _task("mmbench", "MMBench (en dev, circular)", "mmbench", read_mmbench, group="category", version="4"),
        _task("mmstar", "MMStar (val)", "mmstar", read_mmstar, group="category", version="4"),
        _task("pope", "POPE (test)", "pope", read_pope, group="split", version="4"),
        _task("seedbench", "SEED-Bench (image)", "seedbench", read_seedbench, group="question_type", version="4"),
        _task("scienceqa", "ScienceQA-IMG (test)", "scienceqa", read_scienceqa, group="subject", version="4"),
        _task("hallusionbench", "HallusionBench (image)", "hallusionbench", read_hallusionbench, group="category",
              version="2"),
        _task("rdtablebench", "RD-TableBench", "table_similarity", read_rdtablebench, max_new_tokens=4096,
              version="1"),
        _task("easy-vqa", "easy-vqa (test)", "exact_match", read_easy_vqa, needs_data=False),
        _task("mvbench", "MVBench", "video_choice", read_mvbench, group="task"),
        _task("videomme", "Video-MME (w/o subtitles)", "video_choice", read_videomme, group="duration"),
        _task("motionbench", "MotionBench (dev)", "video_choice", read_motionbench, group="question_type"),
        _task("physgame", "PhysGameBench", "video_choice", read_physgame, group="category"),
    ]
}
_SHORT = "<question>\nAnswer the question using a single word or phrase."
_LETTER = "Answer with the option's letter from the given choices directly."
# Templates as summaries record them; <question> is the released text, not stripped, unless the template says so.
PROMPTS = {
    "vqav2": _SHORT, "docvqa": _SHORT, "infovqa": _SHORT, "easy-vqa": _SHORT,
    "textvqa": "<question.capitalize()>\nAnswer the question using a single word or phrase.",
    "chartqa": "<question>\nAnswer the question with a single word.",
    "pope": "<question, stripped>\nAnswer the question using a single word or phrase.",
    "ai2d": f"<question>\nA. <option>\nB. <option>...\n{_LETTER}",
    "mmmu": f"<image>... <question>\nA. <option>...\n\n{_LETTER} | open: <question>\n\nAnswer the question "
            "using a single word or phrase.",
    "mathvista": f"<question>[ (Unit: <unit>)]\nA. <option>...\n{_LETTER} | free form: <question>[ (Unit: <unit>)]\n"
                 "Answer the question using a single integer number. (or: ... floating-point number with one/two "
                 "decimal places. / a Python list.) (mathvista_testmini_format)",
    "ocrbench_v2": "<question, stripped>",
    "ocrbench": "<question, stripped>",
    "coco": "Describe the image briefly. (Karpathy files, as coco_karpathy_test) | Provide a one-sentence caption "
            "for the provided image. (captions_val*.json, parquet, as coco2014/2017_cap_val)",
    "realworldqa": "<question, stripped> (carries its own instruction)",
    "mmbench": f"[<hint> ]<question> There are several options:\nA. <option>...\n\n{_LETTER} (each rotation)",
    "mmstar": f"<question with its options, stripped, ' Please answer yes or no.' removed>\n{_LETTER[:-1]}",
    "seedbench": f"<question>\nA. <choice_a>\nB. <choice_b>\nC. <choice_c>\nD. <choice_d>\n{_LETTER}",
    "scienceqa": f"[Context: <hint>\n]<question>\nA. <option>...\n{_LETTER}",
    "hallusionbench": "<question>",
    "rdtablebench": TABLE_PROMPT,
    "mvbench": "<MVBench system text> <video>\nQuestion: <question>\nOptions:\n(A) <option>...\nOnly give the best "
               "option.",
    "videomme": f"<video>\n<Video-MME instruction>\n<question>\nA. <option>...\n{_LETTER}",
    "motionbench": f"<video>\n<question with its options inline>\n{_LETTER}",
    "physgame": f"<video>\n<question>\nA. <option>...\n{_LETTER}",
}  # fmt: skip

# Other spellings people type.
ALIASES = {"vqa": "vqav2", "vqa-v2": "vqav2", "text-vqa": "textvqa", "doc-vqa": "docvqa",
           "infographicvqa": "infovqa", "info-vqa": "infovqa", "chart-qa": "chartqa", "mmmu-val": "mmmu",
           "ocr-bench": "ocrbench", "ocrbench-v2": "ocrbench_v2", "ocrbenchv2": "ocrbench_v2",
           "coco-caption": "coco", "coco-captions": "coco", "cococaption": "coco",
           "realworld-qa": "realworldqa", "spdocvqa": "docvqa", "sp-docvqa": "docvqa",
           "mmbench-en": "mmbench", "seed-bench": "seedbench", "seedbench-img": "seedbench",
           "scienceqa-img": "scienceqa", "sqa": "scienceqa", "easy_vqa": "easy-vqa", "easyvqa": "easy-vqa",
           "mv-bench": "mvbench", "video-mme": "videomme", "motion-bench": "motionbench",
           "physgamebench": "physgame", "phys-game-bench": "physgame",
           "hallusion-bench": "hallusionbench", "hallusion_bench": "hallusionbench", "hallusion": "hallusionbench",
           "hallusion_bench_image": "hallusionbench", "rd-tablebench": "rdtablebench",
           "rd_tablebench": "rdtablebench"}  # fmt: skip


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive; common spellings accepted)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise StitchError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[key]


def load_task(name: str, data: str | Path | None, limit: int | None = None) -> TaskData:
    """Read benchmark `name` from the local path `data` (None for easy-vqa: the installed package).

    Stops after `limit` usable samples. Duplicate ids are skipped (predictions are matched by id).
    """
    task = get_task(name)
    if data is None and task.needs_data:
        raise StitchError(f"task {task.name} needs --data PATH (see docs/eval.md for the expected layout)")
    root = Path(data).expanduser() if data is not None else None
    if root is not None and not root.exists():
        raise DataError(f"{root}: no such file or folder")
    skipped: Counter = Counter()

    def skip(reason: str) -> None:
        skipped[reason] += 1

    samples: list[Sample] = []
    seen: set[str] = set()
    for s in task.reader(root, skip):
        if s.id in seen:
            skip("duplicate id")
            continue
        seen.add(s.id)
        samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    source = str(root) if root is not None else "easy_vqa package (test split)"
    return TaskData(task.name, source, samples, skipped)



__all__ = [
    "CAPTION",
    "METRICS",
    "MULTIPLE_CHOICE",
    "SHORT_ANSWER",
    "TASKS",
    "ImageRef",
    "Sample",
    "Skip",
    "Task",
    "TaskData",
    "conversation",
    "get_task",
    "load_task",
    "multiple_choice_prompt",
    "open_image",
    "parquet_files",
]
