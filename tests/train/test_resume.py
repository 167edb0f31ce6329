"""Resume is exact: a run killed with SIGKILL and resumed equals the run never interrupted, bit for bit.

Real subprocesses (`python -m stitch train`), real easy-VQA data through the data pipeline (so the data
position is restored), dropout on (so the RNG state is), validation in between (which must not disturb
either), and gradient accumulation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from stitch.train.log import read_metrics
from tests.train.helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parents[2]


def _config(tiny_ckpt: Path, out: Path) -> dict:
    return tiny_config(
        tiny_ckpt, out,
        model={"checkpoint": str(tiny_ckpt), "llm_dropout": 0.1},
        synthetic={"enabled": False},
        data={"datasets": [{"path": "easy-vqa:train", "limit": 64}], "seq_length": 128, "batch_size": 2,
              "num_workers": 0},
        eval={"every": 3, "batches": 2, "data": {"datasets": [{"path": "easy-vqa:test", "limit": 8}],
                                                   "seq_length": 128, "batch_size": 2, "num_workers": 0}},
        train={"steps": 8, "global_batch_size": 4, "device": "cpu"},
        checkpoint={"every": 4, "keep_last": 1},
        log={"progress": False, "plot": True},
    )


def _launch(config: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stitch", "train", str(config), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _losses(out: Path) -> dict[int, float]:
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_sigkill_then_resume_is_bitwise_identical(tiny_ckpt, tmp_path):
    straight_cfg = write_config(tmp_path / "straight.yaml", _config(tiny_ckpt, tmp_path / "straight"))
    killed_cfg = write_config(tmp_path / "killed.yaml", _config(tiny_ckpt, tmp_path / "killed"))
    straight = _launch(straight_cfg, "checkpoint.every=0")
    # The killed run sleeps after its step-4 checkpoint, so the kill lands at a known point of a live run.
    victim = _launch(killed_cfg, "checkpoint.pause_after_save_s=120")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert latest.read_text().strip() == "step_000004"
    assert not (tmp_path / "killed" / "final").exists()

    resumed_log = _finish(_launch(killed_cfg))  # the same command again: resumes
    assert "resuming from" in resumed_log and "step 4" in resumed_log
    _finish(straight)

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"weights differ after resume: {differing[:5]}"
    la, lb = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert list(la) == list(range(1, 9)) and la == lb
    val_a = [r["val_loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl") if "val_loss" in r]
    assert val_a == val_b and len(val_a) == 3  # steps 3, 6 and the end
    # The checkpoint folder is a complete Stitch checkpoint plus the training state.
    step = tmp_path / "killed" / "checkpoints" / "step_000008"
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_state"} <= {p.name for p in step.iterdir()}
    state = json.loads((step / "train_state" / "state.json").read_text())
    assert state["step"] == 8 and state["data"]["slots"]
    assert (tmp_path / "killed" / "loss.png").stat().st_size > 1000
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*"))  # no temporary folders left behind
