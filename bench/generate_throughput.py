"""Generation throughput: Stitch's engine against `transformers`' `generate`, same model, same prompts.

The model is InternVL-2B-shaped (InternViT-300M + Qwen2.5-1.5B, pixel-shuffle MLP projector) with random weights
in bf16; the HF `InternVLForConditionalGeneration` is built from the same config (`vlm_config_to_hf`) and gets the
very same weights (`vlm_state_to_hf`). Each prompt is one 5-tile image (5 x 256 image tokens) and 32 text
tokens; every request generates exactly `--new-tokens` tokens (EOS ignored), greedy, at batch 1, 16 and 64.

Reported per system and batch: output tokens/s (all generated tokens over the whole call, prefill included),
decode tokens/s (tokens after the first over the time after the first), time to first token (call start to
the first generated token on the host), peak GPU memory. The best of `--repeats` timed runs after a warm-up
(which also captures Stitch's CUDA graphs / compiles). The greedy outputs of batch 1 are compared as a sanity
check (`match`: leading tokens that agree; bf16 with random weights may diverge at a near-tie).

  python bench/generate_throughput.py                 # GPU, the real comparison (--compile to add torch.compile)
  python bench/generate_throughput.py --preset internvl-8b --batch-sizes 16   # the 8B shape (Qwen2.5-7B)
  python bench/generate_throughput.py --tiny          # CPU smoke check on a tiny model, fp32

Writes bench/results/generate_throughput.json and prints a side-by-side table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, machine_info, peak_memory_gib, sync, write_json

from stitch.checkpoint.hf import vlm_config_to_hf, vlm_state_to_hf
from stitch.checkpoint.store import build_model, model_state
from stitch.config import VLMConfig
from stitch.infer.engine import Engine, Request
from stitch.infer.sampling import SamplingParams
from stitch.models.presets import vlm_preset

RESULTS = RESULTS_DIR / "generate_throughput.json"


class _IdTokenizer:
    """Random weights produce random ids; the engine only needs `decode` (and no chat template)."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))

    def get_vocab(self) -> dict:
        return {}


class _BenchProcessor:
    tokenizer = _IdTokenizer()
    pad_token_id = 0


def model_config(tiny: bool, preset: str = "internvl-2b") -> VLMConfig:
    cfg = vlm_preset("vlm-tiny" if tiny else preset)
    cfg.image_token_id = cfg.llm.vocab_size - 1 if tiny else 151667  # InternVL's <IMG_CONTEXT> id
    cfg.llm.eos_token_id = None
    return cfg


