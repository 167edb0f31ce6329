"""The compute-dtype decision, on this CPU's real measurements and on an AVX2-only CPU emulated in a subprocess
(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`: oneDNN then has no native bf16 and emulates it)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from stitch.cli import main
from stitch.device import BF16_MIN_SPEEDUP, compute_dtype, probe_cpu_bf16
from stitch.errors import StitchError

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
DECIDE = ("import json; from stitch.device import compute_dtype, probe_cpu_bf16; c = compute_dtype('cpu'); "
          "print(json.dumps({'precision': c.precision, 'reason': c.reason, 'speedup': probe_cpu_bf16().speedup}))")


def _matmul_seconds(dtype: torch.dtype) -> float:
    """An independent timing, larger than the probe's: a 512x576 @ 576x1536 product (SmolLM2's MLP)."""
    a, b = torch.randn(512, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def test_cpu_choice_agrees_with_an_independent_timing():
    choice, probe = compute_dtype("cpu"), probe_cpu_bf16()
    assert probe is probe_cpu_bf16()  # measured once per process
    assert choice.precision == ("bf16" if probe.speedup >= BF16_MIN_SPEEDUP else "fp32")
    ratio = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
    if ratio > 2 * BF16_MIN_SPEEDUP:
        assert choice.precision == "bf16", (ratio, probe)
    elif ratio < 0.5:
        assert choice.precision == "fp32", (ratio, probe)
    assert str(choice).startswith(f"cpu, {choice.precision}: ")


def test_a_cpu_without_native_bf16_computes_in_fp32():
    env = {**os.environ, **AVX2_ONLY}
    out = subprocess.run([sys.executable, "-c", DECIDE], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["precision"] == "fp32", result
    assert result["speedup"] < 0.5  # emulated bf16: an order of magnitude slower, measured
    assert "slower here" in result["reason"]


def test_explicit_settings_win_and_cuda_is_bf16():
    assert compute_dtype("cpu", "fp32").dtype == torch.float32
    assert compute_dtype("cpu", "bfloat16").dtype == torch.bfloat16
    assert compute_dtype("cpu", torch.float16).reason == "set explicitly"
    assert compute_dtype("cuda").dtype == torch.bfloat16
    with pytest.raises(StitchError, match="dtype 'fp64'"):
        compute_dtype("cpu", "fp64")


def test_stitch_env_reports_the_choice(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert report["cpu"]["compute"] == str(compute_dtype("cpu"))
    assert report["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(report["extras"]) >= {"serve", "eval", "lora", "video"}
    assert report["extras"]["serve"] is True  # the dev extras install FastAPI and uvicorn
    assert main(["env"]) == 0
    assert "compute: cpu, " in capsys.readouterr().out
