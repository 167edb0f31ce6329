"""`stitch eval` and `stitch score`: run a checkpoint over a benchmark, and score anyone's predictions.

Both commands end in the same function, `score_dataset`, so a Stitch model and any other system are measured
by identical code. `stitch eval` writes each prediction to a JSONL file as soon as it is generated (append and
flush), so an interrupted run loses at most one batch and resumes by skipping the ids already written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stitch.data.skips import SampleError
from stitch.device import compute_dtype, resolve_device
from stitch.errors import DataError, StitchError
from stitch.eval.provenance import checkpoint_fingerprint
from stitch.eval.reference import REFERENCE
from stitch.eval.scoring import Judged, Scorer, judge  # noqa: F401  (judge: still importable from here)
from stitch.eval.sharding import Ranks, fold_in, shard_files, shard_path, share
from stitch.eval.tasks import TASKS, Sample, TaskData, get_task, load_task, open_image
from stitch.infer.image_cache import ImageEmbeddingCache
from stitch.infer.pretrained import load_pretrained

# Keys a predictions row may use for its id and its text (other systems write them differently).
ID_KEYS = ("id", "question_id", "questionId", "pid")
TEXT_KEYS = ("prediction", "answer", "text", "response")


@dataclass
class Predictions:
    """Predictions read from a JSONL file, and what was wrong with the file."""

    texts: dict[str, str]
    malformed_rows: int = 0
    duplicate_ids: int = 0


def read_predictions(path: str | Path, task: str | None = None) -> Predictions:
    """Read `{"id": ..., "prediction": ...}` rows (the text may also be under "answer", "text" or
    "response"; a null text counts as empty). Rows that are not such objects are counted, not fatal; a
    truncated last line (an interrupted run) is one of those. When `task` is given, rows written by
    `stitch eval` for another task make it an error, so that a resume never mixes benchmarks.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    out = Predictions({})
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                out.malformed_rows += 1
                continue
            if not isinstance(row, dict):
                out.malformed_rows += 1
                continue
            if task is not None and row.get("task") not in (None, task):
                raise StitchError(
                    f"{path}:{lineno}: predictions for task {row['task']!r}, not {task!r}; "
                    "pass another --predictions file"
                )
            sid = next((row[k] for k in ID_KEYS if k in row and row[k] is not None), None)
            key = next((k for k in TEXT_KEYS if k in row), None)
            if sid is None or key is None or not isinstance(row[key], (str, int, float, type(None))):
                out.malformed_rows += 1
                continue
            text = row[key]
            sid = str(sid)
            if sid in out.texts:
                out.duplicate_ids += 1  # the later row wins
            out.texts[sid] = "" if text is None else str(text)
    return out


