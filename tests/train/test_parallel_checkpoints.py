"""`stitch train` under torchrun (gloo, CPU) saves step checkpoints and a final model from a parallel layout,
and any layout -- or one process -- resumes them: the loss curve continues exactly where the run left off."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stitch.checkpoint.store import load_model
from stitch.train.config import TrainConfig
from stitch.train.trainer import Trainer
from tests.train.helpers import tiny_config, write_config

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(ckpt: Path, out: Path) -> dict:
    """The ViT trains too, so the optimizer holds moments of its (head-padded under TP) attention tensors."""
    return tiny_config(ckpt, out, train={"steps": STEPS, "global_batch_size": 4, "device": "cpu"},
                       checkpoint={"every": 2, "at_end": True, "save_final": True, "keep_last": 3},
                       unfreeze={"vision": True})


def _torchrun(config: Path, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "stitch", "train", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _rewind_to_step_2(run: Path, copy: Path) -> Path:
    """A copy of `run` as if it had been stopped right after saving step 2."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000004")
    shutil.rmtree(copy / "final")
    (copy / "checkpoints" / "latest").write_text("step_000002\n")
    return copy


@pytest.fixture(scope="module")
def runs(small_ckpt, tmp_path_factory) -> dict[str, Path]:
    """One process straight through; tp2 (the ViT's 4 heads padded to 6) and pp2 under torchrun with checkpoints
    at steps 2 and 4."""
    root = tmp_path_factory.mktemp("parallel-ckpt")
    single = root / "single"
    Trainer(TrainConfig.model_validate(_config(small_ckpt, single)), console_print=lambda *_: None).fit()
    config = write_config(root / "config.yaml", _config(small_ckpt, root / "unused"))
    out = {"single": single, "config": config, "root": root}
    for layout, extra in (("tp", ["parallel.vision_padded_heads=6"]), ("pp", [])):
        out[layout] = root / layout
        _torchrun(config, f"output_dir={out[layout]}", f"parallel.{layout}=2", *extra)
    return out


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_layout_saves_step_folders_and_a_final_model(runs, layout):
    run = runs[layout]
    assert _losses(run) == pytest.approx(_losses(runs["single"]), abs=1e-5)
    step = run / "checkpoints" / "step_000002"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert {p.name for p in (step / "train_state").iterdir()} >= {
        "optimizer", "state.json", "rank0.json", "rank1.json", "rng.rank0.safetensors", "rng.rank1.safetensors"}
    assert not list((run / "checkpoints").glob(".*partial"))
    # The final weights (one file under tp, per-stage folders under pp) read back as the straight run's.
    got, want = load_model(run / "final").state_dict(), load_model(runs["single"] / "final").state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_one_process_resumes_a_layout_checkpoint(runs, layout, small_ckpt):
    resumed = _rewind_to_step_2(runs[layout], runs["root"] / f"{layout}-to-one")
    Trainer(TrainConfig.model_validate(_config(small_ckpt, resumed)), console_print=lambda *_: None).fit()
    got, want = _losses(resumed), _losses(runs["single"])
    assert [got[3], got[4]] == pytest.approx([want[3], want[4]], abs=1e-5)


def test_another_layout_resumes_it(runs):
    resumed = _rewind_to_step_2(runs["tp"], runs["root"] / "tp-to-pp")
    _torchrun(runs["config"], f"output_dir={resumed}", "parallel.pp=2")
    got, want = _losses(resumed), _losses(runs["single"])
    assert [got[3], got[4]] == pytest.approx([want[3], want[4]], abs=1e-5)


def test_a_changed_vision_tp_degree_resumes_with_the_loss_continuing(runs):
    """Saved under tp2 with the ViT's 4 heads padded to 6 (vision_tp 2), resumed with the ViT replicated (vision_tp
    1, 4 heads): its AdamW moments' global shapes differ, which DCP cannot reshard alone, so the trainer's
    optimizer load re-pads them (stitch.parallel.dcp.load_repadded). tp2 -> pp2 and tp2 -> one process above
    take the same path."""
    resumed = _rewind_to_step_2(runs["tp"], runs["root"] / "tp-vit-padded-to-replicated")
    _torchrun(runs["config"], f"output_dir={resumed}", "parallel.tp=2", "parallel.vision_tp=1")
    got, want = _losses(resumed), _losses(runs["single"])
    assert [got[3], got[4]] == pytest.approx([want[3], want[4]], abs=1e-5)


def test_data_parallel_position_carries_over_to_one_process(runs, small_ckpt):
    """dp2 reads the synthetic samples split over two ranks; one process resumes at the same global sample."""
    dp = runs["root"] / "dp"
    _torchrun(runs["config"], f"output_dir={dp}", "parallel.dp=2")
    assert _losses(dp) == pytest.approx(_losses(runs["single"]), abs=1e-5)
    resumed = _rewind_to_step_2(dp, runs["root"] / "dp-to-one")
    Trainer(TrainConfig.model_validate(_config(small_ckpt, resumed)), console_print=lambda *_: None).fit()
    got, want = _losses(resumed), _losses(runs["single"])
    assert [got[3], got[4]] == pytest.approx([want[3], want[4]], abs=1e-5)


def test_a_layout_without_the_collective_writer_refuses_checkpoints_by_name(small_ckpt, tmp_path):
    from stitch.errors import StitchConfigError
    from stitch.train.trainer import Distributed

    cfg = TrainConfig.model_validate(_config(small_ckpt, tmp_path / "run"))
    trainer = Trainer(cfg, Distributed(parallelize=lambda model, _: model), console_print=lambda *_: None)
    with pytest.raises(StitchConfigError, match="save_weights and barrier"):
        trainer.setup()
