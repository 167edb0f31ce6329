"""Decode-step latency of Stitch's engine: one CUDA-graph replay of a decode step, eager kernels vs torch.compile.

`generate_throughput.py` times whole calls (prefill included); this isolates the step the engine replays 127 times
for 128 new tokens, so a change to the decode path shows up undiluted. Per batch size: one warm-up call (captures
the graph, compiles), then a timed call, then `--replays` bare replays of the captured graph.

  python bench/decode_step.py                       # 2B shape, batch 1/16/64, eager and compiled graphs
  python bench/decode_step.py --tiny --modes eager  # CPU smoke check (no graphs there: the step itself)

Writes bench/results/decode_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import RESULTS_DIR, device_slug, machine_info, sync, write_json
from generate_throughput import _BenchProcessor, model_config, prompts, run_stitch

from stitch.checkpoint.store import build_model
from stitch.infer.engine import Engine


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--preset", default="internvl-2b", choices=["internvl-2b", "internvl-8b"])
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16,64; tiny: 1,4)")
    ap.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in (args.batch_sizes or ("1,4" if args.tiny else "1,16,64")).split(",")]
    cfg = model_config(args.tiny, args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    rows = []
    for mode in args.modes.split(","):
        engine = Engine(model, _BenchProcessor(), eos_ids=(), max_batch_size=max(batches),
                        compile=mode == "compile")
        for batch in batches:
            ids, pixels = prompts(cfg, batch, 5, 32, device, dtype)
            start = time.perf_counter()
            run_stitch(engine, ids, pixels, 5, args.new_tokens, device)  # warm-up: graph captured, compiled
            warmup_s = time.perf_counter() - start
            total, ttft, _ = run_stitch(engine, ids, pixels, 5, args.new_tokens, device)
            state = next(reversed(engine._states.values()), None)  # the state this batch just used
            replay_ms = None
            if state is not None and state.graph is not None:
                with torch.inference_mode():
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(args.replays):
                        state.graph.replay()
                    sync(device)
                replay_ms = (time.perf_counter() - start) / args.replays * 1e3
            row = dict(mode=mode, batch=batch, warmup_call_s=round(warmup_s, 2), call_s=round(total, 4),
                       ttft_s=round(ttft, 4), step_ms=round((total - ttft) / (args.new_tokens - 1) * 1e3, 3),
                       graph_replay_ms=None if replay_ms is None else round(replay_ms, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = dict(benchmark="decode_step", model=f"{'vlm-tiny' if args.tiny else args.preset} (random weights)",
                  dtype=str(dtype).removeprefix("torch."), new_tokens=args.new_tokens, machine=machine_info(device),
                  results=rows)
    write_json(args.out or RESULTS_DIR / f"decode_step_{device_slug(device)}.json", report)
    return report


if __name__ == "__main__":
    main()
