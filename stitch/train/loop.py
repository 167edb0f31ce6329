"""The training loop: `Trainer` owns everything around one step (`stitch.train.step.train_step`): building or
loading the model, freezing by stage, the data stream, the LR schedule, logging, evaluation, atomic checkpoints,
resume and signals.

Determinism: everything is seeded, the data stream and all RNGs are saved with each checkpoint, and RNG
states are restored right before the first resumed step, so on CPU in fp32 a resumed run is bitwise the run
that was never interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from stitch.checkpoint.lora import base_reference, is_lora_checkpoint, read_lora_meta, save_lora_checkpoint
from stitch.checkpoint.store import save
from stitch.config import VLMConfig
from stitch.data.blend import build_train_stream
from stitch.data.processor import Processor
from stitch.device import compute_dtype, resolve_device
from stitch.errors import StitchConfigError, StitchError
from stitch.models.lora import has_lora
from stitch.models.vlm import VLM
from stitch.parallel.runtime import ParallelModel
from stitch.parallel.step import save_weights
from stitch.train.benchmarks import score_benchmarks
from stitch.train.config import TrainConfig
from stitch.train.frozen import FrozenLinearWeights
from stitch.train.log import MetricsLog, Progress, plot_losses
from stitch.train.metrics import FlopModel, RunSummary, batch_shape, peak_flops, peak_memory_gb
from stitch.train.model_setup import batch_shapes_vary, build_training_model, configure_layers, set_dropout
from stitch.train.optim import build_optimizer
from stitch.train.preference import PairObjective, evaluate_pairs, preference_stream, start_reference
from stitch.train.schedule import LRSchedule, build_scheduler
from stitch.train.stages import apply_stage, parameter_table, trainable_vision_layers
from stitch.train.state import (
    Collective,
    TrainState,
    collective_dir,
    isolated_rng,
    latest_checkpoint,
    load_train_state,
    restore_rng_from,
    save_checkpoint,
    seed_everything,
)
from stitch.train.step import Distributed, eval_batch, train_step
from stitch.train.synthetic import SyntheticStream

__all__ = ["Trainer", "TrainingError"]


class TrainingError(StitchError):
    """The run cannot continue (e.g. non-finite losses K steps in a row)."""


class Trainer:
    """A training run from a `TrainConfig` (see the module docstring). `fit()` runs it to the end."""

    def __init__(self, cfg: TrainConfig, dist: Distributed | None = None, console_print: Callable | None = None):
        self.cfg = cfg
        self.dist = dist or Distributed()
        self.out = Path(cfg.output_dir)
        self.device = self._device()
        self.compute = compute_dtype(self.device, cfg.train.precision)
        self.precision = self.compute.precision
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self._print = console_print or print
        self._stop: str | None = None
        self.accumulation = cfg.accumulation_for(self.dist.dp_size)
        if cfg.parallel.world_size > 1 and self.dist.parallelize is None:
            raise StitchConfigError(
                f"parallel: dp={cfg.parallel.dp} tp={cfg.parallel.tp} pp={cfg.parallel.pp} needs the parallel "
                "launcher (stitch.parallel under torchrun); this process trains on one device, so set them to 1"
            )

    # ------------------------------------------------------------------ setup
    def _device(self) -> torch.device:
        """`train.device` read as `stitch.device.resolve_device` reads `--device` ("auto": cuda if there is one),
        with the CUDA index made explicit: set_device and the memory counters need one."""
        want = self.cfg.train.device
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise StitchConfigError(f"train.device is {want!r} but CUDA is not available")
        device = resolve_device(None if want == "auto" else want, setting="train.device")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def log(self, text: str) -> None:
        if self.dist.is_main:
            self._print(text)

    def build_model(self, resume_from: Path | None) -> tuple[VLM, Any]:
        """(model in fp32 on the device, tokenizer or None) from a checkpoint, or from a preset at random."""
        return build_training_model(self.cfg.model, self.device, resume_from)

    def build_stream(self, model_cfg: VLMConfig, processor, val: bool = False):
        """The training (or validation) batch stream of this rank; None for validation when there is none."""
        cfg = self.cfg
        explicit_val = val and cfg.eval.data is not None
        if cfg.is_preference:
            return preference_stream(cfg, processor, self.dist, self.reference, self.resume_from is not None,
                                     self.device, val=val)
        if cfg.synthetic.enabled and not explicit_val:
            pad = processor.pad_token_id if processor is not None else 0
            return SyntheticStream(cfg.synthetic, cfg.data, model_cfg, pad, self.dist.dp_rank, self.dist.dp_size,
                                   seed_offset=7919 if val else 0)
        if processor is None:
            raise StitchConfigError("data: reading datasets needs a tokenizer (the checkpoint has none; "
                                    "set model.tokenizer or use synthetic.enabled: true)")
        data = cfg.data
        if explicit_val:
            data = cfg.eval.data
        elif val:
            if cfg.data.blend is None:
                return None  # inline datasets have no val split; set eval.data
            data = cfg.data.model_copy(update={"split": "val"})
        return build_train_stream(data, processor, rank=self.dist.dp_rank, world_size=self.dist.dp_size,
                                  seed=cfg.train.seed)

    def _processor(self, tokenizer, model_cfg: VLMConfig):
        if tokenizer is None:
            return None
        d = self.cfg.data
        return Processor(tokenizer, model_cfg, max_image_pixels=d.max_image_pixels, budget_steps=d.tile_budgets,
                         system_prompt=d.system_prompt)

    def setup(self) -> None:
        """Build everything `fit()` needs (idempotent; call it first to inspect or hook the model)."""
        if getattr(self, "model", None) is not None:
            return
        cfg = self.cfg
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        seed_everything(cfg.train.seed)
        resume_from = latest_checkpoint(self.out) if cfg.checkpoint.resume else None
        self.resume_from = resume_from
        model, self.tokenizer = self.build_model(resume_from)
        if resume_from is None:
            # A checkpoint's config already holds the run's dropout; a fresh start applies the override.
            set_dropout(model, cfg.model.llm_dropout, cfg.model.vision_dropout)
        if cfg.model.max_tiles is not None:
            model.config.max_tiles = cfg.model.max_tiles
        if cfg.model.tile_tags is not None:
            model.config.tile_tags = cfg.model.tile_tags
        self.lora_base = self._lora_base(model, resume_from)
        self.counts = apply_stage(model, cfg)  # LoRA layers are added here when cfg.lora.enabled
        self.reference = None
        if cfg.is_preference:  # the frozen starting policy the preference losses compare with
            self.reference = start_reference(cfg, model, self.device, resume_from, self.autocast_dtype)
        configure_layers(model, cfg.train.activation_checkpointing, cfg.train.compile, dynamic_shapes=cfg.data.pack,
                         shapes_vary=batch_shapes_vary(cfg))
        model.train()
        self.model = model
        self.frozen: FrozenLinearWeights | None = None
        self.module = self.dist.parallelize(model, cfg) if self.dist.parallelize else model
        self.objective = None
        if self.reference is not None:
            if self.dist.parallelize:  # a frozen copy is sharded as the policy is
                self.reference.parallelize(lambda m: self.dist.parallelize(m, cfg), self.module)
            self.objective = PairObjective(self.reference, cfg.preference)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.schedule = LRSchedule(cfg.schedule.kind, cfg.schedule.warmup_steps, cfg.decay_steps,
                                   cfg.schedule.min_lr / cfg.optim.lr)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        if self.params or self.dist.parallelize is None:
            # Under a layout a rank may hold nothing trainable (a middle pipeline stage in pretraining): it
            # still joins every collective through `train_step`, with no optimizer.
            self.optimizer = build_optimizer(model.parts(), cfg.optim, self.device)
            self.scheduler = build_scheduler(self.optimizer, cfg.schedule.kind, cfg.schedule.warmup_steps,
                                             cfg.decay_steps, cfg.optim.lr, cfg.schedule.min_lr)
        if self.dist.collective and self._checkpoints_needed(resume_from):
            if not isinstance(self.module, ParallelModel):
                raise StitchConfigError(
                    "checkpoints under a parallel layout need the layout's collective writer (save_weights and "
                    "barrier, which a stitch.parallel.ParallelModel from Distributed.parallelize brings): set "
                    "checkpoint.every=0 checkpoint.at_end=false checkpoint.save_final=false, or parallelize with "
                    "stitch.parallel"
                )
            if cfg.lora.enabled:
                raise StitchConfigError(
                    "lora: checkpoints of a LoRA run under a parallel layout are not supported yet: train it in "
                    "one process, or set checkpoint.every=0 checkpoint.at_end=false checkpoint.save_final=false"
                )
        k = trainable_vision_layers(model, cfg)
        # A LoRA LLM is frozen with gradients flowing through it (adapter FLOPs are negligible and not counted).
        # A LoRA ViT is counted as the stage leaves it (frozen: forward only), so its backward is not counted.
        llm_trains = cfg.trains("llm") and not (cfg.lora.enabled and "llm" in cfg.lora.parts)
        self.flops = FlopModel(model.config, k, cfg.unfreeze.vision, llm_trains)
        self.peak = peak_flops(self.device, self.precision, cfg.log.peak_tflops)
        self.state = TrainState()
        payload = None
        if resume_from is not None:
            self.state, payload = load_train_state(resume_from, model, self.optimizer, self.scheduler,
                                                   rank=self.dist.rank)
        self.processor = self._processor(self.tokenizer, model.config)
        self.stream = self.build_stream(model.config, self.processor)
        if payload is not None and payload.get("data") is not None:
            self.stream.load_state_dict(payload["data"])
        self.val_pairs = None
        if cfg.is_preference and cfg.eval.every:
            # Built before the first step: a precomputed reference runs its pass over these pairs now, while the
            # model is still the reference. Each evaluation rewinds it to the same pairs.
            self.val_pairs = self.build_stream(model.config, self.processor, val=True)
            self._val_start = self.val_pairs.state_dict()
        self._resume_payload = payload

    def _lora_base(self, model: VLM, resume_from: Path | None) -> dict[str, str] | None:
        """The base checkpoint a LoRA run's checkpoints point at (path + fingerprint); None without LoRA.

        A resumed run keeps the pointer of the checkpoint it resumes from; a fresh one points at
        `model.checkpoint`. A random_init base exists only in memory, so it is written once to OUT/base.
        """
        cfg = self.cfg
        if resume_from is not None:
            if is_lora_checkpoint(resume_from) != cfg.lora.enabled:
                have = "full weights" if cfg.lora.enabled else "LoRA adapters"
                raise StitchConfigError(
                    f"lora.enabled is {str(cfg.lora.enabled).lower()} but {resume_from} holds {have}: a run cannot "
                    "switch LoRA on or off when it resumes (use a new output_dir, with model.checkpoint pointing "
                    "at this run's last checkpoint)"
                )
            return read_lora_meta(resume_from)["base"] if cfg.lora.enabled else None
        if not cfg.lora.enabled:
            return None
        if not cfg.model.random_init:
            return base_reference(cfg.model.checkpoint)
        if self.dist.collective or not self._checkpoints_needed(None):
            return None  # nothing will be saved (a layout with checkpoints refuses LoRA in setup)
        base = self.out / "base"
        if self.dist.is_main:
            save(model, base, tokenizer=self.tokenizer)
        return base_reference(base)

    def _checkpoints_needed(self, resume_from: Path | None) -> bool:
        c = self.cfg.checkpoint
        return bool(resume_from or c.every or c.at_end or c.save_final)

    # ------------------------------------------------------------------ run
    def fit(self) -> RunSummary:
        """Train to `train.steps` (resuming if the output folder holds a checkpoint); returns a summary."""
        cfg = self.cfg
        self.setup()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
        start = self.state.step
        self._header(start)
        metrics = MetricsLog(self.out, resume_step=start if self.resume_from else None,
                             tensorboard=cfg.log.tensorboard) if self.dist.is_main else None
        progress = Progress(cfg.train.steps, start, enabled=cfg.log.progress and self.dist.is_main,
                            every=cfg.log.every)
        batches = iter(self.stream)
        if self.resume_from is not None:
            restore_rng_from(self.resume_from, self._resume_payload, rank=self.dist.rank)
        summary = RunSummary(step=start, final_dir=None)
        last_saved = start if self.resume_from else None
        handlers = self._install_signals()
        loop_start = time.perf_counter()
        self.cast_frozen_weights()
        try:
            while self.state.step < cfg.train.steps:
                record = self._one_step(batches)
                step = self.state.step
                summary.losses.append(record["loss"])
                summary.records.append(record)
                if metrics is not None and (step % cfg.log.every == 0 or step == cfg.train.steps):
                    metrics.write(record)
                progress.update(step, record)
                if cfg.eval.every and step % cfg.eval.every == 0:
                    self._evaluate(metrics, progress)
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                    self._benchmarks(self.save(), metrics)
                    last_saved = step
                if self._signalled_or_late(loop_start):
                    break
            ran = self.state.step > start
            if ran and self._stop is None and cfg.eval.every and self.state.step % cfg.eval.every:
                self._evaluate(metrics, progress)
            if last_saved != self.state.step and (cfg.checkpoint.at_end or self._stop is not None):
                self._benchmarks(self.save(), metrics)
        finally:
            self._restore_signals(handlers)
            progress.close()
            self.restore_frozen_weights()
            if metrics is not None:
                metrics.close()
        summary.step = self.state.step
        if self._stop is not None:
            summary.interrupted = self._stop
            self.log(f"{self._stop}: saved step {self.state.step} in {self.out / 'checkpoints'}; "
                     "run the same command again to resume")
            return summary
        if cfg.checkpoint.save_final and (self.dist.is_main or self.dist.collective):
            summary.final_dir = self.save_final()
        if self.dist.is_main:
            if cfg.log.plot:
                plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            self._write_summary(summary)
        speed = summary.throughput()
        rate = f"{speed['tokens_per_s']:,.0f} tokens/s" if speed else "no steps timed"
        if speed.get("mfu") is not None:
            rate += f", MFU {100 * speed['mfu']:.1f}%"
        self.log(f"done: {self.state.step} steps, {self.state.bad_steps} skipped (non-finite); {rate}; "
                 f"peak memory {peak_memory_gb(self.device):.2f} GB; output in {self.out}")
        return summary

    def _signalled_or_late(self, loop_start: float) -> bool:
        """Whether the loop ends after this step: a signal (`self._stop`, which then saves a checkpoint) or
        `train.max_minutes` passed (which ends the run as `train.steps` would). Under a layout the ranks agree
        (a signal or clock on any rank stops them all after the same step), else one would wait forever in the
        next step's collectives."""
        limit = self.cfg.train.max_minutes
        late = limit is not None and time.perf_counter() - loop_start > limit * 60
        signalled = self._stop is not None
        if self.dist.collective and torch.distributed.is_initialized():
            flags = torch.tensor([float(signalled), float(late)],
                                 device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signalled, late = (bool(x) for x in flags.tolist())
            if signalled and self._stop is None:
                self._stop = "a signal on another rank"
        if late and not signalled:
            self.log(f"train.max_minutes ({limit:g}) reached after step {self.state.step}: finishing here")
        return signalled or late

    def _next_micro_batches(self, batches: Iterator[dict]) -> list[dict]:
        # The data pipeline may draw from the global RNGs (a DataLoader draws its base seed when it starts,
        # which happens lazily at the first batch); isolating it keeps dropout's random stream a function
        # of the step alone, so a resumed run sees the same stream as a straight one.
        with isolated_rng():
            return [next(batches) for _ in range(self.accumulation)]

    def _one_step(self, batches: Iterator[dict]) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        micro = self._next_micro_batches(batches)
        shapes = [batch_shape(mb) for mb in micro]
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        lrs = {g["name"].split(".")[0]: g["lr"] for g in groups}
        lr = cfg.optim.lr * self.schedule(self.state.step)  # the schedule at this step
        result = train_step(self.module, self.optimizer, micro, device=self.device,
                            autocast_dtype=self.autocast_dtype, max_grad_norm=cfg.optim.max_grad_norm,
                            params=self.params, objective=self.objective)
        if self.scheduler is not None:
            self.scheduler.step()
        dt = time.perf_counter() - t0
        st = self.state
        st.step += 1
        tokens = sum(s.tokens for s in shapes)
        st.tokens += tokens
        st.label_tokens += result.label_tokens
        if result.skipped:
            st.bad_steps += 1
            st.bad_in_a_row += 1
            self.log(f"step {st.step}: non-finite loss or gradient (loss {result.loss}, grad norm "
                     f"{result.grad_norm}); update skipped ({st.bad_in_a_row} in a row, {st.bad_steps} in all)")
            if st.bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingError(
                    f"stopping at step {st.step}: {st.bad_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient (train.max_bad_steps = {cfg.train.max_bad_steps}); lower optim.lr, check the data, "
                    f"or resume from {latest_checkpoint(self.out) or 'the start'}"
                )
        else:
            st.bad_in_a_row = 0
        flops = sum(self.flops.flops(s) for s in shapes)
        world = self.dist.dp_size
        record: dict[str, Any] = {
            "step": st.step,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens": tokens * world,
            "label_tokens": result.label_tokens,
            "tokens_per_s": tokens * world / dt,
            "tflops_per_device": flops / dt / 1e12,
            "mfu": flops / dt / self.peak if self.peak else None,
            "step_s": dt,
            "mem_gb": peak_memory_gb(self.device),
            "skipped": result.skipped,
        }
        if cfg.optim.part_lr:
            record.update({f"lr_{part}": v for part, v in lrs.items()})
        record.update(result.metrics)  # preference stages: rewards, margins, accuracy, KL
        return record

    @torch.no_grad()
    def evaluate_pairs(self) -> dict[str, float]:
        """Preference stages: loss, rewards, accuracy and KL of the held-out pairs (`eval.data`): the first
        `eval.batches` micro-batches of each data rank, fewer when that would repeat pairs."""
        stream = self.val_pairs
        stream.load_state_dict(self._val_start)
        per_step = stream.data.batch_size * self.dist.dp_size
        n = min(self.cfg.eval.batches, max(1, len(stream.index) // per_step))  # the same on every rank
        batches = iter(stream)
        self.module.eval()
        try:
            return evaluate_pairs(self.module, self.objective, (next(batches) for _ in range(n)), self.device,
                                  self.autocast_dtype)
        finally:
            self.module.train()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean loss over the first `eval.batches` batches of the validation stream (for a
        preference stage: the held-out pairs' preference loss, see `evaluate_pairs`)."""
        if self.val_pairs is not None:
            return self.evaluate_pairs()["loss"]
        stream = self.build_stream(self.model.config, self.processor, val=True)
        if stream is None:
            return None
        self.module.eval()
        loss_sum, tokens = 0.0, 0
        try:
            for i, batch in enumerate(stream):
                if i >= self.cfg.eval.batches:
                    break
                loss, n = eval_batch(self.module, batch, self.device, self.autocast_dtype)
                loss_sum, tokens = loss_sum + loss * n, tokens + n
        finally:
            self.module.train()
        return loss_sum / tokens if tokens > 0 else None

    def _evaluate(self, metrics: MetricsLog | None, progress: Progress) -> None:
        # Validation must not move any RNG the training run depends on (resume would then diverge).
        devices = [self.device] if self.device.type == "cuda" else []
        with isolated_rng(), torch.random.fork_rng(devices=devices):
            if self.val_pairs is not None:
                pairs = self.evaluate_pairs()
                record = {"step": self.state.step, "val_loss": pairs.pop("loss"),
                          **{f"val_{k}": v for k, v in pairs.items()}}
                if metrics is not None:
                    metrics.write(record)
                progress.message(f"step {self.state.step}: val loss {record['val_loss']:.4f}, preference accuracy "
                                 f"{record['val_rewards/accuracies']:.3f}, margin {record['val_rewards/margins']:.4f}")
                return
            val = self.evaluate()
        if val is None:
            return
        if metrics is not None:
            metrics.write({"step": self.state.step, "val_loss": val})
        progress.message(f"step {self.state.step}: val loss {val:.4f}")

    def _benchmarks(self, ckpt: Path, metrics: MetricsLog | None) -> None:
        """`eval.tasks`: score the benchmarks on the checkpoint just saved (main process; stitch.train.benchmarks)."""
        if not self.cfg.eval.tasks or metrics is None or self._stop is not None:
            return
        scores, errors = score_benchmarks(ckpt, self.cfg.eval.tasks, self.out, self.state.step, str(self.device))
        for line in errors:
            self.log(line)
        if scores:
            metrics.write({"step": self.state.step, **scores})
            self.log(f"step {self.state.step}: " + ", ".join(f"{k[6:]} {v:.2f}" for k, v in scores.items()))

    # ------------------------------------------------------------------ checkpoints
    def _collective(self) -> Collective | None:
        d = self.dist
        if not d.collective:
            return None
        return Collective(rank=d.rank, barrier=torch.distributed.barrier,
                          write_weights=lambda folder: save_weights(self.module, folder))

    def cast_frozen_weights(self) -> None:
        """For the loop: on a CPU autocast's per-forward cast of frozen weights costs as much as the matmuls,
        so they are cast once (`stitch.train.frozen`). Single process without LoRA only: the layouts and the
        adapter merges read the weights as loaded."""
        if (self.frozen is None and self.autocast_dtype is not None and self.device.type == "cpu"
                and self.dist.parallelize is None and not self.cfg.lora.enabled):
            self.frozen = FrozenLinearWeights(self.model, self.autocast_dtype)

    def restore_frozen_weights(self) -> None:
        if self.frozen is not None:
            self.frozen.restore()
            self.frozen = None

    def _original_weights(self):
        return self.frozen.original() if self.frozen is not None else contextlib.nullcontext()

    def save(self) -> Path:
        """A step checkpoint (collective under a parallel layout: every rank calls it)."""
        cfg = self.cfg
        with self._original_weights():
            path = self._save_checkpoint()
        if cfg.checkpoint.pause_after_save_s:
            time.sleep(cfg.checkpoint.pause_after_save_s)
        return path

    def _save_checkpoint(self) -> Path:
        cfg = self.cfg
        return save_checkpoint(
            self.out, self.model, self.optimizer, self.state,
            data_state=self.stream.state_dict(), train_config=cfg.model_dump(mode="json"),
            tokenizer=self.tokenizer, keep_last=cfg.checkpoint.keep_last, lora_base=self.lora_base,
            collective=self._collective(),
        )

    def _write_summary(self, summary: RunSummary) -> None:
        """OUT/summary.json: what a benchmark table needs from this run."""
        import json

        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        data = {
            "steps": summary.step,
            "final_loss": summary.losses[-1] if summary.losses else None,
            "skipped_steps": self.state.bad_steps,
            **summary.throughput(),
            "peak_memory_gb": peak_memory_gb(self.device),
            "device": device,
            "precision": self.precision,
            "peak_tflops": self.peak / 1e12 if self.peak else None,
            "global_batch_size": self.cfg.train.global_batch_size,
            "flop_convention": "model FLOPs (no recompute); trained 6/param/token, frozen-with-grads 4, "
                               "frozen-first 2; causal LLM attention n(n+1)/2 pairs per sample; LM head at "
                               "label positions only (stitch.train.metrics)",
        }
        (self.out / "summary.json").write_text(json.dumps(data, indent=2) + "\n")

    def save_final(self) -> Path:
        """OUT/final: a full checkpoint, or for a LoRA run the adapters + trainable modules + base pointer
        (`stitch.load(final, merge_lora=True)` and `stitch export-hf` merge them)."""
        collective = self._collective()
        if collective is not None:
            return self._save_final_collective(collective)
        if has_lora(self.model):
            return save_lora_checkpoint(self.model, self.out / "final", self.lora_base, tokenizer=self.tokenizer)
        return save(self.model, self.out / "final", tokenizer=self.tokenizer)

    def _save_final_collective(self, collective: Collective) -> Path:
        """OUT/final from every rank of a layout, through the layout's full-weight writer."""
        final = self.out / "final"
        with collective_dir(final, collective) as tmp:
            collective.write_weights(tmp)
            if collective.is_main and self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
        return final

    # ------------------------------------------------------------------ signals and header
    def _install_signals(self) -> dict:
        """SIGTERM/SIGINT finish the current step, save, and exit cleanly; a second Ctrl-C aborts at once."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            if self._stop is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop = name
            self.log(f"{name} received: finishing step {self.state.step + 1}, then saving and exiting "
                     "(Ctrl-C again to abort without saving)")

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, on_signal)
        return old

    @staticmethod
    def _restore_signals(old: dict) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def _header(self, start: int) -> None:
        if not self.dist.is_main:
            return
        from rich.console import Console

        cfg = self.cfg
        console = Console()
        what = f"resuming from {self.resume_from} (step {start})" if self.resume_from else "starting fresh"
        console.print(f"[bold]stitch train[/bold]: stage {cfg.stage}, {cfg.train.steps} steps, {what}")
        if cfg.description:
            console.print(cfg.description)
        console.print(parameter_table(self.counts, title=f"parameters ({cfg.stage})"))
        if cfg.lora.enabled:
            lora = cfg.lora
            base = self.lora_base["path"] if self.lora_base else "not saved (no checkpoints)"
            console.print(f"LoRA on {'+'.join(lora.parts)} ({', '.join(lora.modules)}): rank {lora.rank}, alpha "
                          f"{lora.alpha:g}, dropout {lora.dropout:g}; fully trained: "
                          f"{', '.join(lora.trainable) or 'nothing'}; base {base}")
        peak = f"{self.peak / 1e12:.4g} TFLOP/s" if self.peak else "unknown (set log.peak_tflops for MFU)"
        data = "synthetic" if cfg.synthetic.enabled else (cfg.data.blend or f"{len(cfg.data.datasets)} dataset(s)")
        console.print(
            f"device {self.device} ({self.compute}), peak {peak}; global batch {cfg.train.global_batch_size} = "
            f"{self.accumulation} micro-batch(es) x {cfg.data.batch_size} x dp {self.dist.dp_size}; "
            f"data {data}; output {self.out}"
        )

