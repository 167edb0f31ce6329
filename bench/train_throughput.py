"""Training throughput: Stitch's training step against `transformers`' InternVL, same shapes, same data, one GPU.

Both sides train the whole model (ViT + projector + LLM) from random weights with fp32 master weights, bf16
autocast, AdamW (fused on CUDA, decay on matrices only, built by `stitch.train.optim.build_optimizer` for both)
and gradient clipping at 1.0:

- stitch: the VLM built from the preset (`stitch.models.presets`), stepped by the trainer's own
  `stitch.train.trainer.train_step` (token-weighted loss over the step's micro-batches, clipping, the
  non-finite check), on micro-batches made by `stitch.data.collate.collate` (and, with `--packed`,
  `stitch.data.packing.pack_greedy_stream`), exactly what `stitch train` feeds it. Activation checkpointing
  is the trainer's (`train.activation_checkpointing`: every ViT and LLM layer recomputed in backward, or with
  `--checkpointing vision|llm` one part's layers); `--compile` is `train.compile` (per-block, dynamic sizes for
  packed rows).
- hf: `transformers.InternVLForConditionalGeneration` built from the `InternVLConfig` that
  `stitch.checkpoint.hf.vlm_config_to_hf` writes for the same preset (so shapes match by construction; the
  parameter counts are checked equal), `attn_implementation="sdpa"`, HF's own random init, and the plain HF
  loop: forward with `labels` and `num_items_in_batch` (HF's token-weighted loss), backward, clip, step.
  Activation checkpointing is HF's (`activation_checkpointing_enable`, formerly
  `gradient_checkpointing_enable`: every ViT and LLM layer, non-reentrant; one part: that part's own switch).

Data (identical samples for both sides, a pure function of (seed, step, index)):
- fixed (default): each sample is one 5-tile image (5 x 256 = 1280 image tokens at 448 px) followed by 768
  text tokens, 2048 tokens, labels on the 768 text tokens. Equal lengths, so no padding on either side
  (Stitch drops the all-ones attention mask as its synthetic stream does; HF gets the mask and skips it).
- `--packed`: a realistic mix, 1-7 tiles and 50-1,500 text tokens per sample. Stitch packs the step's
  samples into rows of at most `--row-tokens` (each row a micro-batch with `cu_seqlens`); HF pads each
  micro-batch of `--micro-batch` samples to its longest sample. Tokens/s counts non-padding tokens only.

The timed region is one optimizer step on micro-batches already on the device (forward, backward, clipping,
AdamW), between `torch.cuda.synchronize()` calls, summed over `--steps` steps after `--warmup` steps.
Each (configuration, side) builds a fresh model and optimizer; an out-of-memory error is recorded as "OOM"
and the next one starts from a freed device. Peak memory is `torch.cuda.max_memory_allocated` (GiB) over
build + warm-up + timed steps, so it includes weights, gradients and AdamW state. Each row also records every
step's time (`step_times_s`, warm-up included: compilation shows there) and the time inside `optimizer.step()`
(`optimizer_s`, per timed step). CUDA starts with expandable segments (`PYTORCH_CUDA_ALLOC_CONF`) on both sides.

  python bench/train_throughput.py --preset internvl-2b --batch 4 8 16 --checkpointing both
  python bench/train_throughput.py --preset internvl-2b --batch 8 16 --packed --micro-batch 4
  python bench/train_throughput.py --tiny --steps 1 --warmup 1   # CPU smoke check, fp32, under a minute

Writes bench/results/train_throughput_<device>_<preset>[-packed].json and prints a side-by-side table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Both sides allocate through one caching allocator; expandable segments keep it from failing on fragmentation
# at 8B (an out-of-memory error with 5-11 GiB reserved but unallocated, measured). Set before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F
from _common import (
    RESULTS_DIR,
    device_slug,
    free_memory,
    is_oom,
    machine_info,
    name_slug,
    peak_memory_gib,
    profile_call,
    sync,
    write_json,
)
from torch import nn

from stitch.checkpoint.hf import vlm_config_to_hf
from stitch.checkpoint.store import build_model
from stitch.config import VLMConfig
from stitch.data.collate import IGNORE_INDEX, Sample, collate
from stitch.data.packing import pack_greedy_stream
from stitch.models.presets import vlm_preset
from stitch.models.vlm import VLM
from stitch.train.config import OptimConfig
from stitch.train.optim import build_optimizer
from stitch.train.trainer import (
    configure_layers,
    count_label_tokens,
    init_for_training,
    mask_is_redundant,
    train_step,
)

SIDES = ("stitch", "hf")
PEAK_TFLOPS_H200 = 989.0  # dense bf16 tensor-core peak of one H100/H200
OPTIM = OptimConfig(lr=1e-5, weight_decay=0.1, max_grad_norm=1.0)

FLOP_CONVENTION = (
    "Model FLOPs per optimizer step, one formula for both sides, each side's numbers taken from its own model: "
    "6 * N * D per part plus attention. "
    "ViT: N = every encoder parameter (patch conv, class token, position table, layers), D = tiles x positions "
    "per tile (1025 at 448 px: 1024 patches + class token); attention 12 * layers * width * positions per ViT "
    "token (bidirectional). "
    "Projector: N = LayerNorm + both linears, D = tiles x 256 pixel-shuffled tokens. "
    "LLM: N = decoder layers + final norm + LM head, the token-embedding table excluded (a lookup, not a "
    "matmul; when tied to the LM head, as in Qwen2.5-1.5B, the shared matrix counts once, as the head); "
    "D = non-padding tokens (image positions included); attention 12 * layers * width * s per token for a "
    "sample of s tokens (non-causal convention: s^2 pairs, not s(s+1)/2; packed samples never attend to each "
    "other, so s is the sample's own length), width = heads x head_dim. "
    "Not counted: activation-checkpoint recomputation, padding. The LM head counts at every LLM token though "
    "Stitch runs it only where a label exists (HF computes all logits): the formula is the same for both, so "
    "the TFLOP/s ratio equals the tokens/s ratio. MFU = TFLOP/s / peak (989 TFLOP/s, dense bf16 H200)."
)


# ------------------------------------------------------------------------------------------- model shapes
def model_config(preset: str) -> VLMConfig:
    """The preset with InternVL's `<IMG_CONTEXT>` id (tiny: the last vocabulary id), as a real import has it."""
    cfg = vlm_preset(preset)
    cfg.image_token_id = 151667 if cfg.llm.vocab_size > 151667 else cfg.llm.vocab_size - 1
    return cfg


