"""Quickstart recipe sweeps: stage 1 (and optionally SFT) at fixed step counts through the library's own path
(`stitch_build` -> `Trainer` -> the eval harness), several variants in one call, one JSON row per variant.

Stage 1 is scored directly: the captioning model captions easy-VQA test images in the plain format and each
caption is checked for the image's colour and shape (what the questions' answers reveal), so a variant's
stage 1 can be judged without the SFT that follows it.

  python bench/quickstart_sweep.py --variant b8:pretrain=600x8 --variant b32:pretrain=150x32 --out sweep.json
A variant is NAME:key=value,...; keys: warmup=STEPSxBATCH (stage 0, the encoder alone), pretrain=STEPSxBATCH
(0xB skips stage 1), sft=STEPSxBATCH, tokens (1 or 4 image tokens),
caption (long: "A red circle.", short: "red circle"), lr (projector, stage 1), vlr (encoder), layers (SFT: last
N LLM layers, 0 = all), sft_vision (1: the encoder and projector keep training in SFT), eval (test questions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import stitch
from stitch.checkpoint.build import stitch_build
from stitch.checkpoint.gguf import bundled_smollm2
from stitch.checkpoint.store import save
from stitch.data.sources import easy_vqa_records
from stitch.device import compute_dtype
from stitch.errors import StitchError
from stitch.infer.generate import generate_batch
from stitch.quickstart import (
    COLORS,
    QUICKSTART_VISION,
    SHAPES,
    SYSTEM_PROMPT,
    downsample_ratio_for,
    evaluate,
    image_captions,
    quickstart_recipe,
    stage_config,
    write_training_data,
)
from stitch.train.trainer import Trainer
from stitch.train.warmup import caption_targets, warm_up_encoder


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def caption_accuracy(model, processor, n: int) -> dict[str, float]:
    """Colour and shape correctness of plain-format captions of the first `n` captionable test images."""
    truth = list(image_captions(easy_vqa_records("test")).items())[:n]
    plain = processor.with_options(chat_format="plain")
    from PIL import Image

    texts = []
    for start in range(0, len(truth), 100):
        chunk = truth[start : start + 100]
        texts += generate_batch(model, plain, [[{"role": "user", "content": "<image>"}]] * len(chunk),
                                [[Image.open(p).convert("RGB")] for p, _ in chunk], max_new_tokens=6)
    color = shape = 0
    for (_, caption), text in zip(truth, texts):
        want_c = next(c for c in COLORS if c in caption)
        want_s = next(s for s in SHAPES if s in caption)
        color += want_c in text.lower()
        shape += want_s in text.lower()
    return {"caption_color": color / len(truth), "caption_shape": shape / len(truth), "example": texts[:3]}


def warm_up_stage(checkpoint: Path, captions_file: Path, out_dir: Path, steps: int, batch: int, device: str,
                  seed: int, max_minutes: float | None = None, log=None) -> dict[str, Any]:
    """Stage 0: the encoder and projector learn the captions' words against the LLM's frozen embeddings
    (`stitch.train.warmup`), no LLM forward; writes `out_dir/final`. Images are preprocessed once (one tile each)."""
    model, processor = stitch.load(checkpoint, device=device, dtype=torch.float32)
    rows = [json.loads(line) for line in captions_file.read_text().splitlines() if line.strip()]
    pixels = torch.cat([processor.images(r["image"], max_tiles=1) for r in rows])  # [N, 3, s, s]
    if pixels.shape[0] != len(rows):
        raise StitchError(f"{captions_file}: the warm-up needs one tile per image, got {pixels.shape[0]} tiles "
                          f"for {len(rows)} images")
    targets = caption_targets(processor.tokenizer, [r["conversations"][1]["value"] for r in rows],
                              model.llm.embed_tokens.weight.shape[0])
    compute = compute_dtype(device)
    result = warm_up_encoder(model, pixels, targets, steps, batch, seed=seed,
                             autocast_dtype=compute.dtype if compute.dtype != torch.float32 else None,
                             max_seconds=None if max_minutes is None else max_minutes * 60, log=log)
    save(model, out_dir / "final", tokenizer=processor.tokenizer)
    return {"steps": result.steps, "final_loss": result.losses[-1], "seconds": round(result.seconds, 1)}


def run_variant(name: str, opts: dict[str, str], root: Path, device: str) -> dict:
    out = root / name
    tokens = int(opts.get("tokens", 4))
    recipe = quickstart_recipe(device, compute_dtype(device).precision)
    caption = opts.get("caption", recipe.caption_style)
    data = write_training_data(out / "data", caption_style=caption)
    stitched = stitch_build(vision=QUICKSTART_VISION, llm=str(bundled_smollm2()), out=out / "stitched",
                            tile_tags="none", image_wrapper="none", max_tiles=1, use_thumbnail=False, seed=0,
                            downsample_ratio=downsample_ratio_for(tokens))
    cfg = json.loads((stitched / "config.json").read_text())
    cfg["system_prompt"] = SYSTEM_PROMPT
    (stitched / "config.json").write_text(json.dumps(cfg, indent=2))
    precision = compute_dtype(device).precision
    row: dict = {"variant": name, **opts, "data": data}
    start_ckpt = stitched
    if "warmup" in opts:  # stage 0: the encoder alone against the LLM's embeddings
        steps, batch = (int(x) for x in opts["warmup"].split("x"))
        row["warmup"] = warm_up_stage(stitched, out / "data" / "captions.jsonl", out / "warmup", steps, batch,
                                      device, 0)
        start_ckpt = out / "warmup" / "final"
    steps, batch = (int(x) for x in opts.get("pretrain", "300x32").split("x"))
    lr, vlr = float(opts.get("lr", 1e-3)), float(opts.get("vlr", 3e-4))
    sft_from = start_ckpt
    if steps > 0:
        start = time.time()
        cfg1 = stage_config("pretrain", out, start_ckpt, out / "data" / "captions.jsonl", steps, batch, lr, device,
                            precision, 0, vision_lr=vlr)
        run = Trainer(cfg1, console_print=lambda *_: None).fit()
        row["pretrain_s"] = round(time.time() - start, 1)
        row["pretrain_loss"] = run.losses[-1]
        sft_from = out / "pretrain" / "final"
        model, processor = stitch.load(sft_from, device=device)
        row.update(caption_accuracy(model, processor, int(opts.get("captions", 300))))
        del model
    if "sft" in opts:
        steps, batch = (int(x) for x in opts["sft"].split("x"))
        start = time.time()
        cfg2 = stage_config("sft", out, sft_from, out / "data" / "vqa.jsonl", steps, batch,
                            float(opts.get("sft_lr", 2e-4)), device, precision, 0,
                            llm_last_layers=int(opts.get("layers", 8)), vision_lr=vlr,
                            train_vision=opts.get("sft_vision", "1") == "1")
        run = Trainer(cfg2, console_print=lambda *_: None).fit()
        row["sft_s"] = round(time.time() - start, 1)
        row["sft_loss"] = run.losses[-1]
        model, processor = stitch.load(out / "sft" / "final", device=device)
        summary = evaluate(model, processor, int(opts.get("eval", 1000)), 100)
        row["accuracy"] = summary["mean"]
        row["breakdown"] = {k: v for k, v in summary.items() if k.startswith("by_")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--root", default="runs/sweep")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for text in args.variant:
        name, opts = parse_variant(text)
        rows.append(run_variant(name, opts, Path(args.root), args.device))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
