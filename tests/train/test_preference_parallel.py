"""`stitch train` of a dpo stage under torchrun (FSDP2 dp2, gloo, CPU) against one process: the trainer's own
path (the frozen reference copy sharded beside the policy, the pair stream split over ranks, validation on
held-out pairs, collective checkpoints) gives the same per-step loss, rewards and validation metrics within 1e-5,
and a dp2 run stopped after step 2 resumes into the same steps 3 and 4 (the reference reloaded from
model.checkpoint). A dp2 run with `reference: precomputed` (its pass split over the data ranks) matches too; the
pipeline side of that pass (`sequence_logps` under pp2) is checked in tests/parallel/test_preference_layouts.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stitch.train.config import load_config
from stitch.train.loop import Trainer
from tests.train.helpers import tiny_config, write_config
from tests.train.test_preference import _colour_pairs

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "kl", "val_loss",
        "val_rewards/margins", "val_rewards/accuracies", "val_kl")


def _config(ckpt: Path, out: Path, data: Path, held_out: Path) -> dict:
    return tiny_config(ckpt, out, stage="dpo", synthetic={"enabled": False},
                       data={"datasets": [{"path": str(data)}], "batch_size": 2, "num_workers": 0},
                       train={"steps": 4, "global_batch_size": 4},
                       optim={"lr": 2e-3, "max_grad_norm": 1.0}, schedule={"kind": "constant", "warmup_steps": 0},
                       eval={"every": 2, "data": {"datasets": [{"path": str(held_out)}], "batch_size": 4}},
                       checkpoint={"every": 2, "at_end": False, "save_final": False})


def _torchrun(config: Path, *overrides: str, layout: str = "parallel.dp=2") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "stitch", "train", str(config), layout, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _steps(out: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step (a training row and, at eval steps, the validation row)."""
    merged: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row["step"], {}).update(row)
    return merged


def test_dpo_under_fsdp2_equals_one_process_and_resumes(tiny_ckpt, tmp_path):
    data = _colour_pairs(tmp_path, "train", 16, 0)
    held_out = _colour_pairs(tmp_path, "test", 16, 1)
    one = _config(tiny_ckpt, tmp_path / "one", data, held_out)
    Trainer(load_config(None, data=one), console_print=lambda *_: None).fit()
    want = _steps(tmp_path / "one")
    config = write_config(tmp_path / "config.yaml", _config(tiny_ckpt, tmp_path / "unused", data, held_out))
    dp = tmp_path / "dp2"
    _torchrun(config, f"output_dir={dp}", "train.steps=2", "checkpoint.at_end=true")  # stopped after step 2
    assert (dp / "checkpoints" / "latest").read_text().strip() == "step_000002"
    _torchrun(config, f"output_dir={dp}")  # resumed to step 4
    rows = [json.loads(line) for line in (dp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # resumed, not started again
    got = _steps(dp)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        for key in KEYS:
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], abs=1e-5, rel=1e-5), (step, key)
    assert {"val_loss", "val_rewards/accuracies"} <= set(want[2]) and want[4]["rewards/margins"] != 0.0
    # reference: precomputed under dp2 (the pass runs through the sharded policy before step 1, each data rank
    # forwarding its share of every round, rank 0 writing all of it): the frozen copy's steps and validation
    pre = tmp_path / "dp2-precomputed"
    _torchrun(config, f"output_dir={pre}", "preference.reference=precomputed")
    assert len((pre / "reference_logps.jsonl").read_text().splitlines()) == 1 + 16
    assert len((pre / "reference_logps.val.jsonl").read_text().splitlines()) == 1 + 16
    got = _steps(pre)
    for step in want:
        for key in KEYS:
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], abs=1e-5, rel=1e-5), ("precomputed", step, key)