def count_params(modules: Sequence[nn.Module], exclude: Sequence[nn.Parameter] = ()) -> int:
    """Distinct parameters of `modules` (a tied matrix counts once), leaving out `exclude`."""
    skip = {id(p) for p in exclude}
    seen = {id(p): p.numel() for m in modules for p in m.parameters() if id(p) not in skip}
    return sum(seen.values())


def llm_flop_params(modules: Sequence[nn.Module], embedding: nn.Embedding, head: nn.Linear) -> int:
    """LLM parameters for the FLOP count: all but the token-embedding table, unless it is the (tied) head."""
    exclude = [] if embedding.weight is head.weight else [embedding.weight]
    return count_params(modules, exclude)


@dataclass(frozen=True)
class FlopShapes:
    """What the FLOP formula (`FLOP_CONVENTION`) needs from one side's model, read from that side's own
    modules and config, so agreement between the sides is a check and not an assumption."""

    vision_params: int
    projector_params: int
    llm_params: int  # embedding excluded (see llm_flop_params)
    vit_layers: int
    vit_width: int
    vit_positions: int  # tokens per tile through the ViT (class token included)
    tokens_per_tile: int  # tokens per tile after pixel shuffle (through the projector and the LLM)
    llm_layers: int
    llm_width: int  # query width = heads x head_dim

    def flops(self, seq_lens: Sequence[int], tiles: int) -> float:
        vit_tokens = tiles * self.vit_positions
        dense = 6 * (self.vision_params * vit_tokens + self.projector_params * tiles * self.tokens_per_tile
                     + self.llm_params * sum(seq_lens))
        attention = (12 * self.vit_layers * self.vit_width * self.vit_positions * vit_tokens
                     + 12 * self.llm_layers * self.llm_width * sum(s * s for s in seq_lens))
        return float(dense + attention)


