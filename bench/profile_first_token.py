"""Where the time to first token goes at batch 1: the engine's prefill split into its parts, and a profile.

Same model and prompt as `generate_throughput.py` (InternVL-2B shape, random bf16 weights, one 5-tile image and 32
text tokens). After warm-up calls it times, with CUDA events and host clocks, (1) the ViT + projector over the
tiles, (2) the LLM prompt pass alone, (3) one whole `Engine.generate` with `max_new_tokens=1`, and HF's
`generate` with one new token; then profiles (3) and prints the top operators by device and by host time.

  python bench/profile_first_token.py [--preset internvl-2b] [--compile] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import machine_info
from generate_throughput import _BenchProcessor, build_hf, model_config, prompts, run_hf

from stitch.checkpoint.store import build_model
from stitch.infer.engine import Engine, Request
from stitch.infer.sampling import SamplingParams


def timed(fn, repeats: int = 5) -> float:
    """Best wall time of `fn` (synchronised) in seconds."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="internvl-2b")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = model_config(False, args.preset)
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    ids, pixels = prompts(cfg, 1, 5, 32, device, dtype)
    engine = Engine(model, _BenchProcessor(), compile=args.compile)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def generate_one():
        engine.generate([Request(ids[0], pixels, one)])

    def vit():
        with torch.inference_mode():
            model.image_embeddings(pixels)

    def llm_prompt():
        with torch.inference_mode():
            embeds = model.llm.embed_tokens(ids.to(device))
            model.llm(embeds)

    for _ in range(3):
        generate_one()
    result = {"machine": machine_info(device), "preset": args.preset, "compile": args.compile,
              "vit_projector_s": timed(vit), "llm_prompt_s": timed(llm_prompt),
              "engine_first_token_s": timed(generate_one)}
    hf = build_hf(cfg, model, device, dtype)

    def hf_one():
        with torch.inference_mode():
            hf.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                        pixel_values=pixels, max_new_tokens=1, do_sample=False, pad_token_id=0)

    hf_one()
    result["hf_first_token_s"] = timed(hf_one)
    # As generate_throughput.py reports it: 128 new tokens, first token on the host, best of 3.
    long = SamplingParams(max_new_tokens=128, ignore_eos=True)
    engine.generate([Request(ids[0], pixels, long)])
    result["engine_ttft_128_s"] = min(engine.generate([Request(ids[0], pixels, long)])[0].time_to_first_token
                                      for _ in range(3))
    result["hf_ttft_128_s"] = min(run_hf(hf, ids, pixels, 128, device)[1] for _ in range(3))
    print(json.dumps(result, indent=2))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate_one()
        torch.cuda.synchronize()
    table_dev = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    table_host = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(table_dev)
    print(table_host)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_token_profile.json").write_text(json.dumps(result, indent=2))
    (out / "first_token_profile.txt").write_text(table_dev + "\n\n" + table_host)


if __name__ == "__main__":
    main()
