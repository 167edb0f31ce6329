"""Small helpers the `bench/` scripts share: device timing, memory, machine facts, where results go.

Kept free of Stitch imports so a bench script can import it before anything heavy, and so each script stays
the one place that says what it measures.
"""

from __future__ import annotations

import gc
import json
import platform
import re
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