def stitch_shapes(model: VLM) -> FlopShapes:
    cfg = model.config
    return FlopShapes(
        vision_params=count_params([model.vision]), projector_params=count_params([model.projector]),
        llm_params=llm_flop_params([model.llm], model.llm.embed_tokens, model.llm.lm_head),
        vit_layers=cfg.vision.num_layers_used, vit_width=cfg.vision.hidden_size,
        vit_positions=cfg.vision.num_positions, tokens_per_tile=cfg.tokens_per_tile,
        llm_layers=cfg.llm.num_layers, llm_width=cfg.llm.num_heads * cfg.llm.head_dim,
    )


def hf_shapes(hf: nn.Module) -> FlopShapes:
    vc, tc = hf.config.vision_config, hf.config.text_config
    size, patch = vc.image_size, vc.patch_size
    patches = (size[0] // patch[0]) * (size[1] // patch[1])
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    lm = hf.model.language_model
    return FlopShapes(
        vision_params=count_params([hf.model.vision_tower]),
        projector_params=count_params([hf.model.multi_modal_projector]),
        llm_params=llm_flop_params([lm, hf.lm_head], lm.embed_tokens, hf.lm_head),
        vit_layers=vc.num_hidden_layers, vit_width=vc.hidden_size, vit_positions=patches + 1,  # + class token
        tokens_per_tile=hf.config.image_seq_length, llm_layers=tc.num_hidden_layers,
        llm_width=tc.num_attention_heads * head_dim,
    )


# ------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSpec:
    """What every step's samples look like (fixed shape, or the packed mix) and how Stitch packs them."""

    packed: bool
    tiles: int  # fixed: tiles per sample
    text_tokens: int  # fixed: text tokens per sample
    tiles_range: tuple[int, int]  # packed: inclusive range of tiles per sample
    text_range: tuple[int, int]  # packed: inclusive range of text tokens per sample
    row_tokens: int  # packed: Stitch's row budget


def make_sample(cfg: VLMConfig, tiles: int, text_tokens: int, seed: int) -> Sample:
    """[image tokens of `tiles` tiles, text tokens], labels on the text; random ids and pixels from `seed`.

    Pixels are noise drawn at 1/8 resolution and scaled up (as `stitch.train.synthetic` does): the model
    cannot tell, and drawing full-size noise for 100+ tiles a step would dominate the benchmark's wall time.
    """
    g = torch.Generator().manual_seed(seed)
    image = tiles * cfg.tokens_per_tile
    text = torch.randint(10, min(cfg.llm.vocab_size, 100_000), (text_tokens,), generator=g)
    text[text == cfg.image_token_id] = 10
    ids = torch.cat([torch.full((image,), cfg.image_token_id, dtype=torch.long), text])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[image:] = text
    size, small = cfg.vision.image_size, -(-cfg.vision.image_size // 8)
    noise = torch.randn((tiles, cfg.vision.num_channels, small, small), generator=g)
    pixels = F.interpolate(noise, size=(size, size), mode="nearest")
    return Sample(input_ids=ids, labels=labels, pixel_values=pixels, num_tiles=[tiles], dataset="bench",
                  key=f"bench#{seed}")


def step_samples(cfg: VLMConfig, spec: DataSpec, batch: int, step: int, seed: int) -> list[Sample]:
    """The `batch` samples of step `step`: the same for both sides and every configuration."""
    rng = random.Random(seed * 1_000_003 + step)
    samples = []
    for i in range(batch):
        if spec.packed:
            tiles, text = rng.randint(*spec.tiles_range), rng.randint(*spec.text_range)
        else:
            tiles, text = spec.tiles, spec.text_tokens
        samples.append(make_sample(cfg, tiles, text, seed=(seed * 1_000_003 + step) * 4096 + i))
    return samples


def chunks(items: Sequence[Sample], size: int) -> list[Sequence[Sample]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def stitch_batches(samples: Sequence[Sample], spec: DataSpec, micro_batch: int) -> list[dict[str, Any]]:
    """Micro-batches as `stitch train` builds them: packed rows ([1, <= row_tokens] with `cu_seqlens`,
    next-fit in stream order) or padded groups of `micro_batch` samples."""
    if spec.packed:
        rows = pack_greedy_stream(((s, None) for s in samples), spec.row_tokens)
        return [collate(row, pack=True, max_tokens=spec.row_tokens) for row, _ in rows]
    out = []
    for group in chunks(samples, micro_batch):
        batch = collate(group, pack=False)
        if mask_is_redundant(batch):  # as train_step does on the host copy: right padding needs no mask
            batch.pop("attention_mask", None)
        out.append(batch)
    return out


def hf_batches(samples: Sequence[Sample], micro_batch: int) -> list[dict[str, Any]]:
    """What an HF data collator gives: groups of `micro_batch` right-padded to their longest sample, labels -100
    and attention mask 0 under padding (collate's padded layout is exactly that)."""
    keys = ("input_ids", "attention_mask", "labels", "pixel_values")
    return [{k: b[k] for k in keys} for b in (collate(g, pack=False) for g in chunks(samples, micro_batch))]


def to_device(batches: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]


# ------------------------------------------------------------------------------------------- the two sides
class StitchSide:
    """Stitch's model and step, set up as `Trainer.setup` does for a full fine-tune from random init."""

    name = "stitch"

    def __init__(self, cfg: VLMConfig, device: torch.device, checkpointing: bool | str,
                 autocast: torch.dtype | None, spec: DataSpec, micro_batch: int, compile_layers: bool = False):
        self.device, self.autocast, self.spec, self.micro_batch = device, autocast, spec, micro_batch
        self.model = build_model(cfg, device=device, dtype=torch.float32)
        init_for_training(self.model)
        # what `train.activation_checkpointing` / `train.compile` switch on in Trainer.setup (packed rows vary
        # in length, so the trainer compiles them for dynamic shapes)
        configure_layers(self.model, checkpointing, compile_layers, dynamic_shapes=spec.packed)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model.parts(), OPTIM, device)
        self.shapes = stitch_shapes(self.model)
        self.skipped = 0

    def batches(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        return stitch_batches(samples, self.spec, self.micro_batch)

    def step(self, micro: list[dict[str, Any]]) -> float:
        result = train_step(self.model, self.optimizer, micro, device=self.device, autocast_dtype=self.autocast,
                            max_grad_norm=OPTIM.max_grad_norm, params=self.params)
        self.skipped += result.skipped
        return result.loss


def build_hf(cfg: VLMConfig, device: torch.device) -> nn.Module:
    """HF's InternVL from the config Stitch exports for `cfg` (random init, fp32, SDPA), built on `device`."""
    import transformers

    hf_cfg = transformers.InternVLConfig.from_dict(vlm_config_to_hf(cfg, "internvl"))
    hf_cfg.text_config.use_cache = False
    with torch.device(device):
        model = transformers.InternVLForConditionalGeneration._from_config(
            hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.to(device)


class HFSide:
    """The HF peer in its ordinary training loop (what `transformers.Trainer` does per optimizer step)."""

    name = "hf"

    def __init__(self, cfg: VLMConfig, device: torch.device, checkpointing: bool | str,
                 autocast: torch.dtype | None, spec: DataSpec, micro_batch: int):
        self.device, self.autocast, self.micro_batch = device, autocast, micro_batch
        self.model = build_hf(cfg, device)
        if checkpointing:
            # one part: that part's own PreTrainedModel switch (HF sets it on every submodule below it)
            target = {"vision": self.model.model.vision_tower, "llm": self.model.model.language_model}.get(
                checkpointing, self.model)
            enable = getattr(target, "activation_checkpointing_enable", None)
            if enable is None:  # transformers before the rename
                enable = target.gradient_checkpointing_enable
            enable()
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        inner = self.model.model
        parts = {"vision": inner.vision_tower, "projector": inner.multi_modal_projector,
                 "llm": nn.ModuleList([inner.language_model, self.model.lm_head])}
        self.optimizer = build_optimizer(parts, OPTIM, device)  # same groups and fused AdamW as Stitch's
        self.shapes = hf_shapes(self.model)
        self.skipped = 0

    def batches(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        return hf_batches(samples, self.micro_batch)

    def step(self, micro: list[dict[str, Any]]) -> float:
        # HF's token-weighted accumulation: each micro-batch's summed loss over the step's label count.
        n_items = torch.tensor(count_label_tokens(micro), device=self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                    else contextlib.nullcontext())
        loss_sum = torch.zeros((), device=self.device)
        for mb in micro:
            with autocast:
                out = self.model(**mb, num_items_in_batch=n_items, use_cache=False)
            out.loss.backward()
            loss_sum += out.loss.detach().float()
        torch.nn.utils.clip_grad_norm_(self.params, OPTIM.max_grad_norm, foreach=self.device.type == "cuda" or None)
        loss = float(loss_sum)  # the host reads the loss each step, as Stitch's step does
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


SIDE_CLASSES: dict[str, Callable[..., StitchSide | HFSide]] = {"stitch": StitchSide, "hf": HFSide}


# ------------------------------------------------------------------------------------------- measuring
@dataclass
class RunConfig:
    preset: str
    batch: int
    micro_batch: int
    checkpointing: bool | str  # False, True (every layer), "vision" / "llm" (that part's layers)
    packed: bool

    @property
    def label(self) -> str:
        text = f"b{self.batch}"
        if self.micro_batch != self.batch:
            text += f" mb{self.micro_batch}"
        if self.checkpointing:
            text += " ckpt" if self.checkpointing is True else f" ckpt-{self.checkpointing}"
        return text + (" packed" if self.packed else "")


def _time_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> list[float]:
    """Seconds spent in `optimizer.step()` (AdamW's update alone), summed into the returned one-element list.

    Both sides read their loss on the host right before the step, so the sync in the pre-hook waits for
    nothing; the one after the step moves the end-of-step wait a little earlier."""
    total, start = [0.0], [0.0]

    def pre(*_):
        sync(device)
        start[0] = time.perf_counter()

    def post(*_):
        sync(device)
        total[0] += time.perf_counter() - start[0]

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
    return total


def measure(side_name: str, run: RunConfig, cfg: VLMConfig, spec: DataSpec, args: argparse.Namespace,
            device: torch.device, autocast: torch.dtype | None, peak_flops: float | None) -> dict[str, Any]:
    """Build one side for one configuration, warm it up, time `args.steps` steps; raises on OOM."""
    torch.manual_seed(args.seed)
    extra = {"compile_layers": args.compile} if side_name == "stitch" else {}
    side = SIDE_CLASSES[side_name](cfg, device, run.checkpointing, autocast, spec, run.micro_batch, **extra)
    seconds = flops = 0.0
    tokens = padded = micro_count = 0
    losses, step_times = [], []
    optimizer_time = _time_optimizer(side.optimizer, device)
    for step in range(args.warmup + args.steps):
        samples = step_samples(cfg, spec, run.batch, step, args.seed)
        micro = to_device(side.batches(samples), device)
        sync(device)
        start = time.perf_counter()
        losses.append(side.step(micro))
        sync(device)
        elapsed = time.perf_counter() - start
        step_times.append(round(elapsed, 4))
        if step < args.warmup:
            optimizer_time[0] = 0.0
            continue
        seconds += elapsed
        lens = [len(s) for s in samples]
        tokens += sum(lens)
        padded += sum(int(mb["input_ids"].numel()) for mb in micro)
        micro_count += len(micro)
        flops += side.shapes.flops(lens, sum(s.pixel_values.shape[0] for s in samples))
    if args.profile:  # one more step, untimed, under the profiler
        samples = step_samples(cfg, spec, run.batch, args.warmup + args.steps, args.seed)
        micro = to_device(side.batches(samples), device)
        path = Path(args.profile) / f"{name_slug(run.label)}_{side_name}.txt"
        where = profile_call(lambda: side.step(micro), device, path)
        print(f"profile of one step: {where}", flush=True)
    tflops = flops / seconds / 1e12
    peak = peak_memory_gib(device)
    return dict(
        status="ok", tokens_per_s=round(tokens / seconds, 1), tflops=round(tflops, 3),
        mfu=round(flops / seconds / peak_flops, 4) if peak_flops else None,
        peak_gib=round(peak, 2) if peak is not None else None, step_s=round(seconds / args.steps, 4),
        tokens_per_step=tokens / args.steps, padded_tokens_per_step=padded / args.steps,
        micro_batches_per_step=micro_count / args.steps, flops_per_step=flops / args.steps,
        optimizer_s=round(optimizer_time[0] / args.steps, 4), step_times_s=step_times,
        loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), skipped_steps=side.skipped,
        flop_shapes=asdict(side.shapes),
    )


def ratio_text(rows: list[dict[str, Any]], label: str) -> dict[str, str]:
    """Stitch tokens/s over HF tokens/s for one configuration, or why there is no number."""
    by = {r["side"]: r for r in rows if r["config"] == label}
    s, h = by.get("stitch"), by.get("hf")
    if s is None or h is None:
        return {}
    if s["status"] == "ok" and h["status"] == "ok":
        return {"stitch": f"{s['tokens_per_s'] / h['tokens_per_s']:.2f}x"}
    if s["status"] == "ok":
        return {"stitch": "hf OOM"}
    return {"stitch": "stitch OOM" if h["status"] == "ok" else "both OOM"}


def merge_earlier(path: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's rows plus the rows of an earlier run written to `path` that this run did not repeat.

    So a sweep can be split over several commands (one GPU command has a time limit) and still end in one
    file. Only a file of the same benchmark, preset, data, precision and device is merged; rows sort by
    configuration, this run's rows replacing earlier ones of the same configuration and side.
    """
    if not path.exists():
        return report["results"]
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return report["results"]
    now = json.loads(json.dumps(report))  # as it would read back (tuples become lists)
    same = all(old.get(k) == now[k] for k in ("benchmark", "preset", "data", "precision")) and (
        old.get("machine", {}).get("device") == report["machine"]["device"])
    if not same:
        print(f"note: {path} holds a different setup; overwriting it (use --out to keep both)")
        return report["results"]
    new_keys = {(r["config"], r["side"]) for r in report["results"]}
    rows = [r for r in old.get("results", []) if (r["config"], r["side"]) not in new_keys] + report["results"]
    side_order = {s: i for i, s in enumerate(SIDES)}
    return sorted(rows, key=lambda r: (r["packed"], str(r["checkpointing"]), r["batch"], r["micro_batch"],
                                       side_order.get(r["side"], len(SIDES))))


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = report["results"]
    table = Table(title=f"{report['preset']} training throughput, {report['machine']['device']}, "
                        f"{report['precision']}, {report['data']['description']}")
    for col in ("config", "side", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "stitch/hf"):
        table.add_column(col, justify="left" if col in ("config", "side") else "right")
    labels = list(dict.fromkeys(r["config"] for r in rows))
    for label in labels:
        ratios = ratio_text(rows, label)
        for r in (r for r in rows if r["config"] == label):
            if r["status"] != "ok":
                table.add_row(label, r["side"], r["status"], "-", "-", "-", ratios.get(r["side"], ""))
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            tflops = f"{r['tflops']:.1f}" if r["tflops"] >= 10 else f"{r['tflops']:.3g}"
            table.add_row(label, r["side"], f"{r['tokens_per_s']:,.0f}", tflops, mfu, peak,
                          ratios.get(r["side"], ""))
    console = Console(width=max(120, Console().width))
    console.print(table)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="internvl-2b", choices=["internvl-2b", "internvl-8b"])
    ap.add_argument("--tiny", action="store_true",
                    help="vlm-tiny (56 px tiles, 4 tokens each), CPU, fp32: the whole script in seconds")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="samples per optimizer step (default 4 8 16; "
                    "tiny: 2)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="samples per forward (gradient accumulation over the step; default: the whole batch). "
                         "Packed Stitch ignores it: its micro-batches are the packed rows")
    ap.add_argument("--checkpointing", default="both", choices=["both", "on", "off", "vision", "llm"],
                    help="activation checkpointing, each side's own: every ViT and LLM layer (on), none (off), "
                         "both settings (both), or one part's layers only (vision, llm)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--packed", action="store_true", help="the realistic mix: Stitch packs, HF pads")
    ap.add_argument("--row-tokens", type=int, default=None, help="Stitch's packed row budget (default 8192; "
                    "tiny: 256)")
    ap.add_argument("--tiles", type=int, default=5, help="fixed data: tiles per sample")
    ap.add_argument("--text-tokens", type=int, default=None, help="fixed data: text tokens (default 768; tiny: 44)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                    help="bf16 autocast over fp32 weights (default on CUDA) or plain fp32 (default on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"MFU denominator (default {PEAK_TFLOPS_H200:g} on CUDA; no MFU on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="Stitch compiles each block (train.compile: true)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the timed steps, profile one more step per side (torch.profiler) and write where "
                         "the time went to DIR/<config>_<side>.txt (not part of the timed figures)")
    ap.add_argument("--fresh", action="store_true",
                    help="overwrite --out instead of merging with the rows of an earlier run of the same setup")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_throughput_<device>_"
                    "<preset>[-packed].json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if precision == "bf16" else None
    peak_tflops = args.peak_tflops or (PEAK_TFLOPS_H200 if device.type == "cuda" else None)
    peak_flops = peak_tflops * 1e12 if peak_tflops else None
    preset = "vlm-tiny" if args.tiny else args.preset
    batches = args.batch or ([2] if args.tiny else [4, 8, 16])
    args.steps = args.steps or (2 if args.tiny else 10)
    modes = {"both": [False, True], "on": [True], "off": [False]}.get(args.checkpointing, [args.checkpointing])

    cfg = model_config(preset)
    spec = DataSpec(
        packed=args.packed, tiles=args.tiles, text_tokens=args.text_tokens or (44 if args.tiny else 768),
        tiles_range=(1, 7), text_range=(5, 60) if args.tiny else (50, 1500),
        row_tokens=args.row_tokens or (256 if args.tiny else 8192),
    )
    longest = spec.tiles_range[1] * cfg.tokens_per_tile + spec.text_range[1]
    if spec.packed and spec.row_tokens < longest:
        raise SystemExit(f"--row-tokens {spec.row_tokens} is shorter than the longest sample ({longest} tokens)")
    if spec.packed:
        description = (f"packed mix: {spec.tiles_range[0]}-{spec.tiles_range[1]} tiles x {cfg.tokens_per_tile} + "
                       f"{spec.text_range[0]}-{spec.text_range[1]} text tokens, Stitch rows <= {spec.row_tokens}")
    else:
        description = (f"{spec.tiles} tiles x {cfg.tokens_per_tile} + {spec.text_tokens} text = "
                       f"{spec.tiles * cfg.tokens_per_tile + spec.text_tokens} tokens/sample")
    out = Path(args.out or RESULTS_DIR / f"train_throughput_{device_slug(device)}_{preset}"
                                         f"{'-packed' if args.packed else ''}.json")
    print(f"{preset} on {device} ({precision}); {description}; {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)

    results: list[dict[str, Any]] = []
    for checkpointing in modes:
        for batch in batches:
            run = RunConfig(preset, batch, min(args.micro_batch or batch, batch), checkpointing, args.packed)
            for side in args.sides:
                free_memory(device)
                try:
                    row = measure(side, run, cfg, spec, args, device, autocast, peak_flops)
                except Exception as e:  # an OOM is a result; anything else is a bug
                    if not is_oom(e):
                        raise
                    row = dict(status="OOM", error=str(e).splitlines()[0][:300],
                               peak_gib=None if (p := peak_memory_gib(device)) is None else round(p, 2))
                free_memory(device)
                row = dict(config=run.label, side=side, **asdict(run), steps=args.steps, warmup=args.warmup, **row)
                if row.get("skipped_steps"):
                    print(f"warning: {side} skipped {row['skipped_steps']} non-finite steps", flush=True)
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "flop_shapes"}), flush=True)

    shapes = {r["side"]: r["flop_shapes"] for r in results if r["status"] == "ok"}
    report = dict(
        benchmark="train_throughput", preset=preset, precision=precision, stitch_compile=args.compile,
        model=f"{preset}: {cfg.vision.num_layers}-layer ViT {cfg.vision.hidden_size} wide + "
              f"{cfg.llm.num_layers}-layer LLM {cfg.llm.hidden_size} wide, random weights",
        data=dict(asdict(spec), description=description),
        optimizer=dict(kind="AdamW", fused=device.type == "cuda", lr=OPTIM.lr, weight_decay=OPTIM.weight_decay,
                       betas=list(OPTIM.betas), max_grad_norm=OPTIM.max_grad_norm, master_weights="fp32"),
        peak_tflops=peak_tflops, flop_convention=FLOP_CONVENTION, flop_shapes=shapes,
        flop_shapes_agree=len({json.dumps(s, sort_keys=True) for s in shapes.values()}) <= 1,
        steps=args.steps, warmup=args.warmup, seed=args.seed, machine=machine_info(device),
        command=" ".join(["python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        results=results,
    )
    if not args.fresh:
        report["results"] = merge_earlier(out, report)
    write_json(out, report)
    print(f"\nwritten to {out}; FLOP shapes of the sides agree: {report['flop_shapes_agree']}")
    print_table(report)
    bad = [r for r in results if r["status"] == "ok" and not math.isfinite(r["loss_last"])]
    if bad:
        print(f"warning: non-finite loss in {[(r['config'], r['side']) for r in bad]}")
    return report


if __name__ == "__main__":
    main()
