"""Real torchrun launches (gloo, CPU) against a single-process reference computed here.

Two launches serve every layout: 2 processes (dp2 FSDP, dp2 replicated, tp2, tp2 with a replicated ViT, pp2
GPipe uneven, pp2 1F1B, pp2 interleaved 1F1B, tied embeddings and packed rows under pp2 and tp2, the DCP dp2 -> tp2
resume) and 4 processes (tp2 x pp2, dp2 x tp2, HSDP 2 x 2 (one rank's row is text-only: the idle ViT must
still join FSDP's collectives), tp4 with a tp2 ViT, and logits from a `stitch reshard` checkpoint).
Each layout trains the tiny VLM for 3 fp32 steps; losses must match within 1e-5 and weights afterwards too.
"""

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

from stitch.checkpoint.reshard import open_weights, reshard_checkpoint
from stitch.checkpoint.store import save
from tests.parallel.common import STEPS, build, make_batch, packed_reference_run, reference_run, tiny_config
from tests.parallel.dist_worker import SCENARIOS

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
LOSS_TOL = 1e-5  # losses, weights and eval loss (absolute), gradient norms (relative)
GPU_TOL = 1e-4  # CUDA kernels (TF32 off) against the CPU reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, out: Path, *scenarios: str, device: str = "cpu") -> None:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.pop("STITCH_TEST_DEVICE", None)
    if device == "cpu":  # gloo on CPU even where GPUs exist; otherwise one GPU per process with NCCL
        env["STITCH_TEST_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "tests.parallel.dist_worker", str(out), *scenarios]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "[rank" in line or "Error" in line]
        pytest.fail(f"torchrun {' '.join(scenarios)} failed ({proc.returncode}):\n" + "\n".join(errors[-60:]))


@pytest.fixture(scope="module")
def references() -> dict:
    runs = {variant: reference_run(tiny_config(variant)) for variant in ("base", "tied", "mha")}
    runs["packed"] = packed_reference_run(tiny_config())  # the base model on packed rows
    return runs


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    save(build(tiny_config()), out / "initial")  # the DCP run starts from this (meta-device build + load)
    _torchrun(2, out, "two", "dcp")
    return out


@pytest.fixture(scope="module")
def four_procs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("four")
    save(build(tiny_config()), out / "original")
    reshard_checkpoint(out / "original", out / "resharded", tp=2, pp=2, layers_per_stage=[3, 1])
    _torchrun(4, out, "four", "logits")
    return out


def _results(out: Path, name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses = json.loads((out / f"{name}.json").read_text())["losses"]
    state: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob(f"{name}.pp*.safetensors")):
        state.update(load_file(f))
    return losses, state


def _eval_loss(state: dict[str, torch.Tensor], variant: str) -> float:
    variant = "base" if variant == "packed" else variant
    model = build(tiny_config(variant)).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(**make_batch(tiny_config(variant), 0), return_logits=False).loss.item()


def _compare(out: Path, name: str, variant: str, references: dict, tol: float = LOSS_TOL) -> None:
    ref_losses, ref_state, ref_norms = references[variant]
    losses, state = _results(out, name)
    # Gradient norms (every shard and stage counted once) match, and so clipping scales alike.
    norms = json.loads((out / f"{name}.json").read_text())["grad_norms"]
    assert norms == pytest.approx(ref_norms, rel=tol), f"{name}: grad norms {norms} vs {ref_norms}"
    # ParallelModel.eval_loss (no grad, no schedule) on the trained model.
    evaluated = json.loads((out / f"{name}.json").read_text())["eval_loss"]
    assert evaluated == pytest.approx(_eval_loss(ref_state, variant), abs=tol, rel=0)
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, abs=tol, rel=0), f"{name}: {losses} vs {ref_losses}"
    assert set(state) == set(ref_state), f"{name}: tensors differ: {set(state) ^ set(ref_state)}"
    for key, value in ref_state.items():
        diff = (state[key] - value).abs().max().item()
        assert diff <= tol, f"{name}: {key} differs by {diff:.2e} after {STEPS} steps"
    # save_weights wrote a checkpoint (plain, or one folder per stage) that reads back as the same weights.
    saved = open_weights(out / f"{name}.weights")
    for key, value in ref_state.items():
        assert (saved[key] - value).abs().max().item() <= tol, f"{name}: saved {key}"
    # The steps really trained: the weights moved far more than the tolerance.
    initial = build(tiny_config("base" if variant == "packed" else variant)).state_dict()
    moved = max((ref_state[k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 100 * tol


@pytest.mark.parametrize("name,variant", [(name, variant) for name, variant, _ in SCENARIOS["two"]])
def test_two_process_layouts_match_one_process(two_procs, references, name, variant):
    _compare(two_procs, name, variant, references)


@pytest.mark.parametrize("name,variant", [(name, variant) for name, variant, _ in SCENARIOS["four"]])
def test_four_process_layouts_match_one_process(four_procs, references, name, variant):
    _compare(four_procs, name, variant, references)


def test_dcp_save_dp2_resume_tp2_continues_the_curve(two_procs):
    """AdamW moments and weights saved under dp2 (5 ViT heads) resume under tp2 (heads padded to 6)."""
    ref_losses, ref_state, _ = reference_run(tiny_config(), steps=2 * STEPS, optimizer="adamw")
    first, _ = _results(two_procs, "dcp_first")
    resumed, state = _results(two_procs, "dcp_resumed")
    assert first + resumed == pytest.approx(ref_losses, abs=LOSS_TOL, rel=0)
    # Adam turns rounding noise on near-zero gradients into visible steps, so weights get a looser bound here.
    assert max((state[k] - v).abs().max().item() for k, v in ref_state.items()) < 1e-3


def test_parallel_run_on_resharded_checkpoint_gives_unsharded_logits(four_procs):
    model = build(tiny_config()).eval()
    with torch.no_grad():
        expected = model(**{k: v for k, v in make_batch(tiny_config(), 0).items() if k != "labels"}).logits
    got = load_file(four_procs / "resharded_logits.safetensors")["logits"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory) -> Path:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path_factory.mktemp("two_gpus")
    _torchrun(2, out, "two", device="cuda")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name,variant", [(name, variant) for name, variant, _ in SCENARIOS["two"]])
def test_two_gpu_layouts_match_one_process(two_gpus, references, name, variant):
    """The same layouts on 2 GPUs with NCCL (one process per GPU), against the CPU reference."""
    _compare(two_gpus, name, variant, references, tol=GPU_TOL)