def prompts(cfg: VLMConfig, batch: int, tiles: int, text_tokens: int, device, dtype, seed: int = 0):
    """`batch` prompts: half the text, `<img>` + tiles x tokens_per_tile image tokens + `</img>`, the rest."""
    gen = torch.Generator().manual_seed(seed)
    high = min(cfg.llm.vocab_size - 2, 100_000)
    rows = []
    for _ in range(batch):
        text = torch.randint(10, high, (text_tokens,), generator=gen)
        image = torch.full((tiles * cfg.tokens_per_tile,), cfg.image_token_id)
        rows.append(torch.cat([text[: text_tokens // 2], image, text[text_tokens // 2 :]]))
    size = cfg.vision.image_size
    pixels = torch.randn(batch * tiles, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    return torch.stack(rows), pixels


def run_stitch(engine: Engine, ids, pixels, tiles: int, new_tokens: int, device):
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [Request(row, pixels[i * tiles : (i + 1) * tiles], params) for i, row in enumerate(ids)]
    sync(device)
    start = time.perf_counter()
    out = engine.generate(reqs)
    sync(device)
    total = time.perf_counter() - start
    assert all(len(c.token_ids) == new_tokens for c in out)
    ttft = max(c.time_to_first_token for c in out)
    return total, ttft, [c.token_ids for c in out]


class _FirstTokenClock:
    """An HF streamer that notes when the first generated tokens reach the host (the first `put` is the prompt)."""

    def __init__(self, start: float):
        self.start, self.calls, self.ttft = start, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.ttft = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def run_hf(hf, ids, pixels, new_tokens: int, device):
    input_ids = ids.to(device)
    mask = torch.ones_like(input_ids)
    sync(device)
    start = time.perf_counter()
    clock = _FirstTokenClock(start)
    with torch.inference_mode():
        out = hf.generate(
            input_ids=input_ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
            do_sample=False, streamer=clock, pad_token_id=0,
        )
    sync(device)
    total = time.perf_counter() - start
    new = out[:, input_ids.shape[1] :]
    assert new.shape[1] == new_tokens, new.shape
    return total, clock.ttft, new.tolist()


def build_hf(cfg: VLMConfig, model, device, dtype):
    """The HF model, loaded the way users load it: an exported folder through `from_pretrained` (which also
    maps the checkpoint's tensor names onto the module's)."""
    import tempfile

    import transformers

    from stitch.checkpoint.io import save_tensors

    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg = vlm_config_to_hf(cfg, "internvl")
        (Path(tmp) / "config.json").write_text(json.dumps(hf_cfg))
        save_tensors(vlm_state_to_hf(model_state(model), cfg, "internvl"), Path(tmp))
        hf = transformers.InternVLForConditionalGeneration.from_pretrained(tmp, dtype=dtype, device_map=device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def best_of(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r[0])


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, CPU and fp32 by default: a smoke check")
    ap.add_argument("--preset", default="internvl-2b", choices=["internvl-2b", "internvl-8b"],
                    help="model shape (8B: InternViT-300M + Qwen2.5-7B); results go to ..._<preset>.json")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16,64; tiny: 1,4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--tiles", type=int, default=5)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--compile", action="store_true", help="also run Stitch with a torch.compile'd decode step")
    ap.add_argument("--eager", action="store_true", help="also run Stitch without CUDA graphs")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help=f"JSON path (default {RESULTS}, 8B: ..._internvl-8b.json)")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    batches = [int(b) for b in (args.batch_sizes or ("1,4" if args.tiny else "1,16,64")).split(",")]
    new_tokens = args.new_tokens or (16 if args.tiny else 128)
    torch.manual_seed(0)

    cfg = model_config(args.tiny, args.preset)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    processor = _BenchProcessor()
    systems: dict[str, object] = {}
    if device.type == "cuda":
        systems["stitch"] = Engine(model, processor, eos_ids=(), max_batch_size=max(batches), cuda_graphs=True)
        if args.compile:
            systems["stitch-compile"] = Engine(model, processor, eos_ids=(), max_batch_size=max(batches),
                                               cuda_graphs=True, compile=True)
        if args.eager:
            systems["stitch-eager"] = Engine(model, processor, eos_ids=(), max_batch_size=max(batches),
                                             cuda_graphs=False)
    else:
        systems["stitch"] = Engine(model, processor, eos_ids=(), max_batch_size=max(batches))
    if not args.skip_hf:
        systems["hf"] = build_hf(cfg, model, device, dtype)

    results = []
    for batch in batches:
        ids, pixels = prompts(cfg, batch, args.tiles, args.text_tokens, device, dtype)
        outputs = {}
        for name, system in systems.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if name == "hf":
                run = functools.partial(run_hf, system, ids, pixels, new_tokens, device)
            else:
                run = functools.partial(run_stitch, system, ids, pixels, args.tiles, new_tokens, device)
            run()  # warm-up: CUDA graphs captured, kernels compiled/autotuned
            total, ttft, tokens = best_of(run, args.repeats)
            outputs[name] = tokens
            generated = batch * new_tokens
            row = dict(
                system=name, batch=batch, prompt_tokens=int(ids.shape[1]), new_tokens=new_tokens,
                total_s=round(total, 4), ttft_s=round(ttft, 4),
                output_tok_s=round(generated / total, 1),
                decode_tok_s=round(batch * (new_tokens - 1) / max(total - ttft, 1e-9), 1),
                peak_mem_gb=None if (m := peak_memory_gib(device)) is None else round(m, 2),
            )
            results.append(row)
            print(json.dumps(row), flush=True)
        if "hf" in outputs:
            for name in outputs:
                if name != "hf":
                    match = leading_match(outputs[name][0], outputs["hf"][0])
                    next(r for r in results if r["system"] == name and r["batch"] == batch)["match"] = match

    machine = machine_info(device)
    report = dict(
        benchmark="generate_throughput", model="vlm-tiny" if args.tiny else f"{args.preset} (random weights)",
        dtype=str(dtype).removeprefix("torch."), tiles=args.tiles, text_tokens=args.text_tokens,
        new_tokens=new_tokens, machine=machine, results=results,
    )
    out = Path(args.out) if args.out else (
        RESULTS if args.preset == "internvl-2b" else RESULTS.with_name(f"{RESULTS.stem}_{args.preset}.json"))
    write_json(out, report)

    names = list(systems)
    print(f"\n{report['model']}, {report['dtype']}, {args.tiles}-tile image + {args.text_tokens} text tokens, "
          f"{new_tokens} new tokens, {machine['device']}  (written to {out})")
    header = f"{'batch':>5} | " + " | ".join(f"{n + ' tok/s':>18} {'TTFT s':>8}" for n in names)
    if "hf" in names and len(names) > 1:
        header += " | " + " | ".join(f"{n + ' vs hf':>16} {'match':>5}" for n in names if n != "hf")
    print(header)
    print("-" * len(header))
    for batch in batches:
        by = {r["system"]: r for r in results if r["batch"] == batch}
        line = f"{batch:>5} | " + " | ".join(f"{by[n]['output_tok_s']:>18.1f} {by[n]['ttft_s']:>8.3f}" for n in names)
        if "hf" in names and len(names) > 1:
            line += " | " + " | ".join(
                f"{by[n]['output_tok_s'] / by['hf']['output_tok_s']:>15.2f}x {by[n].get('match', '-'):>5}"
                for n in names
                if n != "hf"
            )
        print(line)


if __name__ == "__main__":
    main()
