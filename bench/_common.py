"""Small helpers the `bench/` scripts share: device timing, memory, machine facts, where results go.

Kept free of Stitch imports so a bench script can import it before anything heavy, and so each script stays
the one place that says what it measures.
"""

from __future__ import annotations

import gc
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a host clock around a region measures the region (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """`torch.cuda.max_memory_allocated` in GiB since the last reset; None off CUDA (no comparable counter)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    """Return cached blocks and restart the peak counter, so the next configuration starts clean.

    Call it after the last reference to the previous model/optimizer is gone (`del` them first; an exception's
    traceback holds its frames' locals until the `except` block ends).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException) -> bool:
    """A device out-of-memory error: the typed one, or a kernel's RuntimeError that says so (cuBLAS, NCCL)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def name_slug(name: str) -> str:
    """A file-name-safe form of a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """`name_slug` of the device's name; every CPU is just 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return name_slug(device_name(device)) or "cuda"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to reproduce or compare a number: device, library versions, Python."""
    info: dict[str, Any] = dict(
        device=device_name(device), device_type=device.type, torch=torch.__version__,
        python=platform.python_version(),
    )
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_json(path: str | Path, report: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def profile_call(fn, device: torch.device, path: str | Path, rows: int = 40) -> Path:
    """Run `fn()` once under `torch.profiler` and write where its time went to `path` (text).

    The file opens with the wall time, the device's busy time (summed kernel time, so idle gaps from host
    overhead or syncs show as the difference) and the kernel time by family (matmul, attention, ...), then
    the `rows` ops with the most device time (CPU time on a CPU).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=False) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kernels)
    families: dict[str, float] = {}
    for e in kernels:
        families[kernel_family(e.name)] = families.get(kernel_family(e.name), 0.0) + e.device_time_total
    lines = [f"wall {wall * 1e3:.1f} ms"]
    if device.type == "cuda":
        lines[0] += f"; device busy {busy_us / 1e3:.1f} ms ({len(kernels)} kernels)"
    lines += [f"  {name:<12} {us / 1e3:9.1f} ms" for name, us in sorted(families.items(), key=lambda kv: -kv[1])]
    lines += idle_gaps(kernels)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines += ["", prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=90)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def idle_gaps(kernels: list, top: int = 12, min_us: float = 50.0) -> list[str]:
    """Where the device sat idle between kernels: the total of gaps over `min_us` and the longest ones, each
    named by the kernels either side (a host sync or a slow host region shows up as a long gap)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    gaps, end, before = [], None, ""
    for start, stop, name in spans:
        if end is not None and start - end > min_us:
            gaps.append((start - end, before, name))
        if end is None or stop > end:
            end, before = stop, name
    if not gaps:
        return []
    lines = [f"idle gaps over {min_us:g} us: {len(gaps)}, {sum(g for g, _, _ in gaps) / 1e3:.1f} ms in all; longest:"]
    for gap, prev, nxt in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {gap / 1e3:7.2f} ms  after {prev[:70]}  before {nxt[:70]}")
    return lines


_FAMILIES = (  # first match wins; lower-case substrings of a CUDA kernel's name
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton", ("triton",)),
    ("copy/cast", ("copy", "cast", "convert", "fill", "memset", "memcpy")),
    ("reduce", ("reduce", "norm", "softmax", "cross_entropy", "nll")),
)


def kernel_family(name: str) -> str:
    low = name.lower()
    return next((family for family, keys in _FAMILIES if any(k in low for k in keys)), "other")
