"""Training configs: YAML bases, typed key=value overrides, errors that name the file and field, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stitch.errors import StitchConfigError
from stitch.train.config import load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

MINIMAL = {
    "output_dir": "runs/x",
    "stage": "pretrain",
    "model": {"checkpoint": "ckpt/tiny"},
    "data": {"datasets": [{"path": "easy-vqa:train"}]},
    "train": {"steps": 10},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_merge_and_overrides(tmp_path):
    _write(tmp_path / "base.yaml", {**MINIMAL, "optim": {"lr": 1e-3, "weight_decay": 0.2}})
    recipe = _write(tmp_path / "recipe.yaml", {"base": "base.yaml", "optim": {"lr": 5e-4}, "stage": "sft"})
    cfg = load_config(recipe, ["optim.betas=[0.8, 0.9]", "train.steps=7", "model.random_init=true",
                               "model.preset=vlm-tiny", "schedule.min_lr=1e-5", "output_dir=2024"])
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.2  # recipe over base, deep merge
    assert cfg.optim.betas == (0.8, 0.9) and cfg.train.steps == 7 and cfg.model.random_init
    assert cfg.schedule.min_lr == 1e-5  # "1e-5" is a string to YAML 1.1; still a float here
    assert cfg.output_dir == "2024"  # string fields keep the text
    assert cfg.stage == "sft" and cfg.trains("llm") and not cfg.trains("vision")


def test_error_names_file_and_field(tmp_path):
    _write(tmp_path / "base.yaml", {**MINIMAL, "optim": {"lr": "fast"}})
    recipe = _write(tmp_path / "recipe.yaml", {"base": "base.yaml", "train": {"steps": 5}})
    with pytest.raises(StitchConfigError) as e:
        load_config(recipe)
    assert "base.yaml" in str(e.value) and "optim.lr" in str(e.value)
    with pytest.raises(StitchConfigError) as e:
        load_config(recipe, ["optim.lr=-1", "optim.fused=false"])
    assert str(e.value).startswith("command line: field 'optim.lr'")
    with pytest.raises(StitchConfigError, match=r"recipe.yaml: field 'train.stepz': unknown key.*train.steps"):
        _write(tmp_path / "recipe.yaml", {"base": "base.yaml", "train": {"stepz": 5}})
        load_config(recipe, ["optim.lr=1e-3"])
    with pytest.raises(StitchConfigError, match="unknown key 'optim.lrr'.*optim.lr"):
        parse_overrides(["optim.lrr=1"])
    with pytest.raises(StitchConfigError, match="not key=value"):
        parse_overrides(["optim.lr"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(StitchConfigError, match="global_batch_size"):
        load_config(None, ["train.global_batch_size=3", "data.batch_size=2"], data=MINIMAL)
    with pytest.raises(StitchConfigError, match="random_init needs 'preset'"):
        load_config(None, ["model.random_init=true"], data=MINIMAL)
    no_data = {k: v for k, v in MINIMAL.items() if k != "data"}
    with pytest.raises(StitchConfigError, match="no training data"):
        load_config(None, data=no_data)
    cfg = load_config(None, ["train.global_batch_size=8", "data.batch_size=2"], data=MINIMAL)
    assert cfg.accumulation_steps == 4 and cfg.decay_steps == 10


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "base.yaml"))
def test_recipes_validate(recipe):
    cfg = load_config(CONFIGS / recipe, ["output_dir=/tmp/unused"])
    assert cfg.train.steps > 0
    if recipe.startswith("nvlm-d-72b"):
        assert cfg.parallel.tp == 8 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.max_grad_norm == 10.0
        assert cfg.parallel.pp == (1 if "pretrain" in recipe else 4)
        assert cfg.train.global_batch_size == (2048 if "pretrain" in recipe else 256)
        assert (cfg.optim.lr, cfg.schedule.min_lr) == ((1e-4, 2.5e-5) if "pretrain" in recipe else (2e-6, 2.5e-7))


@pytest.mark.parametrize("base", [5, [5], ""])
def test_a_base_that_is_not_a_file_name_is_named(tmp_path, base):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"base": base, "output_dir": "x"}))
    with pytest.raises(StitchConfigError, match="'base' must be a config file name"):
        load_config(cfg)


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(StitchConfigError, match="run.yaml: not UTF-8"):
        load_config(cfg)
