"""SDPA backends on this GPU: steady-state forward+backward time, and the cost of the first call at a new shape.

Why it exists: cuDNN's attention builds an execution plan the first time it meets a shape, and a training run
whose shapes vary (the number of tiles in a packed row, the padded length of a batch, a prompt's length) meets
new shapes for many steps. This times, for the shapes of the 2B model (ViT: tiles x 16 heads x 1,025 tokens x
64, bidirectional; LLM: 12 query / 2 K/V heads x 128, causal), each backend that accepts them:

- `steady_ms`: forward+backward at one shape after warm-up (median of `--repeats`);
- `first_ms`: the first forward+backward at each of `--new-shapes` batch sizes never seen before (mean);
  what a step pays when its shape is new.

  python bench/attention_backends.py            # CUDA only
Writes bench/results/attention_backends_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import RESULTS_DIR, device_slug, machine_info, sync, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
SHAPES = {  # name: (batch, query heads, K/V heads, tokens, head dim, causal)
    "vit_2b": (48, 16, 16, 1025, 64, False),
    "llm_2b": (8, 12, 2, 2048, 128, True),
}


def fwd_bwd(q, k, v, causal: bool, backend: SDPBackend) -> None:
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    out.backward(torch.ones_like(out))


def tensors(batch: int, hq: int, hkv: int, t: int, d: int, device: torch.device):
    def make(h: int) -> torch.Tensor:
        return torch.randn(batch, h, t, d, device=device, dtype=torch.bfloat16, requires_grad=True)

    return make(hq), make(hkv), make(hkv)


def timed(fn) -> float:
    sync(DEVICE)
    start = time.perf_counter()
    fn()
    sync(DEVICE)
    return (time.perf_counter() - start) * 1e3


def measure(shape: tuple, backend: SDPBackend, repeats: int, new_shapes: int) -> dict:
    batch, hq, hkv, t, d, causal = shape
    q, k, v = tensors(batch, hq, hkv, t, d, DEVICE)
    try:
        first = timed(lambda: fwd_bwd(q, k, v, causal, backend))
    except RuntimeError as e:  # this backend does not take this shape
        return dict(status="unsupported", error=str(e).splitlines()[0][:200])
    steady = statistics.median(timed(lambda: fwd_bwd(q, k, v, causal, backend)) for _ in range(repeats))
    fresh = []
    for i in range(new_shapes):  # batch sizes below `batch` that nothing has used yet
        smaller = tensors(batch - 1 - i, hq, hkv, t, d, DEVICE)
        fresh.append(timed(lambda x=smaller: fwd_bwd(*x, causal, backend)) - steady * (batch - 1 - i) / batch)
    return dict(status="ok", steady_ms=round(steady, 3), first_call_ms=round(first, 1),
                new_shape_extra_ms=round(statistics.mean(fresh), 1))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--new-shapes", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_backends: needs a CUDA device")
    rows = []
    for shape_name, shape in SHAPES.items():
        for backend_name, backend in BACKENDS.items():
            row = dict(shape=shape_name, backend=backend_name, **measure(shape, backend, args.repeats,
                                                                          args.new_shapes))
            rows.append(row)
            print(row, flush=True)
    report = dict(benchmark="attention_backends", shapes={k: list(v) for k, v in SHAPES.items()},
                  shape_fields="batch, query heads, K/V heads, tokens, head dim, causal", machine=machine_info(DEVICE),
                  results=rows)
    write_json(args.out or RESULTS_DIR / f"attention_backends_{device_slug(DEVICE)}.json", report)
    return report


DEVICE = torch.device("cuda")

if __name__ == "__main__":
    main()
