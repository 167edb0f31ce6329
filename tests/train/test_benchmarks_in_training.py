"""`eval.tasks`: benchmarks scored on the checkpoints a training run saves (metrics.jsonl as bench/TASK)."""

from __future__ import annotations

import json

from stitch.train.config import load_config
from stitch.train.log import read_metrics
from stitch.train.trainer import Trainer
from tests.train.helpers import tiny_config


def test_benchmarks_are_scored_at_checkpoints(tiny_ckpt, tmp_path):
    lines: list[str] = []
    cfg = load_config(None, data=tiny_config(
        tiny_ckpt, tmp_path / "run", train={"steps": 2}, checkpoint={"every": 0, "at_end": True},
        eval={"tasks": [{"task": "easy-vqa", "limit": 3, "max_new_tokens": 2, "batch_size": 3},
                        {"task": "no-such-benchmark"}]},
    ))  # fmt: skip
    Trainer(cfg, console_print=lambda *a, **k: lines.append(" ".join(map(str, a)))).fit()
    bench = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "bench/easy-vqa" in r]
    assert len(bench) == 1 and bench[0]["step"] == 2 and 0.0 <= bench[0]["bench/easy-vqa"] <= 100.0
    summary = json.loads((tmp_path / "run" / "benchmarks" / "step-00000002" / "easy-vqa.json").read_text())
    assert summary["samples"] == 3 and summary["score"] == bench[0]["bench/easy-vqa"]
    # A benchmark that cannot run is reported by name, and training still finishes.
    assert any("benchmark no-such-benchmark at step 2 failed" in line and "unknown task" in line for line in lines)
