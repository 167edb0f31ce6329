"""The whole loop learns: a tiny model memorises 16 samples (per-token loss below 0.05)."""

from __future__ import annotations

from stitch.train.config import load_config
from stitch.train.log import read_metrics
from stitch.train.trainer import Trainer
from tests.train.helpers import tiny_config


def test_tiny_model_overfits_16_samples(small_ckpt, tmp_path):
    cfg = load_config(None, data=tiny_config(
        small_ckpt, tmp_path / "run",
        synthetic={"num_samples": 16, "min_tokens": 16, "max_tokens": 24, "vocab_limit": 64},
        data={"batch_size": 8, "num_workers": 0},
        optim={"lr": 1e-2, "weight_decay": 0.0, "max_grad_norm": 1.0},
        schedule={"warmup_steps": 5, "min_lr": 0.0},
        train={"steps": 40, "global_batch_size": 16},  # every step sees all 16 samples (2 micro-batches)
        checkpoint={"every": 0, "save_final": False},
        log={"progress": False, "plot": True},
    ))
    summary = Trainer(cfg, console_print=lambda *_: None).fit()
    assert summary.losses[0] > 4.0 and summary.losses[-1] < 0.05, summary.losses[::5]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 40 and records[-1]["label_tokens"] > 16 * 5
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in records)  # no CPU peak configured
    assert (tmp_path / "run" / "loss.png").exists()
