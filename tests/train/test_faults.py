"""Faults: non-finite steps are skipped and counted (and stop the run when they persist), a full disk
fails the save cleanly with the previous checkpoint intact, and SIGTERM saves and exits."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import torch

from stitch.checkpoint.store import load_model, model_state
from stitch.errors import CheckpointError
from stitch.train import state as state_mod
from stitch.train.config import load_config
from stitch.train.log import read_metrics
from stitch.train.state import latest_checkpoint
from stitch.train.trainer import Trainer, TrainingError
from tests.train.helpers import tiny_config

QUIET = {"console_print": lambda *_: None}


def _poison(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the projector output NaN during the given (1-based) steps."""
    micro = trainer.cfg.accumulation_steps
    calls = {"n": 0}

    def hook(module, args, output):
        step = calls["n"] // micro + 1
        calls["n"] += 1
        return output * float("nan") if step in bad_steps else output

    trainer.model.projector.register_forward_hook(hook)


def test_nan_step_is_skipped_and_counted(small_ckpt, tmp_path):
    cfg = load_config(None, data=tiny_config(small_ckpt, tmp_path / "run", train={"steps": 4}))
    trainer = Trainer(cfg, **QUIET)
    trainer.setup()
    _poison(trainer, {2})
    snapshots = []
    original = trainer._one_step

    def spy(batches):
        record = original(batches)
        snapshots.append({k: v.clone() for k, v in model_state(trainer.model).items()})
        return record

    trainer._one_step = spy
    trainer.fit()
    assert trainer.state.bad_steps == 1 and trainer.state.bad_in_a_row == 0
    # Step 2 changed nothing; steps 3-4 trained again.
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert records[1]["loss"] == "nan"
    assert all(torch.isfinite(t).all() for t in model_state(load_model(tmp_path / "run" / "final")).values())


def test_persistent_nan_stops_with_clear_error(small_ckpt, tmp_path):
    cfg = load_config(None, data=tiny_config(small_ckpt, tmp_path / "run", train={"steps": 10, "max_bad_steps": 3}))
    trainer = Trainer(cfg, **QUIET)
    trainer.setup()
    _poison(trainer, set(range(2, 11)))
    with pytest.raises(TrainingError, match=r"step 4: 3 steps in a row had a non-finite loss"):
        trainer.fit()


def test_disk_full_keeps_previous_checkpoint(small_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, data=tiny_config(small_ckpt, out, train={"steps": 6}, checkpoint={"every": 2}))
    calls = {"n": 0}
    real = state_mod.save_tensors

    def full_disk(state, out_dir, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save
            real(state, out_dir, *a, **k)  # a partial write, then the disk fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(state, out_dir, *a, **k)

    monkeypatch.setattr(state_mod, "save_tensors", full_disk)
    with pytest.raises(CheckpointError) as e:
        Trainer(cfg, **QUIET).fit()
    msg = str(e.value)
    assert "disk full" in msg and "step_000004" in msg and "step_000002 is intact" in msg
    assert latest_checkpoint(out).name == "step_000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002"]
    load_model(out / "checkpoints" / "step_000002")  # loads
    # Space is back: the same run resumes from step 2 and finishes.
    monkeypatch.setattr(state_mod, "save_tensors", real)
    resumed = Trainer(cfg, **QUIET)
    summary = resumed.fit()
    assert resumed.resume_from.name == "step_000002" and summary.step == 6 and summary.final_dir is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_cleanly(small_ckpt, tmp_path, sig):
    out = tmp_path / "run"
    cfg = load_config(None, data=tiny_config(small_ckpt, out, train={"steps": 6}))
    trainer = Trainer(cfg, **QUIET)
    trainer.setup()
    calls = {"n": 0}

    def send_signal(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # first micro-batch of step 2
            os.kill(os.getpid(), sig)
        return output

    trainer.model.projector.register_forward_hook(send_signal)
    summary = trainer.fit()
    assert summary.interrupted == sig.name and summary.step == 2
    assert latest_checkpoint(out).name == "step_000002" and not (out / "final").exists()
    assert signal.getsignal(sig) is not None  # handlers restored
    done = Trainer(cfg, **QUIET).fit()
    assert done.step == 6 and done.interrupted is None


def test_time_limit_stops_the_loop_and_still_saves(small_ckpt, tmp_path):
    """`train.max_minutes` ends the run on the clock (a budget that holds when the machine slows down): the
    steps done are saved as at the end of a run, and the summary says how many ran."""
    cfg = load_config(None, data=tiny_config(small_ckpt, tmp_path / "run", train={"steps": 50, "max_minutes": 1e-6},
                                             checkpoint={"every": 0, "at_end": True, "save_final": True}))
    run = Trainer(cfg, **QUIET).fit()  # any step takes longer than the 60 us limit
    assert run.step == 1 and len(run.losses) == 1
    assert latest_checkpoint(tmp_path / "run").name == "step_000001"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
