"""Where a model runs and in which dtype: the `--device` flag of the commands that run a model, and the one
decision of the compute dtype that training (`train.precision: auto`), the quickstart, generate, eval and serve
share.

On CUDA the answer is bf16. On a CPU it depends on the CPU: with native bf16 (AVX-512-BF16, AMX) a bf16 matmul
is faster than fp32, without it (AVX2-only laptops, many cloud VMs) oneDNN emulates it and it is an order of
magnitude slower. Flags and `torch.backends.cpu.get_cpu_capability()` do not settle it (a capped ISA, a torch
build without the kernels), so a short probe times the shapes that matter in both dtypes, once per process.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stitch.errors import StitchError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

# bf16 is chosen only where it is clearly faster: at parity fp32 keeps the better numerics.
BF16_MIN_SPEEDUP = 1.2


def resolve_device(device: str | None, setting: str = "--device") -> torch.device:
    """`--device` (or the config field named by `setting`) as a torch.device (default: cuda when there is one),
    checked before anything loads."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as e:
        raise StitchError(f"{setting} {name!r}: not a device ({str(e).splitlines()[0]})") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise StitchError(f"{setting} {name!r}: this torch has no CUDA device (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise StitchError(f"{setting} {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif resolved.type not in ("cpu", "mps"):
        raise StitchError(f"{setting} {name!r}: Stitch runs on cpu or cuda")
    return resolved


@dataclass(frozen=True)
class Bf16Probe:
    """Seconds of the probe's work in each dtype on this CPU (the best of a few repeats)."""

    fp32_s: float
    bf16_s: float
    threads: int

    @property
    def speedup(self) -> float:
        """How many times faster bf16 ran than fp32 (below 1: slower)."""
        return self.fp32_s / self.bf16_s


def _probe_work(dtype: torch.dtype) -> Callable[[], None]:
    """The probe's shapes in `dtype`: an LLM MLP's two matmuls and the batched products of attention over short
    rows (SmolLM2-135M's widths, a few hundred tokens: what the CPU recipes run; short rows take SDPA's math
    path, which is these products)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 576, generator=g).to(dtype)
    up = torch.randn(576, 1536, generator=g).to(dtype)
    down = torch.randn(1536, 576, generator=g).to(dtype)
    q = torch.randn(72, 64, 64, generator=g).to(dtype)  # [batch * heads, T, head_dim]

    def work() -> None:
        (x @ up) @ down
        (q @ q.transpose(1, 2)) @ q

    return work


def _seconds(work: Callable[[], None]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@functools.cache
def probe_cpu_bf16() -> Bf16Probe:
    """Time the probe in fp32 and bf16 on this CPU, once per process (cached). The two alternate and each keeps
    its best time, so load from other processes weighs on both alike; an emulating CPU (bf16 10x slower in the
    first round) stops there, paying about a second for its answer."""
    fp32, bf16 = _probe_work(torch.float32), _probe_work(torch.bfloat16)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    with torch.inference_mode():
        fp32(), bf16()  # first calls: kernel selection and allocation, not timed
        for _ in range(7):
            best[torch.float32] = min(best[torch.float32], _seconds(fp32))
            best[torch.bfloat16] = min(best[torch.bfloat16], _seconds(bf16))
            if best[torch.bfloat16] > 10 * best[torch.float32]:
                break
    return Bf16Probe(fp32_s=best[torch.float32], bf16_s=best[torch.bfloat16], threads=torch.get_num_threads())


@dataclass(frozen=True)
class ComputeChoice:
    """The compute dtype for a device and why, as the commands' headers print it ("cpu, fp32: ...")."""

    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32" if self.dtype == torch.float32 else str(self.dtype)

    def __str__(self) -> str:
        return f"{self.device.type}, {self.precision}: {self.reason}"


def compute_dtype(device: torch.device | str, explicit: str | torch.dtype | None = None) -> ComputeChoice:
    """The dtype to compute in on `device`. `explicit` (a setting: "bf16"/"fp32", a `--dtype` name or a
    torch.dtype) wins; otherwise bf16 on CUDA, and on a CPU bf16 only where the probe measured it at least
    `BF16_MIN_SPEEDUP` times faster than fp32."""
    device = torch.device(device)
    if explicit not in (None, "auto"):
        dtype = explicit if isinstance(explicit, torch.dtype) else {**PRECISIONS, **DTYPES}.get(explicit)
        if dtype is None:
            raise StitchError(f"dtype {explicit!r}: expected one of {', '.join([*PRECISIONS, *DTYPES])}")
        return ComputeChoice(device, dtype, "set explicitly")
    if device.type == "cuda":
        return ComputeChoice(device, torch.bfloat16, "CUDA tensor cores")
    if device.type != "cpu":
        return ComputeChoice(device, torch.float32, f"the default on {device.type}")
    probe = probe_cpu_bf16()
    if probe.speedup >= BF16_MIN_SPEEDUP:
        return ComputeChoice(device, torch.bfloat16, f"bf16 measured {probe.speedup:.1f}x faster than fp32 here")
    if probe.speedup < 1:
        return ComputeChoice(device, torch.float32, f"bf16 matmul {1 / probe.speedup:.0f}x slower here")
    return ComputeChoice(device, torch.float32, f"bf16 only {probe.speedup:.2f}x faster here")