def score_dataset(
    data: TaskData,
    predictions: Predictions | dict[str, str],
    caption_tokenizer: str = "auto",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score `predictions` (id -> text) against every sample of `data`: (summary, per-sample rows).

    A sample without a prediction, with an empty one, or with one the task's parser cannot read scores 0
    and is counted under its own heading; predictions whose id is not in the data are counted too.
    """
    if isinstance(predictions, dict):
        predictions = Predictions(predictions)
    task = get_task(data.task)
    scorer = task.scorer
    texts = predictions.texts
    judged: list[Judged] = []
    for s in data.samples:
        text = texts.get(s.id)
        if text is None:
            j = Judged(0.0, None, "missing")
        elif scorer.judge is None:
            j = Judged(0.0, None, "ok" if text.strip() else "empty")  # filled in below, corpus-level
        else:
            # The reference scores empty predictions by its rules too (an empty answer can match one).
            j = scorer.judge(s, text)
            if not text.strip():
                j.status = "empty"
        j.readings = {name: (fn(s, text) if text and text.strip() else 0.0) for name, (fn, _) in
                      scorer.readings.items()}  # fmt: skip
        judged.append(j)

    extra: dict[str, Any] = {}
    if scorer.corpus is not None and data.samples:
        per_sample, corpus_fields = scorer.corpus(texts, data.samples, caption_tokenizer)
        for s, j in zip(data.samples, judged):
            if j.status == "ok":
                j.score = per_sample[s.id]
        extra.update(corpus_fields)

    n = len(data.samples)
    statuses = Counter(j.status for j in judged)
    mean = sum(j.score for j in judged) / n if n else 0.0
    if scorer.aggregate is not None and n:
        mean = scorer.aggregate(data.samples, judged)
    summary: dict[str, Any] = {
        "task": task.name,
        "title": task.title,
        "metric": task.metric,
        "task_version": task.version,
        "prompt": task.prompt,
        "reference": REFERENCE,
        "data": data.source,
        "samples": n,
        "mean": mean,
        **scorer.headline(judged, mean),
        "scored": n - statuses["missing"],
        "missing_predictions": statuses["missing"],
        "empty_predictions": statuses["empty"],
        "unparsable": statuses["unparsable"],
        "guessed": statuses["guessed"],
        "unknown_prediction_ids": len(set(texts) - {s.id for s in data.samples}),
        "malformed_prediction_rows": predictions.malformed_rows,
        "duplicate_prediction_ids": predictions.duplicate_ids,
        "skipped": dict(sorted(data.skipped.items())),
    }
    if scorer.readings:
        summary["readings"] = {
            name: {**_reading_score(scorer, [j.readings[name] for j in judged]), "rule": rule}
            for name, (_, rule) in scorer.readings.items()
        }
    summary["rules"] = scorer.rules
    breakdown = _breakdown(task.group, scorer, data.samples, judged)
    if scorer.report is not None:
        extra.update(scorer.report(data.samples, judged))
    if breakdown:
        summary["breakdown"] = breakdown
    if extra:
        summary["extra"] = extra
    rows = [
        {"id": s.id, "prediction": texts.get(s.id), "extracted": j.extracted, "score": j.score, "status": j.status,
         **({"readings": j.readings} if j.readings else {})}
        for s, j in zip(data.samples, judged)
    ]
    return summary, rows


def _reading_score(scorer: Scorer, scores: list[float]) -> dict[str, float]:
    """A reading's number in the headline's terms (points or a percentage) and its mean."""
    mean = sum(scores) / len(scores) if scores else 0.0
    return {"score": scorer.group_scores(scores) if scores else 0.0, "mean": mean}


def _breakdown(group: str | None, scorer: Scorer, samples: list[Sample], judged: list[Judged]) -> dict[str, Any]:
    if group is None:
        return {}
    members: dict[str, list[tuple[Sample, Judged]]] = defaultdict(list)
    for s, j in zip(samples, judged):
        members[str(s.meta.get(group) or "unknown")].append((s, j))
    out: dict[str, Any] = {}
    for k, pairs in sorted(members.items()):
        if scorer.aggregate is not None:  # the headline's own aggregation, within the group
            score = 100.0 * scorer.aggregate([s for s, _ in pairs], [j for _, j in pairs])
        else:
            score = scorer.group_scores([j.score for _, j in pairs])
        out[k] = {"score": score, "samples": len(pairs)}
    return out


# ------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------


def print_summary(summary: dict[str, Any], file=None) -> None:
    """A rich table of the headline and the counts, then the breakdown when there is one."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    table = Table(title=f"{summary['title']}: {summary['metric']}")
    for col in ("score", "samples", "scored", "missing", "empty", "unparsable", "skipped rows"):
        table.add_column(col, justify="right")
    skipped = summary["skipped"]
    skipped_text = str(sum(skipped.values()))
    if skipped:
        skipped_text += " (" + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + ")"
    table.add_row(
        f"{summary['score']:.2f} {summary['unit']}",
        str(summary["samples"]),
        str(summary["scored"]),
        str(summary["missing_predictions"]),
        str(summary["empty_predictions"]),
        str(summary["unparsable"]),
        skipped_text,
    )
    console.print(table)
    if summary.get("breakdown"):
        sub = Table(title="breakdown")
        sub.add_column("group")
        sub.add_column("score", justify="right")
        sub.add_column("samples", justify="right")
        for name, v in summary["breakdown"].items():
            sub.add_row(name, f"{v['score']:.2f}", str(v["samples"]))
        console.print(sub)
    notes = []
    for key, label in (
        ("unknown_prediction_ids", "predictions with ids not among the samples scored (ignored)"),
        ("malformed_prediction_rows", "malformed prediction rows (ignored)"),
        ("duplicate_prediction_ids", "duplicate prediction ids (last kept)"),
    ):
        if summary.get(key):
            notes.append(f"{summary[key]} {label}")
    for key, value in summary.get("extra", {}).items():
        notes.append(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    for note in notes:
        console.print(note)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _finish(data: TaskData, preds: Predictions, args: argparse.Namespace, extra: dict[str, Any]) -> dict:
    summary, rows = score_dataset(data, preds, caption_tokenizer=args.caption_tokenizer)
    summary.update(extra)
    if args.out:
        _write_json(Path(args.out), summary)
    if args.details:
        _write_jsonl(Path(args.details), rows)
    print_summary(summary)
    if args.out:
        print(f"summary: {args.out}")
    return summary


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help=f"benchmark: {', '.join(TASKS)}")
    parser.add_argument(
        "--data",
        default=None,
        help="local folder (or file) holding the benchmark's released files; see docs/eval.md "
        "(not needed for easy-vqa, read from the installed package)",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N usable samples")
    parser.add_argument("--details", default=None, help="also write per-sample scores to this JSONL file")
    parser.add_argument(
        "--caption-tokenizer",
        choices=["auto", "ptb", "simple"],
        default="auto",
        help="CIDEr tokenisation: the official PTB tokenizer (needs java), a pure-Python one, or auto",
    )


# ------------------------------------------------------------------------------------------------------------
# stitch score
# ------------------------------------------------------------------------------------------------------------


def score_cmd_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--predictions", required=True, help='JSONL rows {"id": ..., "prediction": ...}')
    parser.add_argument("--out", default=None, help="write the summary JSON here")


def score_cmd(args: argparse.Namespace) -> int:
    """Score predictions made by any system with a benchmark's official metric.

    The predictions file is JSONL, one {"id": ..., "prediction": "..."} per line (the text may also be under
    "answer", "text" or "response"); ids are those `stitch eval` writes (the benchmark's question id; see
    docs/eval.md). A sample without a prediction, or with an empty or unparsable one, counts as wrong and is
    reported. Prints a table; --out writes the summary JSON, --details per-sample scores.

    Example:
      stitch score --task textvqa --data ~/data/textvqa --predictions other_model.jsonl --out textvqa.json
    """
    if args.limit is not None and args.limit < 1:
        raise StitchError("--limit must be at least 1")
    data = load_task(args.task, args.data, limit=args.limit)
    preds = read_predictions(args.predictions)
    _finish(data, preds, args, {"predictions": str(args.predictions)})
    return 0


# ------------------------------------------------------------------------------------------------------------
# stitch eval
# ------------------------------------------------------------------------------------------------------------


def eval_cmd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="Stitch checkpoint folder (or HF VLM folder)")
    _add_common(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="per answer (default: the task's, 16 for short answers)"
    )
    parser.add_argument("--out", default=None, help="summary JSON (default eval-TASK.json)")
    parser.add_argument(
        "--predictions",
        default=None,
        help="per-sample predictions JSONL, appended as generated and used to resume "
        "(default: the --out path with .predictions.jsonl)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available; under "
                        "torchrun the rank's LOCAL_RANK GPU)")
    parser.add_argument("--no-image-cache", dest="image_cache", action="store_false",
                        help="run the vision encoder for every question, even when an image was seen before")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights dtype (auto: bfloat16 on GPU; on a CPU bfloat16 where measured faster, else float32)",
    )


