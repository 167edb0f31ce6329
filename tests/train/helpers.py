"""Helpers shared by the trainer tests (configs for the tiny checkpoint of conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_config(ckpt: Path, out: Path, **sections) -> dict:
    """A config dict for the tiny checkpoint on synthetic data; `sections` update it one level deep."""
    cfg = {
        "output_dir": str(out),
        "stage": "sft",
        "model": {"checkpoint": str(ckpt)},
        "synthetic": {"enabled": True, "min_tokens": 12, "max_tokens": 28, "images": 1, "tiles": 1,
                      "answer_fraction": 0.5, "vocab_limit": 250},
        "data": {"batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "max_grad_norm": 1.0},
        "schedule": {"warmup_steps": 2},
        # fp32 pinned: "auto" picks bf16 on CPUs with fast bf16, and these tests compare losses across layouts
        "train": {"steps": 4, "global_batch_size": 4, "device": "cpu", "precision": "fp32"},
        "checkpoint": {"every": 0},
        "log": {"progress": False, "plot": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
