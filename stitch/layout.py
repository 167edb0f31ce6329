"""The layout of a parallel model, in one place: who holds which tensor, and how it is split.

Both the runtime (`stitch.parallel.parallelize`) and the offline converter (`stitch reshard`) read these rules,
so a checkpoint split on disk and a model split in memory agree by construction:

- pipeline: stage 0 holds the vision encoder, the projector and the token embeddings; the last stage holds the
  final norm and the output layer; LLM decoder layers are split in contiguous, possibly uneven, ranges;
- tensor: column-parallel (split dim 0 = output features) for q/k/v, gate/up, fc1, projector linear_1, the
  vocabulary-parallel embedding and output layer; row-parallel (split dim 1 = input features) for o_proj,
  down_proj, fc2 and projector linear_2; everything else (norms, biases after a row split, layer scales,
  patch/position embeddings) is replicated;
- vision head padding: InternViT-6B has 25 heads, which no usual TP degree divides. Heads are zero-padded at
  the end to `vision_padded_heads` (a multiple of the vision TP degree). A zero head has q = k = 0 and v = 0, so
  its attention output is 0 and the zero o_proj columns add nothing: outputs are unchanged, and its gradients
  are exactly 0, so the padding stays zero through training. The full-width QK-norm divides by the real width.

Nothing here touches torch.distributed; it is plain arithmetic on names and shapes. It sits in the base layer
(it imports only `stitch.config` and `stitch.errors`) so that `stitch.checkpoint.reshard` can read the plan
without importing `stitch.parallel`, which is a layer above checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from stitch.config import VLMConfig
from stitch.errors import CheckpointError, StitchConfigError

__all__ = [
    "Layout",
    "ShardRule",
    "shard_rule",
    "LLM_LAYER_PLAN",
    "VISION_LAYER_PLAN",
    "PROJECTOR_PLAN",
    "projector_is_split",
    "split_layers",
    "stage_of",
    "local_name",
    "global_name",
    "pad_heads",
    "unpad_heads",
    "to_live_shape",
    "from_live_shape",
]

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass(frozen=True)
class ShardRule:
    """How one tensor is split across tensor-parallel ranks.

    dim: the split dimension, or None when every rank holds the whole tensor.
    vision: the tensor belongs to the vision encoder (split by the vision TP degree, not the LLM's).
    heads: the split dimension counts vision attention heads, so it is zero-padded to the padded head count.
    """

    dim: int | None
    vision: bool = False
    heads: bool = False


# The tensor-parallel plan, by module: "colwise" splits a Linear's output features (weight dim 0, and its bias),
# "rowwise" its input features (weight dim 1; the bias is added once after the all-reduce, so it is replicated).
# `stitch.parallel.tensor` applies exactly these styles at run time and `shard_rule` derives the per-tensor split
# dims from them for `stitch reshard` and DCP, so the two cannot drift apart.
LLM_LAYER_PLAN: dict[str, str] = {  # inside each `llm.layers.<i>` (Megatron's split of a decoder block)
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}
VISION_LAYER_PLAN: dict[str, str] = {  # inside each `vision.layers.<i>`, with the vision TP degree
    "attn.q_proj": "colwise",
    "attn.k_proj": "colwise",
    "attn.v_proj": "colwise",
    "attn.o_proj": "rowwise",
    "mlp.fc1": "colwise",
    "mlp.fc2": "rowwise",
}
PROJECTOR_PLAN: dict[str, str] = {"linear_1": "colwise", "linear_2": "rowwise"}  # see `projector_is_split`
# Vision modules whose split dimension counts attention heads (zero-padded to the padded head count); the
# full-width QK-norm weights are split with the heads too (`stitch.parallel.tensor.ShardedQKNorm`).
_VISION_HEAD_MODULES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")
_VISION_HEAD_NORMS = r"vision\.layers\.\d+\.attn\.[qk]_norm\.weight"
# The embedding and output layer are vocabulary-parallel: both split their weight's dim 0 (the vocabulary).
_VOCAB_PARALLEL = r"llm\.(embed_tokens|lm_head)\.weight"


def projector_is_split(cfg: VLMConfig) -> bool:
    """LLaVA's single `linear` projector stays replicated: its only layer would need a gather to feed the LLM;
    the two-layer MLP projector splits colwise-then-rowwise like a transformer MLP."""
    return cfg.projector.kind != "linear"


def _tensor_rules(prefix: str, plan: dict[str, str]) -> list[tuple[str, int, str]]:
    """(tensor-name pattern, split dim, module) for the Linear modules of `plan` under `prefix` (a regex)."""
    rules = []
    for module, style in plan.items():
        path = prefix + re.escape(module)
        if style == "colwise":
            rules.append((path + r"\.(weight|bias)", 0, module))
        else:
            rules.append((path + r"\.weight", 1, module))
    return rules


_LLM_RULES = [(_VOCAB_PARALLEL, 0), *((p, d) for p, d, _ in _tensor_rules(r"llm\.layers\.\d+\.", LLM_LAYER_PLAN))]
_PROJECTOR_RULES = [(p, d) for p, d, _ in _tensor_rules(r"projector\.", PROJECTOR_PLAN)]
_VISION_RULES = [
    *((p, d, m in _VISION_HEAD_MODULES) for p, d, m in _tensor_rules(r"vision\.layers\.\d+\.", VISION_LAYER_PLAN)),
    (_VISION_HEAD_NORMS, 0, True),
]


def shard_rule(name: str, cfg: VLMConfig) -> ShardRule:
    """The TP rule of a tensor, by its global (unsharded, un-renumbered) name."""
    for pattern, dim in _LLM_RULES:
        if re.fullmatch(pattern, name):
            return ShardRule(dim)
    if projector_is_split(cfg):
        for pattern, dim in _PROJECTOR_RULES:
            if re.fullmatch(pattern, name):
                return ShardRule(dim)
    for pattern, dim, heads in _VISION_RULES:
        if re.fullmatch(pattern, name):
            return ShardRule(dim, vision=True, heads=heads)
    return ShardRule(None, vision=name.startswith("vision."))


def split_layers(num_layers: int, num_stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """Contiguous LLM layer ranges, one per (virtual) stage.

    By default the split is as even as possible with the extra layers on the *last* stages, because stage 0
    already carries the vision encoder. A stage may hold 0 layers (e.g. stage 0 with only the ViT).
    """
    if layers_per_stage is None:
        base, extra = divmod(num_layers, num_stages)
        layers_per_stage = [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]
    if len(layers_per_stage) != num_stages:
        raise StitchConfigError(
            f"layers_per_stage has {len(layers_per_stage)} entries but there are {num_stages} pipeline stages"
        )
    if any(n < 0 for n in layers_per_stage):
        raise StitchConfigError(f"layers_per_stage {layers_per_stage}: counts must be >= 0")
    if sum(layers_per_stage) != num_layers:
        raise StitchConfigError(
            f"layers_per_stage {layers_per_stage} sums to {sum(layers_per_stage)}, but the LLM has {num_layers} layers"
        )
    ranges, start = [], 0
    for n in layers_per_stage:
        ranges.append(range(start, start + n))
        start += n
    return ranges


_LAYER = re.compile(r"llm\.layers\.(\d+)\.(.*)")


def stage_of(name: str, ranges: list[range]) -> int:
    """The pipeline stage that holds a global tensor name."""
    if name.startswith(("vision.", "projector.", "llm.embed_tokens.")):
        return 0
    if name.startswith(("llm.norm.", "llm.lm_head.")):
        return len(ranges) - 1
    m = _LAYER.fullmatch(name)
    if m is None:
        raise StitchConfigError(f"tensor '{name}' belongs to no pipeline stage")
    layer = int(m.group(1))
    for s, r in enumerate(ranges):
        if layer in r:
            return s
    raise StitchConfigError(f"tensor '{name}': layer {layer} is outside every stage's range")


def local_name(name: str, ranges: list[range]) -> str:
    """Megatron-style renumbering: decoder layers count from 0 within their stage."""
    m = _LAYER.fullmatch(name)
    if m is None:
        return name
    layer = int(m.group(1))
    return f"llm.layers.{layer - ranges[stage_of(name, ranges)].start}.{m.group(2)}"


def global_name(name: str, stage_range: range) -> str:
    """Inverse of `local_name` for a tensor read from the folder of the stage covering `stage_range`."""
    m = _LAYER.fullmatch(name)
    if m is None:
        return name
    local = int(m.group(1))
    if local >= len(stage_range):
        raise StitchConfigError(f"tensor '{name}': the stage holds only {len(stage_range)} layers")
    return f"llm.layers.{stage_range.start + local}.{m.group(2)}"


def pad_heads(t: torch.Tensor, dim: int, heads: int, padded: int) -> torch.Tensor:
    """Zero-pad `dim` from `heads` to `padded` heads (new heads at the end)."""
    if padded == heads:
        return t
    size = t.shape[dim]
    if size % heads:
        raise StitchConfigError(f"dimension {dim} of size {size} is not a whole number of {heads} heads")
    pad_shape = list(t.shape)
    pad_shape[dim] = size // heads * (padded - heads)
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def unpad_heads(t: torch.Tensor, dim: int, heads: int, padded: int, name: str = "tensor") -> torch.Tensor:
    """Drop the padded heads again; refuses (rather than silently losing data) if they are not zero."""
    if padded == heads:
        return t
    size = t.shape[dim]
    keep = size // padded * heads
    dropped = t.narrow(dim, keep, size - keep)
    if dropped.count_nonzero():
        raise CheckpointError(
            f"{name}: the padded vision heads {heads}..{padded - 1} hold non-zero values; dropping them would lose "
            "data (was the padding trained by something other than Stitch?)"
        )
    return t.narrow(dim, 0, keep).clone()


def to_live_shape(name: str, t: torch.Tensor, cfg: VLMConfig, padded_heads: int) -> torch.Tensor:
    """A canonical (unpadded, full) tensor in the shape a head-padded model holds."""
    rule = shard_rule(name, cfg)
    if rule.heads:
        return pad_heads(t, rule.dim, cfg.vision.num_heads, padded_heads)
    return t


def from_live_shape(name: str, t: torch.Tensor, cfg: VLMConfig, padded_heads: int) -> torch.Tensor:
    """Inverse of `to_live_shape`."""
    rule = shard_rule(name, cfg)
    if rule.heads:
        return unpad_heads(t, rule.dim, cfg.vision.num_heads, padded_heads, name)
    return t


@dataclass
class Layout:
    """A resolved parallel layout: degrees, schedule and the LLM layer split, checked against a model config.

    `dp_replicate` x `dp_shard` = the data-parallel degree; `dp_replicate` > 1 with `dp_shard` > 1 is HSDP
    (shard within a group, replicate across groups); `dp_shard` = 1 is plain replication (DDP-like).
    `stages_per_rank` > 1 only with the interleaved schedule (virtual stages, rank r holds r, r + pp, ...).
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    vision_tp: int = 1
    vision_padded_heads: int | None = None
    pp_schedule: str = "1f1b"
    stages_per_rank: int = 1
    microbatches: int | None = None
    layers_per_stage: list[int] | None = None
    ranges: list[range] = field(default_factory=list)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @classmethod
    def from_config(cls, pcfg: object, model_cfg: VLMConfig, world_size: int | None = None) -> Layout:
        """From the `parallel:` section of a training config (`stitch.train.config.ParallelConfig`).

        Keys read: dp, tp, pp, fsdp, pp_schedule, pp_microbatches, pp_layers_per_stage, and optionally
        dp_replicate (HSDP groups), vision_tp (default: tp), vision_padded_heads, pp_stages_per_rank. `dp` may be
        -1 (or absent) to take whatever the world size leaves.
        """

        def get(key: str, default=None):
            value = getattr(pcfg, key, None) if not isinstance(pcfg, dict) else pcfg.get(key)
            return default if value is None else value

        tp, pp = int(get("tp", 1)), int(get("pp", 1))
        dp = int(get("dp", -1))
        if dp == -1:
            if world_size is None or world_size % (tp * pp):
                raise StitchConfigError(f"world size {world_size} is not a multiple of tp x pp = {tp * pp}")
            dp = world_size // (tp * pp)
        fsdp = bool(get("fsdp", True))  # as the training config: shard over dp unless told to replicate
        dp_replicate = int(get("dp_replicate", 1 if fsdp else dp))
        if dp % dp_replicate:
            raise StitchConfigError(f"parallel.dp_replicate {dp_replicate} does not divide parallel.dp {dp}")
        schedule = str(get("pp_schedule", "1f1b"))
        stages_per_rank = int(get("pp_stages_per_rank", 2 if schedule == "interleaved_1f1b" else 1))
        layout = cls(
            dp_replicate=dp_replicate,
            dp_shard=dp // dp_replicate,
            tp=tp,
            pp=pp,
            vision_tp=int(get("vision_tp", tp)),
            vision_padded_heads=get("vision_padded_heads"),
            pp_schedule=schedule,
            stages_per_rank=stages_per_rank,
            microbatches=get("pp_microbatches"),
            layers_per_stage=get("pp_layers_per_stage"),
        )
        layout.check(model_cfg, world_size)
        return layout

    def padded_heads(self, cfg: VLMConfig) -> int:
        heads = cfg.vision.num_heads
        if self.vision_padded_heads is not None:
            return int(self.vision_padded_heads)
        return -(-heads // self.vision_tp) * self.vision_tp

    def check(self, cfg: VLMConfig, world_size: int | None = None) -> None:
        """Raise a StitchConfigError naming the first impossible part of this layout for `cfg`."""
        for key in ("dp_replicate", "dp_shard", "tp", "pp", "vision_tp", "stages_per_rank"):
            if getattr(self, key) < 1:
                raise StitchConfigError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if world_size is not None and world_size != self.world_size:
            raise StitchConfigError(
                f"the layout needs dp x tp x pp = {self.dp} x {self.tp} x {self.pp} = {self.world_size} processes, "
                f"but {world_size} were launched (torchrun --nproc_per_node x --nnodes)"
            )
        if self.pp_schedule not in PP_SCHEDULES:
            raise StitchConfigError(f"parallel.pp_schedule '{self.pp_schedule}': choose one of {PP_SCHEDULES}")
        if self.stages_per_rank > 1 and self.pp_schedule != "interleaved_1f1b":
            raise StitchConfigError("parallel.pp_stages_per_rank > 1 needs pp_schedule: interleaved_1f1b")
        llm, vis = cfg.llm, cfg.vision
        tp = self.tp
        checks = [
            (llm.num_heads, "llm.num_heads", ""),
            (llm.num_kv_heads, "llm.num_kv_heads", " (key/value heads are split across ranks, not replicated)"),
            (llm.intermediate_size, "llm.intermediate_size", ""),
            (llm.vocab_size, "llm.vocab_size", " (the embedding and output layer are split by vocabulary)"),
        ]
        if cfg.projector.kind != "linear":
            checks.append((cfg.projector.hidden_size or llm.hidden_size, "projector.hidden_size", ""))
        for value, what, why in checks:
            if value % tp:
                raise StitchConfigError(f"tensor parallelism {tp} does not divide {what} = {value}{why}")
        if tp % self.vision_tp:
            raise StitchConfigError(f"parallel.vision_tp {self.vision_tp} must divide parallel.tp {tp}")
        if vis.intermediate_size % self.vision_tp:
            raise StitchConfigError(
                f"vision tensor parallelism {self.vision_tp} does not divide vision.intermediate_size "
                f"{vis.intermediate_size}"
            )
        padded = self.padded_heads(cfg)
        if padded < vis.num_heads or padded % self.vision_tp:
            raise StitchConfigError(
                f"parallel.vision_padded_heads {padded} must be >= vision.num_heads {vis.num_heads} and a multiple of "
                f"vision_tp {self.vision_tp}"
            )
        self.ranges = split_layers(llm.num_layers, self.num_stages, self.layers_per_stage)
        self.layers_per_stage = [len(r) for r in self.ranges]
        if self.pp > 1:
            n_mb = self.microbatches
            if n_mb is not None and self.pp_schedule == "interleaved_1f1b" and n_mb % self.pp:
                raise StitchConfigError(
                    f"interleaved 1F1B needs pp_microbatches ({n_mb}) to be a multiple of pp ({self.pp})"
                )

    def describe(self) -> str:
        parts = [f"dp={self.dp}" + (f" (replicate {self.dp_replicate} x shard {self.dp_shard})"
                                    if self.dp_replicate > 1 and self.dp_shard > 1 else ""),
                 f"tp={self.tp}", f"vision_tp={self.vision_tp}", f"pp={self.pp}"]
        if self.pp > 1:
            parts.append(f"schedule={self.pp_schedule} layers/stage={self.layers_per_stage}")
        return " ".join(parts)