def _resume(path: Path, task: str) -> set[str]:
    """Ids already predicted in `path`; a torn last line (the run was killed mid-write) is cut off first so
    that appending starts on a fresh line."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
    return set(read_predictions(path, task=task).texts)


def _batches(items: list[Sample], size: int) -> Iterable[list[Sample]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def eval_cmd(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a benchmark: generate answers in batches, then score them officially.

    Reads the benchmark from --data (its released JSON or parquet files; docs/eval.md lists the layout per
    task), prompts with the task's customary prompt, decodes greedily, appends each prediction to a JSONL file
    as it goes, and scores with the same code as `stitch score`. Run it again with the same --out to resume:
    ids already in the predictions file are not generated again. Tasks: `stitch.eval.tasks.TASKS` (docs/eval.md).

    Example:
      stitch eval runs/sft/final --task chartqa --data ~/data/chartqa --batch-size 16 --out chartqa.json
    """
    if args.batch_size < 1:
        raise StitchError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise StitchError("--limit must be at least 1")
    task = get_task(args.task)
    out = Path(args.out or f"eval-{task.name}.json")
    args.out = str(out)
    pred_path = Path(args.predictions) if args.predictions else out.with_name(out.stem + ".predictions.jsonl")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise StitchError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    for flag, path in (("--predictions", pred_path), ("--out", out)):
        if path.is_dir():
            raise StitchError(f"{flag} {path}: is a folder; give a file path")
    ranks = Ranks()
    # Under torchrun each rank takes its own GPU (LOCAL_RANK) unless --device names one.
    args.device = resolve_device(args.device or ranks.default_device())  # checked before data and model load
    ranks.init(args.device)
    # One dtype for every rank (the CPU's "auto" choice is a timing probe, which ranks could answer apart), and
    # the summary records what was used rather than "auto".
    choice = compute_dtype(args.device, args.dtype) if ranks.main else None
    choice = ranks.gather(choice)[0]
    args.dtype = str(choice.dtype).replace("torch.", "")

    data = load_task(task.name, args.data, limit=args.limit)
    if ranks.main:  # fold in what an earlier (killed) run left, before anyone reads the file
        _resume(pred_path, task.name)
        for shard in shard_files(pred_path):
            _resume(shard, task.name)
        fold_in(pred_path, [s.id for s in data.samples], _raw_rows)
    ranks.barrier()
    done = set(read_predictions(pred_path, task=task.name).texts) if pred_path.is_file() else set()
    todo = [s for s in data.samples if s.id not in done]
    mine = share(todo, ranks.rank, ranks.world)
    if ranks.main:
        print(
            f"{task.title}: {len(data.samples)} samples from {data.source}"
            + (f", {sum(data.skipped.values())} rows skipped" if data.skipped else "")
            + (f"; resuming, {len(data.samples) - len(todo)} already in {pred_path}" if done else "")
            + (f"; {len(todo)} to generate over {ranks.world} processes" if ranks.distributed else ""),
            file=sys.stderr,
        )

    started = time.time()
    target = shard_path(pred_path, ranks.rank) if ranks.distributed else pred_path
    skipped, cache = _generate(args, task.name, mine, target, max_new_tokens, task.stop) if mine else ({}, {})
    gathered = ranks.gather(({k: sorted(v) for k, v in skipped.items()}, cache))  # also waits for every rank
    if not ranks.main:
        ranks.close()
        return 0
    fold_in(pred_path, [s.id for s in data.samples], _raw_rows)
    skipped_ids: dict[str, set[str]] = defaultdict(set)
    cache_totals: Counter = Counter()
    for rank_skipped, rank_cache in gathered:
        for reason, ids in rank_skipped.items():
            skipped_ids[reason].update(ids)
        cache_totals.update(rank_cache)
    for reason, ids in skipped_ids.items():
        data.samples = [s for s in data.samples if s.id not in ids]
        data.skipped[reason] += len(ids)

    seconds = round(time.time() - started, 2)
    preds = read_predictions(pred_path, task=task.name) if pred_path.is_file() else Predictions({})
    extra = {
        "checkpoint": str(args.ckpt),
        "checkpoint_sha256": checkpoint_fingerprint(args.ckpt),
        "predictions": str(pred_path),
        "max_new_tokens": max_new_tokens,
        "batch_size": args.batch_size,
        "decoding": {"strategy": "greedy", "temperature": 0.0, "max_new_tokens": max_new_tokens,
                     "stop": list(task.stop), "fit_context": True, "batch_size": args.batch_size,
                     "dtype": args.dtype, "device": str(args.device)},
        "processes": ranks.world,
        "image_cache": dict(cache_totals) if cache_totals else None,
        "generation_seconds": seconds,
        "generated": len(todo) - sum(len(ids) for ids in skipped_ids.values()),
    }  # fmt: skip
    _finish(data, preds, args, extra)
    ranks.close()
    return 0


