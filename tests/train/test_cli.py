"""`stitch train` end to end through the CLI: a blend file with train and val splits, the outputs a run leaves,
`--help`, and a bad config failing with the file and field named."""

from __future__ import annotations

import json

import pytest
import yaml

from stitch.cli import main
from stitch.train.log import read_metrics
from tests.train.helpers import tiny_config, write_config


def test_train_command_on_a_blend(tiny_ckpt, tmp_path, capsys):
    blend = tmp_path / "blend.yaml"
    blend.write_text(yaml.safe_dump({
        "__module__": "megatron.energon", "__class__": "Metadataset",
        "splits": {
            "train": {"datasets": [{"weight": 3, "path": "easy-vqa:train", "limit": 32},
                                   {"weight": 1, "path": "easy-vqa:test", "limit": 16, "name": "more"}]},
            "val": {"datasets": [{"weight": 1, "path": "easy-vqa:test", "limit": 8}]},
        },
    }))
    cfg = tiny_config(tiny_ckpt, tmp_path / "unused", stage="pretrain", synthetic={"enabled": False},
                      data={"blend": str(blend), "seq_length": 128, "batch_size": 2, "num_workers": 0},
                      eval={"every": 2, "batches": 2}, train={"steps": 3, "global_batch_size": 2})
    config = write_config(tmp_path / "run.yaml", cfg)
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out), "log.plot=true", "checkpoint.every=2"]) == 0
    printed = capsys.readouterr().out
    assert "projector" in printed and "trains" in printed  # the parameter table
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_per_s"] > 0
    assert (out / "loss.png").exists() and (out / "config.yaml").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
    import stitch

    model, processor = stitch.load(out / "final")
    assert processor.tokenizer is not None and model.config.image_token_id == processor.image_token_id


def test_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "Example:" in capsys.readouterr().out
    bad = write_config(tmp_path / "bad.yaml", {"output_dir": "x", "stage": "finetune", "model": {"checkpoint": "c"},
                                               "synthetic": {"enabled": True}, "train": {"steps": 1}})
    assert main(["train", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'stage'" in err


def test_tiny_recipes_chain_pretrain_then_sft(smol_tokenizer_dir, tmp_path):
    """configs/tiny-pretrain.yaml then configs/tiny-sft.yaml, shortened: stage 1's final/ starts stage 2."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs"
    short = ["train.steps=2", "train.global_batch_size=4", "checkpoint.every=0", "log.progress=false",
             "log.plot=false", "data.datasets=[{path: 'easy-vqa:train', limit: 16}]"]
    pre = tmp_path / "pre"
    assert main(["train", str(configs / "tiny-pretrain.yaml"), f"output_dir={pre}",
                 f"model.tokenizer={smol_tokenizer_dir}", *short]) == 0
    sft = tmp_path / "sft"
    assert main(["train", str(configs / "tiny-sft.yaml"), f"output_dir={sft}",
                 f"model.checkpoint={pre / 'final'}", *short]) == 0
    assert (sft / "final" / "model.safetensors").exists()
