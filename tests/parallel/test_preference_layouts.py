"""The preference step under the parallel layouts (one torchrun launch, 2 gloo processes, CPU) against one
process: `train_step` with the MPO objective (sigmoid + bco_pair + sft, so the global pair and chosen-token
denominators both matter) for 2 SGD steps of 4 image pairs, the reference a frozen copy sharded as the policy is
(FSDP2 dp2, DTensor tp2, pp2 1F1B) or, under LoRA, the policy with its adapters off (dp2). The loss, gradient
norm, rewards and every other metric of each step, and the weights afterwards, must equal the one-process run's
within 1e-5 (fp32), and so must the held-out evaluation (`evaluate_pairs`) of the trained model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.parallel.common import tiny_config
from tests.parallel.preference_common import micro_batches, run, setup
from tests.parallel.preference_worker import LAYOUTS

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "kl", "loss/sigmoid", "loss/bco_pair", "loss/sft")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pref-layouts")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "STITCH_TEST_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tests.parallel.preference_worker", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return out


@pytest.fixture(scope="module")
def one_process() -> dict:
    cfg = tiny_config()
    runs = {}
    for kind in ("copy", "lora", "bf16"):
        model, objective = setup(kind, torch.device("cpu"))
        records = run(model, objective, lambda step: micro_batches(cfg, step, one_batch=True),
                      [p for p in model.parameters() if p.requires_grad], torch.device("cpu"))
        runs[kind] = (records, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return runs


@pytest.mark.parametrize("name,kind,layout", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_preference_step_under_a_layout_equals_one_process(launched, one_process, name, kind, layout):
    want, weights = one_process[kind]
    got = json.loads((launched / f"{name}.json").read_text())["records"]
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for key in METRICS:
            assert g[key] == pytest.approx(w[key], abs=TOL), (name, step, key)
        if step < len(want) - 1:  # training steps; the last record is the held-out evaluation
            assert g["label_tokens"] == w["label_tokens"]
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=TOL), (name, step)
    assert want[-1]["rewards/margins"] != 0.0 and want[-1]["kl"] != 0.0  # the policy moved from the reference
    assert got[-1]["sequence_logps"] == pytest.approx(want[-1]["sequence_logps"], abs=TOL)  # on global rank 0
    state = {}
    for part in sorted(launched.glob(f"{name}.pp*.safetensors")):
        state.update(load_file(part))
    assert set(state) == set(weights)
    for key, value in state.items():
        torch.testing.assert_close(value, weights[key], atol=TOL, rtol=0, msg=f"{name}: {key}")