def _raw_rows(path: Path) -> dict[str, str]:
    """{id: the line as written} of a predictions file (rows without an id are dropped)."""
    rows: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("id") is not None:
                rows[str(row["id"])] = line if line.endswith("\n") else line + "\n"
    return rows


def _load_model(args: argparse.Namespace):
    device = args.device  # resolved by the caller
    compute = compute_dtype(device, args.dtype)
    model, processor = load_pretrained(args.ckpt, device=device, dtype=compute.dtype)
    print(f"stitch eval: {compute}", file=sys.stderr)
    if hasattr(model, "eval"):
        model.eval()
    return model, processor


def _generate(args, task: str, todo: list[Sample], pred_path: Path, max_new_tokens: int, stop: tuple[str, ...] = ()
              ) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Generate answers for `todo`, appending one JSONL row per sample; returns the ids it could not run, by
    reason (an unreadable image, a sample the processor refuses, one longer than the model's context): those
    are skipped and counted by the caller, and the rest of their batch still runs; and the image-embedding
    cache's counts (questions about one image run the vision encoder once; `--no-image-cache` turns it off).
    `stop` strings end an answer (cut from it), as lmms-eval's `until`; a prompt that leaves less room than
    `max_new_tokens` in the model's context gets what is left (`fit_context`)."""
    # Imported at call time, so a stand-in generation module (the eval tests install one in sys.modules) is used.
    try:
        from stitch.infer.generate import generate_batch
    except ImportError as e:
        raise StitchError(f"stitch eval needs stitch.infer.generate.generate_batch ({e})") from e
    model, processor = _load_model(args)
    cache = None
    if getattr(args, "image_cache", True) and ImageEmbeddingCache.supports(model):
        cache = ImageEmbeddingCache(model).install()
    skipped: dict[str, set[str]] = {}

    def skip(sample: Sample, reason: str, detail: object) -> None:
        skipped.setdefault(reason, set()).add(sample.id)
        print(f"skipping sample {sample.id}: {reason} ({detail})", file=sys.stderr)

    def answer(samples: list[Sample], images: list[list]) -> list[str]:
        videos = {"videos": [s.videos for s in samples]} if any(s.videos for s in samples) else {}
        return generate_batch(model, processor, [s.conversation for s in samples], images,
                              max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop), fit_context=True,
                              **videos)

    pred_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    last_report = time.time()
    with open(pred_path, "a", encoding="utf-8") as f:
        for batch in _batches(todo, args.batch_size):
            ready: list[Sample] = []
            images: list[list] = []
            for s in batch:
                try:
                    images.append([open_image(ref) for ref in s.images])
                    ready.append(s)
                except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
                    skip(s, "unreadable image", e)
            if not ready:
                continue
            try:
                texts = answer(ready, images)
            except StitchError:  # one sample the model cannot take: run the batch one by one, skipping it
                kept, texts = [], []
                for s, imgs in zip(ready, images):
                    try:
                        texts += answer([s], [imgs])
                        kept.append(s)
                    except SampleError as e:
                        skip(s, e.reason.replace("_", " "), e.detail)
                    except StitchError as e:
                        skip(s, "cannot generate", e)
                ready = kept
            if len(texts) != len(ready):
                raise StitchError(f"generate_batch returned {len(texts)} answers for {len(ready)} prompts")
            for s, text in zip(ready, texts):
                row = {"id": s.id, "task": task, "prediction": text, "prompt": s.prompt, "references": s.references}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            written += len(ready)
            if time.time() - last_report > 10 or written == len(todo):
                print(f"  {written}/{len(todo)} generated", file=sys.stderr)
                last_report = time.time()
    if cache is not None:
        cache.remove()
    return skipped, (cache.stats() if cache is not None else {})
