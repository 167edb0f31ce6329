"""Benchmarks inside training: `eval.tasks` in a recipe scores each listed benchmark on every checkpoint.

The trainer may not import the evaluation package (docs/ARCHITECTURE.md: train, infer and eval keep apart), and
a benchmark should see exactly what a user would later load, so each one runs as `python -m stitch eval` on the
checkpoint just saved, in a child process; the trainer reads back its summary JSON. Summaries and predictions go
to `OUT/benchmarks/step-NNNNNNNN/TASK.json`; a failing benchmark is reported and training goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["score_benchmarks"]


def _command(ckpt: Path, spec: Any, out: Path, device: str) -> list[str]:
    cmd = [sys.executable, "-m", "stitch", "eval", str(ckpt), "--task", spec.task, "--out", str(out),
           "--batch-size", str(spec.batch_size), "--device", device]  # fmt: skip
    if spec.data:
        cmd += ["--data", str(spec.data)]
    if spec.limit:
        cmd += ["--limit", str(spec.limit)]
    if spec.max_new_tokens:
        cmd += ["--max-new-tokens", str(spec.max_new_tokens)]
    return cmd


def score_benchmarks(ckpt: Path, specs: Sequence[Any], out_dir: Path, step: int, device: str
                     ) -> tuple[dict[str, float], list[str]]:
    """({"bench/TASK": headline score}, error lines) for the benchmarks `specs` (`BenchmarkSpec`s) on `ckpt`."""
    scores: dict[str, float] = {}
    errors: list[str] = []
    for spec in specs:
        out = Path(out_dir) / "benchmarks" / f"step-{step:08d}" / f"{spec.task}.json"
        done = subprocess.run(_command(ckpt, spec, out, device), capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            errors.append(f"benchmark {spec.task} at step {step} failed (exit {done.returncode}): {tail}")
            continue
        scores[f"bench/{spec.task}"] = float(json.loads(out.read_text(encoding="utf-8"))["score"])
    return scores, errors
