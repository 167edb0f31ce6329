"""The training config: one typed tree that says what to train, on what, how, and where to write it.

A recipe is a YAML file; `base: other.yaml` (or a list of them) pulls in a base first and the recipe overrides
it key by key (prismatic-style small named configs). `key=value` pairs from the command line come last and use
dotted paths (`optim.lr=2e-5`, `data.datasets=[{path: easy-vqa:train}]`); values are YAML, so they arrive
typed. Every value remembers where it came from, so a bad one fails with the file (or "command line") and the
field path, before any model is built.

Sections (see each class): `model` (where weights come from), `data` (`stitch.data.config.DataConfig`, owned by
the data pipeline), `synthetic` (generated data for smoke/perf runs with no dataset on disk), `stage` +
`unfreeze` (what trains), `lora` (low-rank adapters instead of full weights), `optim`, `schedule`, `train` (the
loop), `checkpoint`, `log`, `eval`, `parallel` (layout keys that `stitch.parallel` reads; the single-process
trainer only checks they are 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stitch.config import LoRAConfig, load_yaml_config, parse_config_overrides, read_config_yaml
from stitch.data.config import DataConfig
from stitch.errors import StitchConfigError

__all__ = [
    "TrainConfig",
    "ModelSource",
    "UnfreezeConfig",
    "LoRAConfig",
    "OptimConfig",
    "ScheduleConfig",
    "LoopConfig",
    "CheckpointConfig",
    "LogConfig",
    "EvalConfig",
    "ParallelConfig",
    "SyntheticConfig",
    "load_config",
    "parse_overrides",
    "read_config_yaml",
    "PARTS",
]

PARTS = ("vision", "projector", "llm")
Part = Literal["vision", "projector", "llm"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSource(_Base):
    """Where the starting weights come from.

    Normally `checkpoint`: a Stitch checkpoint folder (`stitch build` output, a previous stage's `final/`) or an
    HF VLM folder. `random_init: true` instead builds `preset` (a name from `stitch.models.presets.VLM_PRESETS`)
    with random weights: for throughput runs and tests, where no weights need to be on disk. A recipe may name
    both, so `model.random_init=true` on the command line is all a smoke run needs.
    """

    checkpoint: str | None = None
    preset: str | None = None
    random_init: bool = False
    # Tokenizer for a random_init model (a folder or GGUF); default: the bundled SmolLM2 one if installed.
    tokenizer: str | None = None
    # Override the dropout the checkpoint was built with. LLM: residual and attention-probability dropout
    # (Megatron's hidden/attention dropout, one value); vision: attention-probability dropout.
    llm_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    vision_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    # Override the checkpoint's image layout for this stage (NVLM pretrains on one 448px tile without tile
    # tags, then turns tiling and tags on for SFT). Saved into the checkpoints this run writes.
    max_tiles: int | None = Field(default=None, ge=1)
    tile_tags: Literal["none", "nvlm"] | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSource:
        if self.random_init and not self.preset:
            raise ValueError("random_init needs 'preset' (a model preset name such as internvl-2b)")
        if not self.random_init and not self.checkpoint:
            raise ValueError("set 'checkpoint' (a Stitch checkpoint folder), or 'preset' with random_init: true")
        return self


class UnfreezeConfig(_Base):
    """Extra trainable parts beyond the stage's default (the ViT is frozen in both NVLM stages)."""

    vision: bool = False  # train the whole vision encoder
    vision_last_layers: int = Field(default=0, ge=0)  # train only its last k (used) layers and its post-norm
    llm: bool | None = None  # None: the stage decides (pretrain: frozen, sft: trains)
    # When the LLM trains: 0 = all of it; k = only its last k decoder layers and final norm (embeddings and
    # output layer stay frozen), which saves their gradients and optimizer state on small machines.
    llm_last_layers: int = Field(default=0, ge=0)
    # The projector trains in every stage by default; False freezes it (an SFT that adapts only the LLM on an
    # aligned projector, where the backward then stops at the first trained LLM layer).
    projector: bool = True


class OptimConfig(_Base):
    """AdamW. `lr` is the peak rate of every part unless `part_lr` names one; all decay by the same factor."""

    lr: float = Field(default=1e-4, gt=0)
    part_lr: dict[Part, float] = Field(default_factory=dict)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # None: no clipping (the norm is still logged)
    fused: bool | None = None  # None: the fused kernel (CUDA; CPU for unsharded parameters)

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        for part, lr in self.part_lr.items():
            if lr <= 0:
                raise ValueError(f"part_lr.{part} must be > 0 (freeze a part with `unfreeze` instead)")
        return self


class ScheduleConfig(_Base):
    """Linear warmup from 0 to the peak, then cosine or linear decay to `min_lr` at `decay_steps`, then flat.

    Megatron's `--lr-warmup-samples`/`--lr-decay-samples` divided by the global batch give these step counts.
    """

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    decay_steps: int | None = Field(default=None, gt=0)  # default: train.steps
    min_lr: float = Field(default=0.0, ge=0)  # floor for `optim.lr`; `part_lr` floors scale by the same ratio


class LoopConfig(_Base):
    """The training loop."""

    steps: int = Field(gt=0)  # optimizer steps
    # Samples per optimizer step over all data-parallel ranks (packed: rows). Micro-batches of
    # `data.batch_size` accumulate to it: accumulation = global_batch_size / (batch_size * dp).
    global_batch_size: int = Field(default=1, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: stitch.device.compute_dtype decides
    device: str = "auto"  # auto: cuda if available, else cpu
    # Recompute transformer layers in backward: true (every ViT and LLM layer), "vision" or "llm" (that part's
    # layers only: the ViT's activations of many tiles can cost more memory than its cheap recompute) or false.
    activation_checkpointing: Literal[False, True, "vision", "llm"] = False
    # torch.compile each ViT and LLM block on its own (torchtitan's per-block compile): fuses the norms, RoPE,
    # SwiGLU and casts around the matmuls; small graphs compile in seconds and are reused by every layer.
    compile: bool = False
    seed: int = 0
    max_bad_steps: int = Field(default=5, ge=1)  # non-finite loss/grad steps in a row before stopping
    # Stop after this much wall time in the loop (then save and finish as at `steps`): a budget that holds when
    # the machine slows down mid-run. The LR schedule still follows `steps`. None: no limit.
    max_minutes: float | None = Field(default=None, gt=0)
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-reproducible GPU runs, slower)


class CheckpointConfig(_Base):
    every: int = Field(default=1000, ge=0)  # save every N steps (0: only at the end)
    keep_last: int = Field(default=2, ge=1)  # step folders kept (older ones are deleted after a save)
    at_end: bool = True  # also save a step checkpoint when the run ends (off for throughput runs)
    save_final: bool = True  # write OUT/final (weights + tokenizer, no train_state) at the end
    resume: bool = True  # resume from OUT/checkpoints/latest when it exists
    # Test aid: sleep this long after each save so a test can kill the run at a known point.
    pause_after_save_s: float = Field(default=0.0, ge=0)


class LogConfig(_Base):
    every: int = Field(default=1, ge=1)  # metrics line / progress refresh every N steps
    progress: bool = True  # rich progress bar (plain lines when stdout is not a terminal)
    tensorboard: bool = False  # OUT/tensorboard (needs the `tensorboard` package)
    plot: bool = True  # OUT/loss.png at the end
    peak_tflops: float | None = Field(default=None, gt=0)  # per device, for MFU; default: from the device name


class BenchmarkSpec(_Base):
    """A benchmark scored at every checkpoint: `stitch eval` on the saved checkpoint (see docs/eval.md)."""

    task: str = Field(min_length=1)  # a `stitch eval --task` name
    data: str | None = None  # its local folder (easy-vqa needs none)
    limit: int | None = Field(default=None, gt=0)  # the first N samples, for a quick signal
    batch_size: int = Field(default=8, gt=0)
    max_new_tokens: int | None = Field(default=None, gt=0)  # default: the task's


class EvalConfig(_Base):
    """Periodic validation loss. Data: `data` if given, else the training blend's `val` split. `tasks`:
    benchmarks scored at each checkpoint (metrics.jsonl and TensorBoard as `bench/TASK`)."""

    every: int = Field(default=0, ge=0)  # 0: off
    batches: int = Field(default=8, gt=0)  # micro-batches per evaluation (the same ones every time)
    data: DataConfig | None = None
    tasks: list[BenchmarkSpec] = Field(default_factory=list)


class ParallelConfig(_Base):
    """Layout of the run; `stitch.parallel` reads these (its `Layout.from_config`). The single-process trainer
    needs tp = pp = 1 and dp = 1 (or -1)."""

    dp: int = Field(default=1, ge=-1)  # data-parallel degree; -1: whatever world size / (tp x pp) leaves
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    fsdp: bool = True  # shard parameters/grads/optimizer state over dp (FSDP2); False: replicate (DDP-like)
    dp_replicate: int | None = Field(default=None, ge=1)  # HSDP: replicate groups over the dp shards
    vision_tp: int | None = Field(default=None, ge=1)  # the ViT's own TP degree (default: tp)
    vision_padded_heads: int | None = Field(default=None, ge=1)  # pad ViT heads to this (25 -> 32 at TP 8)
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int | None = Field(default=None, gt=0)  # default: the accumulation count
    pp_layers_per_stage: list[int] | None = None  # uneven split of LLM layers (the ViT sits on stage 0)
    pp_stages_per_rank: int | None = Field(default=None, ge=1)  # virtual stages (interleaved schedules)

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.dp == 0:
            raise ValueError("dp must be >= 1, or -1 for 'the rest of the world size'")
        return self

    @property
    def world_size(self) -> int:
        """Processes the layout needs (dp = -1 counts as 1: the launcher decides)."""
        return max(self.dp, 1) * self.tp * self.pp


class SyntheticConfig(_Base):
    """Generated samples (random tokens and pixels, a loss on the answer part) instead of `data`.

    For throughput runs and tests where no dataset is on disk. Each sample is a pure function of (seed, index),
    so the data position is one integer and resume is exact.
    """

    enabled: bool = False
    num_samples: int | None = Field(default=None, gt=0)  # cycle over this many distinct samples; None: endless
    min_tokens: int = Field(default=64, gt=1)  # sample length, image tokens included
    max_tokens: int = Field(default=256, gt=1)
    images: int = Field(default=1, ge=0)  # images per sample
    tiles: int = Field(default=1, gt=0)  # tiles per image
    answer_fraction: float = Field(default=0.25, gt=0, le=1)  # share of the text that carries labels
    vocab_limit: int | None = Field(default=None, gt=10)  # draw text ids below this (default: the vocabulary)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        return self


class PreferenceConfig(_Base):
    """The `dpo` and `mpo` stages (`stitch.train.preference`, docs/preference.md): loss terms, beta, reference.

    `loss_type` defaults to ["sigmoid"] for dpo and InternVL's MPO ["sigmoid", "bco_pair", "sft"] with weights
    [0.8, 0.2, 1.0] for mpo; `loss_weights` default to 1 each (TRL's `loss_type` / `loss_weights`)."""

    loss_type: list[Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sft"]] | None = None
    loss_weights: list[float] | None = None
    beta: float = Field(default=0.1, gt=0)
    # Conservative DPO (sigmoid) / robust DPO: the probability that a pair's label is flipped.
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    # auto: the policy with adapters off under LoRA when only adapters train, else a frozen copy.
    # precomputed: one no-grad pass of the starting model before training, stored in `reference_logps`.
    reference: Literal["auto", "adapters", "copy", "precomputed"] = "auto"
    reference_dtype: Literal["fp32", "bf16"] = "fp32"  # the frozen copy's weights (bf16: half the memory)
    reference_logps: str | None = None  # the precomputed file; default OUT/reference_logps.jsonl

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_name(cls, value):
        return [value] if isinstance(value, str) else value  # TRL takes one name or a list

    @model_validator(mode="after")
    def _check(self) -> PreferenceConfig:
        if self.loss_type is not None and not self.loss_type:
            raise ValueError("loss_type must name at least one loss")
        if self.loss_type is not None and len(set(self.loss_type)) != len(self.loss_type):
            raise ValueError(f"loss_type lists a loss twice: {self.loss_type}")
        return self

    def default_types(self, stage: str) -> list[str]:
        """The loss types of `stage` when `loss_type` is not set."""
        return ["sigmoid", "bco_pair", "sft"] if stage == "mpo" else ["sigmoid"]


class TrainConfig(_Base):
    """A whole training run (see the module docstring)."""

    output_dir: str
    stage: Literal["pretrain", "sft", "dpo", "mpo"]
    model: ModelSource
    data: DataConfig = Field(default_factory=DataConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    unfreeze: UnfreezeConfig = Field(default_factory=UnfreezeConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: LoopConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)  # dpo / mpo stages only
    # Free text shown in the run's header and stored with it.
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.synthetic.enabled and self.data.blend is None and not self.data.datasets:
            raise ValueError("no training data: set data.blend or data.datasets (or synthetic.enabled: true)")
        if self.is_preference:
            if self.synthetic.enabled:
                raise ValueError(f"stage {self.stage} trains on preference pairs (data.datasets), not synthetic data")
            pref = self.preference
            n = len(pref.loss_type or pref.default_types(self.stage))
            if pref.loss_weights is not None and len(pref.loss_weights) != n:
                raise ValueError(f"preference.loss_weights has {len(pref.loss_weights)} values for {n} loss types "
                                 f"({', '.join(pref.loss_type or pref.default_types(self.stage))})")
            if pref.reference == "precomputed" and self.model.random_init:
                raise ValueError("preference.reference: precomputed stores the log-probs of model.checkpoint; "
                                 "a random_init model has none on disk")
            if self.eval.every and self.eval.data is None and self.data.blend is None:
                raise ValueError(f"stage {self.stage}: eval.every needs held-out preference pairs: eval.data "
                                 "(eval.data.datasets), or a data.blend with a val split")
        micro = self.data.batch_size * max(self.parallel.dp, 1)
        if self.train.global_batch_size % micro:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"data.batch_size x parallel.dp ({self.data.batch_size} x {self.parallel.dp})"
            )
        if self.schedule.decay_steps is not None and self.schedule.decay_steps < self.schedule.warmup_steps:
            raise ValueError("schedule.decay_steps must be >= schedule.warmup_steps")
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"schedule.min_lr ({self.schedule.min_lr}) > optim.lr ({self.optim.lr})")
        if self.lora.enabled:
            # LoRA freezes its parts' base weights: an unfreeze option for the same part would do nothing.
            if "llm" in self.lora.parts and (self.unfreeze.llm or self.unfreeze.llm_last_layers):
                raise ValueError("lora.parts includes llm, whose base weights LoRA freezes: drop unfreeze.llm/"
                                 "unfreeze.llm_last_layers (list fully trained modules in lora.trainable)")
            if "vision" in self.lora.parts and (self.unfreeze.vision or self.unfreeze.vision_last_layers):
                raise ValueError("lora.parts includes vision, whose base weights LoRA freezes: drop unfreeze.vision/"
                                 "unfreeze.vision_last_layers (list fully trained modules in lora.trainable)")
            if self.parallel.tp > 1 or (self.parallel.vision_tp or 1) > 1:
                # The TP plans shard whole nn.Linear layers; an adapter needs A replicated and B split with W.
                raise ValueError("lora with tensor parallelism (parallel.tp / parallel.vision_tp > 1) is not "
                                 "supported yet; use data parallelism (FSDP2) and/or pipeline parallelism")
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (for the configured dp)."""
        return self.accumulation_for(max(self.parallel.dp, 1))

    def accumulation_for(self, dp: int) -> int:
        """Micro-batches per step on each rank when `dp` ranks share the global batch (dp = -1 resolved)."""
        micro = self.data.batch_size * dp
        if self.train.global_batch_size % micro:
            raise StitchConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) is not a multiple of "
                f"data.batch_size x dp ({self.data.batch_size} x {dp})"
            )
        return self.train.global_batch_size // micro

    @property
    def is_preference(self) -> bool:
        """A preference stage (dpo, mpo): pairs, a reference model, `stitch.train.preference`'s step."""
        return self.stage in ("dpo", "mpo")

    @property
    def decay_steps(self) -> int:
        return self.schedule.decay_steps or self.train.steps

    def trains(self, part: str) -> bool:
        """Whether `part` (vision/projector/llm) has trainable parameters in this run."""
        if part == "projector":
            return True
        if part == "llm":
            return self.unfreeze.llm if self.unfreeze.llm is not None else self.stage != "pretrain"
        return self.unfreeze.vision or self.unfreeze.vision_last_layers > 0

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------------- loading
# The YAML reader (`base:` inheritance, provenance, key=value overrides) is `stitch.config`'s, shared with
# `stitch data check`; these bind it to TrainConfig.
def parse_overrides(pairs: list[str]) -> dict:
    """`["optim.lr=2e-5", "model.random_init=true"]` -> a nested dict. Values are YAML (typed), except for
    string fields, which keep the text as written (so `output_dir=2024` stays a path)."""
    return parse_config_overrides(pairs, TrainConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None, data: dict | None = None) -> TrainConfig:
    """Read a recipe (with its bases), apply `key=value` overrides, and validate.

    `data` (a dict) may stand in for the file, for programmatic use and tests. Errors name the file that set
    the offending field (or "command line") and its dotted path.
    """
    return load_yaml_config(TrainConfig, path, overrides, data)
