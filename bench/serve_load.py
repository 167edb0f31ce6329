"""Serving under load: Poisson arrivals of mixed requests to `stitch serve` and to an HF-`generate` server.

Every system is a real HTTP server in its own process, driven by the same client over the OpenAI streaming API:

- stitch: `stitch serve` (static batches: waiting requests start together, a batch runs until its last row ends);
- stitch-cb: `stitch serve --continuous-batching` (a request joins a running batch in a free row);
- hf: a minimal FastAPI server in this file around `InternVLForConditionalGeneration.generate` (same weights,
  same prompts: Stitch's processor renders them), batching statically: whatever is waiting, up to
  `--max-batch-size`, left-padded into one `generate` call that runs to the longest request's `max_tokens`.

The checkpoint is built once with random weights (`--workdir`): the InternVL-2B shape (InternViT-300M + a
Qwen2.5-1.5B-shaped LLM with SmolLM2's tokenizer, so a 49k vocabulary instead of Qwen's 152k) on a GPU, a tiny one
with `--smoke`. Requests (seeded): one image of 1, 3, 4, 5, 6 or 7 tiles (the aspect ratios that tile so, with the
thumbnail), a short question, `max_tokens` uniform in [16, 512], greedy; arrivals are a Poisson process of
`--rate` requests/s (by default more than HF's server keeps up with: throughput under load is what a server
sustains, so the offered load must exceed it). Each server gets two warm-up requests first. Reported per
system: output tokens/s (all completion tokens over first send to last reply), requests/s, p50/p99 time to first
token (send to the first chunk with text, or to the finish chunk of a reply without text) and p50/p99 latency
(send to `[DONE]`).

  python bench/serve_load.py --device cuda            # one GPU, a few minutes
  python bench/serve_load.py --smoke                  # tiny model on the CPU, a few requests: a smoke check
Writes bench/results/serve_load_<device>.json (--smoke: serve_load_smoke.json) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, device_slug, machine_info, write_json

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("stitch", "stitch-cb", "hf")
TILE_GRIDS = {1: (1, 1), 3: (2, 1), 4: (3, 1), 5: (2, 2), 6: (5, 1), 7: (3, 2)}  # tiles (with thumbnail): grid
MODEL_NAME = "bench"


# --------------------------------------------------------------------------------------------- checkpoint
def build_checkpoint(out: Path, smoke: bool, tokenizer: str | None = None) -> Path:
    """A random-weight checkpoint with SmolLM2's tokenizer (bundled, or the `tokenizer` folder), the vocabulary cut
    to the tokenizer's."""
    from stitch.checkpoint.io import atomic_dir, save_tensors
    from stitch.checkpoint.store import build_model, model_state
    from stitch.checkpoint.tokenizer import default_tokenizer_source, ensure_image_token, load_tokenizer
    from stitch.models.presets import vlm_preset

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tokenizer or default_tokenizer_source())
    cfg = vlm_preset("vlm-tiny" if smoke else "internvl-2b")
    cfg.max_tiles = 6
    cfg.image_token_id = ensure_image_token(tok, cfg.image_token)
    cfg.llm.vocab_size = -(-len(tok) // 64) * 64
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, attr, None) is not None:
            setattr(cfg.llm, attr, getattr(tok, attr))
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.float32 if smoke else torch.bfloat16)
    with atomic_dir(out) as tmp:
        cfg.save(tmp / "config.json")
        save_tensors(model_state(model), tmp)
        tok.save_pretrained(str(tmp))
    return out


