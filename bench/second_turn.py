"""Time to first token of a chat's first and second turn about the same image, with and without the caches.

The second turn of a chat sends the whole conversation again: system prompt, image, first question, the first
reply, a second question. With the prefix KV cache (`stitch.infer.prefix_cache`) the engine copies the first
turn's KV and prefills only the reply and the new question; with the image-embedding cache alone it skips the
vision encoder but reruns the LLM over the whole prompt; with neither it reruns everything. Systems:

- stitch: prefix cache + image-embedding cache (what `stitch demo` runs);
- stitch-image-cache: the image-embedding cache only (`prefix_cache_bytes=0`);
- stitch-no-cache: neither.

Each repeat takes a new random image (so the first turn is a miss everywhere): turn 1 (`--system-tokens` +
`--tiles` x tokens_per_tile image tokens + `--question-tokens`, `--reply-tokens` generated), then turn 2 (turn 1's
prompt + its reply + an end-of-turn token + another question, `--new-tokens` generated). Time to first token is
the engine's own (batch start to the first token on the host, as in `generate_throughput.py`); medians over
`--repeats` after a warm-up repeat. `ratio`: turn 2 over turn 1 of the same system; `ratio_to_uncached_first`:
turn 2 over stitch-no-cache's turn 1. `match`: turn 2's greedy tokens equal stitch-no-cache's.

  python bench/second_turn.py                          # GPU: InternVL-2B shape, bf16, CUDA graphs
  python bench/second_turn.py --device cpu             # CPU: a tiny shape, fp32 (the default off CUDA)
Writes bench/results/second_turn_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import RESULTS_DIR, device_slug, machine_info, sync, write_json
from generate_throughput import _BenchProcessor, model_config

from stitch.checkpoint.store import build_model
from stitch.infer.engine import Engine, Request
from stitch.infer.image_cache import ImageEmbeddingCache
from stitch.infer.sampling import SamplingParams

SYSTEMS = ("stitch", "stitch-image-cache", "stitch-no-cache")


def turn_one(cfg, tiles: int, system_tokens: int, question_tokens: int, gen: torch.Generator) -> torch.Tensor:
    high = min(cfg.llm.vocab_size - 2, 100_000)
    image = torch.full((tiles * cfg.tokens_per_tile,), cfg.image_token_id)
    return torch.cat([torch.randint(10, high, (system_tokens,), generator=gen), image,
                      torch.randint(10, high, (question_tokens,), generator=gen)])


def turn_two(cfg, first: torch.Tensor, reply: list[int], question_tokens: int, gen: torch.Generator) -> torch.Tensor:
    high = min(cfg.llm.vocab_size - 2, 100_000)
    end_of_turn = torch.tensor([5])  # any fixed id: the template's <|im_end|> in a real chat
    return torch.cat([first, torch.tensor(reply), end_of_turn,
                      torch.randint(10, high, (question_tokens,), generator=gen)])


def timed(engine: Engine, request: Request, device) -> tuple[float, float, list[int]]:
    """(engine TTFT, whole call, tokens) of one request run alone."""
    sync(device)
    start = time.perf_counter()
    completion = engine.generate([request])[0]
    sync(device)
    return completion.time_to_first_token, time.perf_counter() - start, completion.token_ids


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on a CPU")
    ap.add_argument("--preset", default=None, choices=["internvl-2b", "internvl-8b", "vlm-tiny"],
                    help="model shape (default: internvl-2b on CUDA, vlm-tiny on a CPU)")
    ap.add_argument("--tiles", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=32)
    ap.add_argument("--question-tokens", type=int, default=16)
    ap.add_argument("--reply-tokens", type=int, default=None, help="turn 1's reply (default 64; tiny: 8)")
    ap.add_argument("--new-tokens", type=int, default=4, help="generated in turn 2 (only its first is timed)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; tiny: 2)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("internvl-2b" if device.type == "cuda" else "vlm-tiny")
    tiny = preset == "vlm-tiny"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    reply_tokens = args.reply_tokens or (8 if tiny else 64)
    repeats = args.repeats or (2 if tiny else 5)
    names = [n for n in args.systems.split(",") if n]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    torch.manual_seed(0)
    cfg = model_config(tiny, "internvl-2b" if tiny else preset)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    image_cache = ImageEmbeddingCache(model, max_bytes=256 << 20)
    graphs = device.type == "cuda"
    engines = {n: Engine(model, _BenchProcessor(), eos_ids=(), max_batch_size=1, cuda_graphs=graphs,
                         prefix_cache_bytes=(1 << 30) if n == "stitch" else 0) for n in names}
    size = cfg.vision.image_size

    results = {}
    turn2_tokens: dict[str, list[list[int]]] = {}
    for name, engine in engines.items():
        if name == "stitch-no-cache":
            image_cache.remove()
        else:
            image_cache.remove()
            image_cache.install()
        gen = torch.Generator().manual_seed(1)  # the same images and questions for every system
        first_s, second_s, first_ids, tokens = [], [], [], []
        for rep in range(repeats + 1):  # repeat 0 warms up (kernels, CUDA graphs for both shapes)
            pixels = torch.randn(args.tiles, 3, size, size, generator=gen).to(device=device, dtype=dtype)
            one = turn_one(cfg, args.tiles, args.system_tokens, args.question_tokens, gen)
            t1, _, reply = timed(engine, Request(one, pixels, SamplingParams(max_new_tokens=reply_tokens,
                                                                            ignore_eos=True)), device)
            two = turn_two(cfg, one, reply, args.question_tokens, gen)
            t2, _, out = timed(engine, Request(two, pixels, SamplingParams(max_new_tokens=args.new_tokens,
                                                                          ignore_eos=True)), device)
            if rep:
                first_s.append(t1)
                second_s.append(t2)
                tokens.append(out)
            first_ids.append(int(one.numel()))
        turn2_tokens[name] = tokens
        t1, t2 = statistics.median(first_s), statistics.median(second_s)
        results[name] = dict(
            first_turn_ttft_s=round(t1, 5), second_turn_ttft_s=round(t2, 5), ratio=round(t2 / t1, 3),
            first_each_s=[round(t, 5) for t in first_s], second_each_s=[round(t, 5) for t in second_s],
            prefix_cache=engine.prefix_cache.stats() if engine.prefix_cache is not None else None,
        )
        print(json.dumps({"system": name, **results[name]}), flush=True)
    image_cache.remove()
    if "stitch-no-cache" in turn2_tokens:
        base = results["stitch-no-cache"]["first_turn_ttft_s"]
        for name in results:
            results[name]["match"] = turn2_tokens[name] == turn2_tokens["stitch-no-cache"]
            # against a first turn that pays for no cache bookkeeping (hashing tiles, storing KV)
            results[name]["ratio_to_uncached_first"] = round(results[name]["second_turn_ttft_s"] / base, 3)

    report = dict(
        benchmark="second_turn", model=preset + ("" if tiny else " (random weights)"),
        dtype=str(dtype).removeprefix("torch."), tiles=args.tiles, system_tokens=args.system_tokens,
        question_tokens=args.question_tokens, reply_tokens=reply_tokens, new_tokens=args.new_tokens,
        turn1_prompt_tokens=first_ids[0], turn2_prompt_tokens=first_ids[0] + reply_tokens + 1 + args.question_tokens,
        repeats=repeats, machine=machine_info(device), results=results,
    )
    out = args.out or RESULTS_DIR / f"second_turn_{device_slug(device)}.json"
    write_json(out, report)
    print(f"\n{report['model']}, {report['dtype']}, turn 1: {report['turn1_prompt_tokens']} prompt tokens, turn 2: "
          f"{report['turn2_prompt_tokens']}, {report['machine']['device']}  (written to {out})")
    print(f"{'system':>20} | {'turn 1 TTFT s':>13} | {'turn 2 TTFT s':>13} | {'turn2/turn1':>11} | match")
    for name, r in results.items():
        print(f"{name:>20} | {r['first_turn_ttft_s']:>13.4f} | {r['second_turn_ttft_s']:>13.4f} | "
              f"{r['ratio']:>11.3f} | {r.get('match', '-')}")
    return report


if __name__ == "__main__":
    main()
