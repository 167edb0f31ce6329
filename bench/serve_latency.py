"""Time to first token when every request has a new shape, as a server sees it: Stitch's engine with and without
its any-shape attention kernels, and `transformers`' `generate`.

`generate_throughput.py` repeats one prompt shape, so a kernel's per-shape setup is paid in its warm-up and never
timed. Here each of `--requests` single requests has its own tile count (1-6) and text length, so cuDNN's
attention (SDPA's choice on Hopper) builds a new plan for nearly every one. The requests run twice: `first`
(shapes never seen) and `again` (the same shapes repeated: plans cached), one at a time after one warm-up request
of yet another shape. Reported per system: mean, median and max TTFT over each pass.

- stitch: `Engine(...)`, prefill on kernels without per-shape plans (`any_shape_attention=True`, the default);
- stitch-sdpa-choice: `Engine(..., any_shape_attention=False)`: SDPA picks (cuDNN on an H200);
- hf: `InternVLForConditionalGeneration.generate` with SDPA, same weights.

  python bench/serve_latency.py            # GPU, 2B shape
  python bench/serve_latency.py --tiny     # CPU smoke check
Writes bench/results/serve_latency_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _common import RESULTS_DIR, device_slug, machine_info, write_json
from generate_throughput import _BenchProcessor, build_hf, model_config, prompts, run_hf, run_stitch

from stitch.checkpoint.store import build_model
from stitch.infer.engine import Engine


def request_shapes(count: int, tiny: bool) -> list[tuple[int, int]]:
    """(tiles, text tokens) of each request: tile counts cycle 1-6, text lengths all differ."""
    return [(1 + i % 6, (8 if tiny else 20) + (3 if tiny else 37) * i) for i in range(count)]


def summary(ttfts: list[float]) -> dict:
    return dict(mean_s=round(statistics.mean(ttfts), 4), median_s=round(statistics.median(ttfts), 4),
                max_s=round(max(ttfts), 4), each_s=[round(t, 4) for t in ttfts])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU, fp32")
    ap.add_argument("--preset", default="internvl-2b", choices=["internvl-2b", "internvl-8b"])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(args.tiny, args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    systems: dict[str, object] = {
        "stitch": Engine(model, _BenchProcessor(), eos_ids=(), max_batch_size=1),
        "stitch-sdpa-choice": Engine(model, _BenchProcessor(), eos_ids=(), max_batch_size=1,
                                     any_shape_attention=False),
    }
    if not args.skip_hf:
        systems["hf"] = build_hf(cfg, model, device, dtype)
    shapes = request_shapes(args.requests, args.tiny)
    requests = [prompts(cfg, 1, tiles, text, device, dtype, seed=i) for i, (tiles, text) in enumerate(shapes)]
    warmup = prompts(cfg, 1, 2, 8 if args.tiny else 500, device, dtype, seed=999)  # a shape no request has

    def call(name, system, ids, pixels, tiles):
        if name == "hf":
            return run_hf(system, ids, pixels, args.new_tokens, device)
        return run_stitch(system, ids, pixels, tiles, args.new_tokens, device)

    rows = []
    for name, system in systems.items():
        call(name, system, *warmup, 2)
        row: dict = dict(system=name)
        for pass_name in ("first", "again"):
            ttfts = [call(name, system, ids, pixels, tiles)[1] for (ids, pixels), (tiles, _) in zip(requests, shapes)]
            row[pass_name] = summary(ttfts)
        rows.append(row)
        print(json.dumps({k: v if k == "system" else {s: v[s] for s in ("mean_s", "median_s", "max_s")}
                          for k, v in row.items()}), flush=True)
    report = dict(benchmark="serve_latency", model=f"{'vlm-tiny' if args.tiny else args.preset} (random weights)",
                  dtype=str(dtype).removeprefix("torch."), new_tokens=args.new_tokens,
                  requests=[dict(tiles=t, text_tokens=n) for t, n in shapes], machine=machine_info(device),
                  results=rows)
    write_json(args.out or RESULTS_DIR / f"serve_latency_{device_slug(device)}.json", report)
    print(f"\nTTFT, a new shape every request ({args.requests} at batch 1), {report['machine']['device']}")
    print(f"{'system':<20} {'first: mean':>12} {'median':>8} {'max':>8} | {'again: mean':>12} {'median':>8} {'max':>8}")
    for r in rows:
        f, a = r["first"], r["again"]
        print(f"{r['system']:<20} {f['mean_s']:>12.4f} {f['median_s']:>8.4f} {f['max_s']:>8.4f} | "
              f"{a['mean_s']:>12.4f} {a['median_s']:>8.4f} {a['max_s']:>8.4f}")
    return report


if __name__ == "__main__":
    main()