# --------------------------------------------------------------------------------------------- HF server
def hf_server(ckpt: str, port: int, device: str, max_batch_size: int, batch_wait_s: float) -> None:
    """Serve `ckpt` through HF `generate` with static batches on the OpenAI streaming chat API (the subset the
    client uses: image_url data URLs, max_tokens, stream)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from generate_throughput import build_hf

    from stitch.device import compute_dtype, resolve_device
    from stitch.infer.api_types import Limits
    from stitch.infer.engine import eos_token_ids
    from stitch.infer.pretrained import load_pretrained
    from stitch.infer.request import parse_chat_request

    torch_device = resolve_device(device)
    dtype = compute_dtype(torch_device, None).dtype
    model, processor = load_pretrained(ckpt, device=torch_device, dtype=dtype)
    eos = sorted(eos_token_ids(model, processor))
    hf = build_hf(model.config, model, torch_device, dtype)
    del model
    tokenizer, pad = processor.tokenizer, processor.pad_token_id
    work: queue.Queue = queue.Queue()

    class _Rows:
        """An HF streamer handing each row's new token to its request (the first `put` is the prompt)."""

        def __init__(self, jobs):
            self.jobs, self.counts, self.done, self.prompt_seen = jobs, [0] * len(jobs), [False] * len(jobs), False

        def send(self, i: int, item) -> None:
            loop, out = self.jobs[i][3], self.jobs[i][4]
            loop.call_soon_threadsafe(out.put_nowait, item)

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for i, tok in enumerate(value.reshape(-1).tolist()):
                if self.done[i]:
                    continue
                if tok in eos:
                    self.done[i] = True
                    self.send(i, None)
                    continue
                self.counts[i] += 1
                self.send(i, tokenizer.decode([tok], skip_special_tokens=True))
                if self.counts[i] >= self.jobs[i][2]:
                    self.done[i] = True
                    self.send(i, None)

        def end(self) -> None:
            for i in range(len(self.jobs)):
                if not self.done[i]:
                    self.done[i] = True
                    self.send(i, None)

    def worker() -> None:
        while True:
            batch = [work.get()]
            deadline = time.perf_counter() + batch_wait_s
            while len(batch) < max_batch_size:
                try:
                    batch.append(work.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            longest = max(int(j[0].numel()) for j in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, job in enumerate(batch):
                n = int(job[0].numel())
                ids[i, longest - n :], mask[i, longest - n :] = job[0], 1
            tiles = [j[1] for j in batch if j[1] is not None and j[1].numel()]
            pixels = torch.cat(tiles).to(torch_device, dtype) if tiles else None
            streamer = _Rows(batch)
            try:
                with torch.inference_mode():
                    hf.generate(input_ids=ids.to(torch_device), attention_mask=mask.to(torch_device),
                                pixel_values=pixels, max_new_tokens=max(j[2] for j in batch), do_sample=False,
                                streamer=streamer, eos_token_id=eos or None, pad_token_id=pad)
            finally:
                streamer.end()

    threading.Thread(target=worker, daemon=True).start()
    app = FastAPI()

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def chat(request):  # Starlette-style (a plain route): no annotations for FastAPI to resolve
        job = parse_chat_request(await request.body(), MODEL_NAME, Limits())
        sample = processor.encode(list(job.conversation), list(job.images), [], add_generation_prompt=True)
        out: asyncio.Queue = asyncio.Queue()
        work.put((sample.input_ids.reshape(-1), sample.pixel_values, job.max_tokens or 2048,
                  asyncio.get_running_loop(), out))
        if not job.stream:
            return JSONResponse({"error": "this bench server only streams"}, status_code=400)

        async def events():
            def chunk(body: dict) -> str:
                return f"data: {json.dumps(body)}\n\n"

            yield chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            count = 0
            while (piece := await out.get()) is not None:
                count += 1
                if piece:
                    yield chunk({"choices": [{"index": 0, "delta": {"content": piece}}]})
            yield chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield chunk({"choices": [], "usage": {"prompt_tokens": int(sample.input_ids.numel()),
                                                  "completion_tokens": count}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --------------------------------------------------------------------------------------------- client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url(tiles: int, tile_px: int, rng: random.Random) -> str:
    """A JPEG data URL of random pixels whose aspect ratio tiles into `tiles` (thumbnail included)."""
    import numpy as np
    from PIL import Image

    cols, rows = TILE_GRIDS[tiles]
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (rows * tile_px, cols * tile_px, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(count: int, rate: float, tiles: list[int], tokens: tuple[int, int], tile_px: int, seed: int):
    """[(arrival s, tiles, max_tokens, body bytes)]: Poisson arrivals, each request its own image."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for i in range(count):
        at += rng.expovariate(rate)
        n_tiles, max_tokens = rng.choice(tiles), rng.randint(*tokens)
        body = {"model": MODEL_NAME, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_url(n_tiles, tile_px, rng)}},
                    {"type": "text", "text": f"Question {i}: what is in this picture, and why?"}]}]}
        out.append((at, n_tiles, max_tokens, json.dumps(body).encode()))
    return out


async def one_request(client, url: str, body: bytes) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, content=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if first is None and (choice["delta"].get("content") or choice.get("finish_reason")):
                    first = time.perf_counter()
    done = time.perf_counter()
    return dict(start=start, ttft_s=(first or done) - start, latency_s=done - start, tokens=tokens)


async def drive(base: str, requests: list, warmup: list) -> tuple[list[dict], float]:
    import httpx

    url = f"{base}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1000)) as client:
        for _, _, _, body in warmup:
            await one_request(client, url, body)
        t0 = time.perf_counter()

        async def at(offset: float, body: bytes) -> dict:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            return await one_request(client, url, body)

        results = await asyncio.gather(*(at(offset, body) for offset, _, _, body in requests))
    return results, t0


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before answering /health")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {base}/health within {timeout:.0f} s")


def server_command(system: str, ckpt: Path, port: int, args) -> list[str]:
    if system == "hf":
        return [sys.executable, str(Path(__file__).resolve()), "--hf-server", str(ckpt), "--port", str(port),
                "--device", args.device, "--max-batch-size", str(args.max_batch_size)]
    cmd = [sys.executable, "-m", "stitch", "serve", str(ckpt), "--port", str(port), "--device", args.device,
           "--max-batch-size", str(args.max_batch_size), "--model-name", MODEL_NAME, "--log-level", "warning",
           "--max-tokens-limit", str(max(2048, args.max_tokens))]
    return cmd + (["--continuous-batching"] if system == "stitch-cb" else [])


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[dict], t0: float) -> dict:
    end = max(r["start"] + r["latency_s"] for r in results)
    span = end - t0
    tokens = sum(r["tokens"] for r in results)
    ttft, lat = [r["ttft_s"] for r in results], [r["latency_s"] for r in results]
    return dict(requests=len(results), completion_tokens=tokens, wall_s=round(span, 3),
                output_tok_s=round(tokens / span, 1), requests_s=round(len(results) / span, 3),
                ttft_p50_s=round(percentile(ttft, 0.5), 4), ttft_p99_s=round(percentile(ttft, 0.99), 4),
                latency_p50_s=round(percentile(lat, 0.5), 4), latency_p99_s=round(percentile(lat, 0.99), 4),
                ttft_mean_s=round(statistics.mean(ttft), 4))


def run_system(system: str, ckpt: Path, args, requests: list, warmup: list) -> dict:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(server_command(system, ckpt, port, args), cwd=ROOT, env=env)
    try:
        wait_healthy(base, proc, args.start_timeout)
        results, t0 = asyncio.run(drive(base, requests, warmup))
        health = httpx.get(f"{base}/health", timeout=10).json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {**summarize(results, t0), "prefix_cache": health.get("prefix_cache")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few short requests")
    ap.add_argument("--device", default=None, help="where the servers run (default: cuda if available; smoke: cpu)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--requests", type=int, default=None, help="default 96 (smoke: 6)")
    ap.add_argument("--rate", type=float, default=None,
                    help="arrivals per second (default 8: more than HF-generate keeps up with; smoke: 20)")
    ap.add_argument("--min-tokens", type=int, default=None, help="default 16 (smoke: 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 512 (smoke: 8)")
    ap.add_argument("--tiles", default=None, help="tile counts to draw from (default 1,3,4,5,6,7; smoke: 1,3)")
    ap.add_argument("--max-batch-size", type=int, default=64, help="rows decoded together, every server (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled SmolLM2's)")
    ap.add_argument("--workdir", default="/tmp/stitch-serve-load", help="where the random checkpoint is kept")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to start")
    ap.add_argument("--out", default=None)
    ap.add_argument("--hf-server", default=None, metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.hf_server:
        hf_server(args.hf_server, args.port, args.device, args.max_batch_size, 0.005)
        return {}
    smoke = args.smoke
    count = args.requests or (6 if smoke else 96)
    rate = args.rate or (20.0 if smoke else 8.0)
    args.min_tokens = args.min_tokens or (2 if smoke else 16)
    args.max_tokens = args.max_tokens or (8 if smoke else 512)
    tiles = [int(t) for t in (args.tiles or ("1,3" if smoke else "1,3,4,5,6,7")).split(",")]
    bad = [t for t in tiles if t not in TILE_GRIDS]
    if bad:
        raise SystemExit(f"--tiles: {bad} cannot be made (choose from {sorted(TILE_GRIDS)})")
    names = [n for n in args.systems.split(",") if n]
    if set(names) - set(SYSTEMS):
        raise SystemExit(f"--systems: unknown {sorted(set(names) - set(SYSTEMS))}; choose from {list(SYSTEMS)}")

    ckpt = build_checkpoint(Path(args.workdir) / ("smoke" if smoke else "internvl-2b-random"), smoke,
                            args.tokenizer)
    tile_px = json.loads((ckpt / "config.json").read_text())["vision"]["image_size"]
    requests = workload(count, rate, tiles, (args.min_tokens, args.max_tokens), tile_px, args.seed)
    warmup = workload(2, rate, [min(tiles), max(tiles)], (args.min_tokens, args.min_tokens), tile_px,
                      args.seed + 1)
    results = {}
    for name in names:
        results[name] = run_system(name, ckpt, args, requests, warmup)
        print(json.dumps({"system": name, **results[name]}), flush=True)
    device = torch.device(args.device)
    report = dict(
        benchmark="serve_load", model="vlm-tiny" if smoke else "internvl-2b shape (random weights, 49k vocab)",
        requests=count, rate_per_s=rate, tiles=tiles, max_tokens=[args.min_tokens, args.max_tokens],
        max_batch_size=args.max_batch_size, seed=args.seed,
        machine=machine_info(device),
        results=results,
    )
    out = args.out or RESULTS_DIR / ("serve_load_smoke.json" if smoke else f"serve_load_{device_slug(device)}.json")
    write_json(out, report)
    print(f"\n{report['model']}, {count} requests at {rate}/s, tiles {tiles}, max_tokens {report['max_tokens']}, "
          f"{report['machine']['device']}  (written to {out})")
    print(f"{'system':>10} | {'tok/s':>8} | {'TTFT p50':>8} | {'TTFT p99':>8} | {'lat p50':>8} | {'lat p99':>8}")
    for name, r in results.items():
        print(f"{name:>10} | {r['output_tok_s']:>8.1f} | {r['ttft_p50_s']:>8.3f} | {r['ttft_p99_s']:>8.3f} | "
              f"{r['latency_p50_s']:>8.3f} | {r['latency_p99_s']:>8.3f}")
    if "hf" in results:
        for name in results:
            if name != "hf":
                print(f"{name} vs hf: {results[name]['output_tok_s'] / results['hf']['output_tok_s']:.2f}x tok/s, "
                      f"TTFT p99 {results[name]['ttft_p99_s'] / results['hf']['ttft_p99_s']:.2f}x")
    return report


if __name__ == "__main__":
    main()
