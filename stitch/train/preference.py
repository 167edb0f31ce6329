"""Preference losses (DPO sigmoid / IPO / hinge / robust, BCO pair, SFT; MPO as their weighted sum), the
reference model, and one preference optimizer step.

The losses follow TRL 1.16's `DPOTrainer._compute_loss` term by term, so a run here and a TRL run on the HF
export of the same model give the same loss, rewards and gradients (tests/train/test_preference_trl.py):
- log-probs are summed over the answer tokens of each row (`labels != -100`, shifted by one);
- `delta = (logp_c - ref_c) - (logp_r - ref_r)`;
  sigmoid `-(1-ε) logσ(β delta) - ε logσ(-β delta)` (ε = label smoothing, the conservative DPO of Mitchell 2023;
  TRL 1.16 has it as `robust`'s numerator / `aot` on one pair, and as `sigmoid` when ε = 0),
  ipo `(delta_c/n_c - delta_r/n_r - 1/(2β))²` with per-token averaged log-ratios (TRL's normalisation),
  hinge `relu(1 - β delta)`, robust `((1-ε)·sig - ε·sig(-)) / (1-2ε)` (Chowdhury 2024),
  bco_pair `-logσ(β lr_c) - logσ(-β lr_r)`, sft the token mean of `-logp` over the chosen answers;
- the loss is `Σ_k w_k mean_pairs(loss_k)`; MPO (InternVL 2.5) is `[sigmoid, bco_pair, sft]` weighted 0.8/0.2/1.
With gradient accumulation and data parallelism every pair term is divided by the global pair count and the SFT
term by the global chosen-token count, so the summed gradients are those of one batch of all the pairs.

The reference: with LoRA where only adapters train, the policy itself with adapters switched off (one copy of the
weights); otherwise a frozen copy made at the start (in bf16 if asked: half the memory). Reference forwards run
in eval mode (no dropout), under no_grad.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stitch.data.preference import PreferenceStream
from stitch.errors import StitchConfigError
from stitch.models.lora import adapters_disabled, has_lora
from stitch.models.vlm import VLM
from stitch.train.config import PreferenceConfig, TrainConfig
from stitch.train.model_setup import build_training_model
from stitch.train.reference_logps import header as ref_header
from stitch.train.reference_logps import lookup, precompute_reference_logps, read_reference_logps
from stitch.train.step import StepResult, _to_device

__all__ = ["sequence_logps", "preference_loss", "PairLogps", "Reference", "build_reference", "preference_step",
           "PreferenceStepResult", "loss_terms"]

PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair")


def loss_terms(cfg: PreferenceConfig, stage: str) -> list[tuple[str, float]]:
    """(loss type, weight) pairs of the stage: the config's, else DPO's sigmoid or MPO's three terms."""
    types = list(cfg.loss_type) if cfg.loss_type is not None else cfg.default_types(stage)
    if cfg.loss_weights is not None:
        weights = list(cfg.loss_weights)
    else:
        weights = [0.8, 0.2, 1.0] if stage == "mpo" and cfg.loss_type is None else [1.0] * len(types)
    return list(zip(types, weights, strict=True))


# ------------------------------------------------------------------------------------------- log-probs
def sequence_logps(model: VLM, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sums of the answer tokens' log-probs, their counts, and the per-token log-probs (0 where masked).

    Why not `model(...).logits`: the full [N, T, V] logits (and their log-softmax and its gradient) cost more
    than the rest of a small model's step; the LM head runs only at the M positions that predict an answer
    token, as the SFT loss does (`stitch.models.llm.token_loss`). Labels [N, T] are unshifted (-100 = no loss),
    as the model takes them. Returns (sums [N], counts [N], per_token [N, T-1]), all fp32."""
    labels = inputs["labels"]
    embeds = model.embed(inputs["input_ids"], inputs.get("pixel_values"))  # [N, T, H]
    hidden = model.llm(embeds, inputs.get("position_ids"), inputs.get("attention_mask"), inputs.get("cu_seqlens"),
                       None, None, inputs.get("max_seqlen"), False)  # [N, T, H]
    target = labels[:, 1:]  # [N, T-1]: position t predicts token t+1
    mask = target != -100
    logits = model.llm.lm_head(hidden[:, :-1][mask]).float()  # [M, V]
    picked = logits.gather(1, target[mask].unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)  # [M]
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, picked)
    return per_token.sum(1), mask.sum(1), per_token


@dataclass
class PairLogps:
    """Log-probs of one micro-batch of B pairs (rows [chosen..., rejected...])."""

    chosen: torch.Tensor  # [B] summed over the answer
    rejected: torch.Tensor  # [B]
    chosen_tokens: torch.Tensor  # [B] answer tokens
    rejected_tokens: torch.Tensor  # [B]
    chosen_token_sum: torch.Tensor  # [] sum of the chosen answers' per-token log-probs (the SFT term's numerator)

    @classmethod
    def from_rows(cls, sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
        c, r = sums.chunk(2)
        nc, nr = counts.chunk(2)
        return cls(c, r, nc, nr, c.sum())


def preference_loss(policy: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                    terms: Sequence[tuple[str, float]], beta: float, label_smoothing: float = 0.0,
                    pair_denom: torch.Tensor | float | None = None,
                    token_denom: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted preference loss of one micro-batch and its per-term values (see the module docstring).

    `pair_denom`/`token_denom`: the global pair count and chosen-token count (defaults: this batch's), so the
    micro-batch losses of one step add up to the loss of the whole batch."""
    n_pairs = pair_denom if pair_denom is not None else policy.chosen.numel()
    n_tokens = token_denom if token_denom is not None else policy.chosen_tokens.sum().clamp(min=1)
    lr_c = policy.chosen - ref_chosen  # [B] log-ratios to the reference
    lr_r = policy.rejected - ref_rejected
    delta = lr_c - lr_r
    eps = label_smoothing
    total = policy.chosen.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for kind, weight in terms:
        if kind == "sigmoid":
            per_pair = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        elif kind == "ipo":
            avg = lr_c / policy.chosen_tokens.clamp(min=1) - lr_r / policy.rejected_tokens.clamp(min=1)
            per_pair = (avg - 1 / (2 * beta)) ** 2
        elif kind == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif kind == "robust":
            per_pair = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            per_pair = -F.logsigmoid(beta * lr_c) - F.logsigmoid(-beta * lr_r)
        elif kind == "sft":
            term = -policy.chosen_token_sum / n_tokens
            parts[kind] = term
            total = total + weight * term
            continue
        else:
            raise ValueError(f"unknown preference loss type {kind!r}")
        term = per_pair.sum() / n_pairs
        parts[kind] = term
        total = total + weight * term
    return total, parts


# ------------------------------------------------------------------------------------------- the reference
class Reference:
    """Log-probs of the frozen starting policy: `logps(inputs) -> (sums [N], counts [N], per_token [N, T-1])`;
    `terms` are the stage's (loss type, weight) pairs."""

    def __init__(self, model: nn.Module, kind: str, autocast: Callable[[], contextlib.AbstractContextManager],
                 terms: Sequence[tuple[str, float]] = (("sigmoid", 1.0),)):
        self.model, self.kind, self._autocast, self.terms = model, kind, autocast, list(terms)

    @torch.no_grad()
    def logps(self, policy: nn.Module, inputs: dict, batch: dict | None = None) -> torch.Tensor:
        """Summed answer log-probs of the rows [chosen..., rejected...] ([2B])."""
        if self.kind == "precomputed":
            return torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(inputs["input_ids"].device)
        target = policy if self.kind == "adapters" else self.model
        was_training = target.training
        target.eval()
        try:
            ctx = adapters_disabled(target) if self.kind == "adapters" else contextlib.nullcontext()
            with ctx, self._autocast():
                return sequence_logps(target, inputs)[0]
        finally:
            target.train(was_training)


def _autocast_factory(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def start_reference(cfg: TrainConfig, model: VLM, device: torch.device, resume_from: Path | None,
                    autocast_dtype: torch.dtype | None) -> Reference:
    """The reference of a preference run, for the trainer's setup (after the stage and LoRA are applied).

    A fresh run copies `model` as loaded (LoRA's B = 0 adds exactly nothing). A resumed run's model has trained,
    so its frozen copy is loaded again from `model.checkpoint`, the weights the run started from."""
    autocast = _autocast_factory(device, autocast_dtype)
    terms = loss_terms(cfg.preference, cfg.stage)
    source = model
    kind = cfg.preference.reference
    if kind == "precomputed":  # the pass runs when the stream is built (it needs the processor)
        return Reference(model, "precomputed", autocast, terms)
    uses_copy = kind == "copy" or (kind == "auto" and not _only_adapters_train(model))
    if resume_from is not None and uses_copy:
        if cfg.model.random_init:
            raise StitchConfigError(
                f"stage {cfg.stage}: resuming with a frozen reference copy reloads the starting weights from "
                "model.checkpoint, but this run started from random_init: start preference training from a "
                "checkpoint (an SFT one)")
        source, _ = build_training_model(cfg.model.model_copy(update={"random_init": False}), device, None)
        if cfg.model.max_tiles is not None:
            source.config.max_tiles = cfg.model.max_tiles
    return build_reference(source, cfg.preference, device, autocast, terms, trained=model)


def preference_stream(cfg: TrainConfig, processor, dist, reference: Reference | None = None,
                      resumed: bool = False, device: torch.device | None = None) -> PreferenceStream:
    """This rank's stream of pair micro-batches (`stitch.data.preference.PreferenceStream`). With a precomputed
    reference, the pass over the data runs here first (or continues; a resumed run needs it complete, since
    its model has trained) and the stream attaches each pair's stored log-probs."""
    if processor is None:
        raise StitchConfigError(f"stage {cfg.stage}: preference data needs a tokenizer (the checkpoint has none; "
                                "set model.tokenizer)")
    stream = PreferenceStream(cfg.data, processor, rank=dist.dp_rank, world_size=dist.dp_size, seed=cfg.train.seed)
    if reference is not None and reference.kind == "precomputed":
        path = Path(cfg.preference.reference_logps or Path(cfg.output_dir) / "reference_logps.jsonl")
        if resumed:
            done = read_reference_logps(path, ref_header(stream, cfg.model.checkpoint)) if path.exists() else []
            if len(done) < len(stream.index):
                raise StitchConfigError(f"{path}: {len(done)} of {len(stream.index)} reference log-probs, but this "
                                        "run resumes a trained model, which is no longer the reference")
            table = {r["i"]: r for r in done}
        else:
            table = precompute_reference_logps(path, reference.model, stream, cfg.model.checkpoint,
                                               device or torch.device("cpu"), reference._autocast, sequence_logps)
        stream.reference_logps = lookup(table, path)
    return stream


def _only_adapters_train(model: nn.Module) -> bool:
    return has_lora(model) and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def build_reference(model: nn.Module, cfg: PreferenceConfig, device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager],
                    terms: Sequence[tuple[str, float]] = (("sigmoid", 1.0),),
                    trained: nn.Module | None = None) -> Reference:
    """The reference for the policy `trained` (default `model`): the policy with adapters off, or a frozen copy
    of `model` (see the module docstring). `cfg.reference`: auto | adapters | copy."""
    policy = trained if trained is not None else model
    only_adapters = _only_adapters_train(policy)
    kind = cfg.reference
    if kind == "auto":
        kind = "adapters" if only_adapters else "copy"
    if kind == "adapters":
        if not only_adapters:
            full = sorted({n.rsplit(".", 1)[0] for n, p in policy.named_parameters()
                           if p.requires_grad and ".lora_" not in n})[:3]
            raise StitchConfigError(
                "preference.reference: adapters needs LoRA with only adapters training (the base with adapters "
                f"off is then the starting model), but {', '.join(full) or 'no adapters'} train in full: set "
                "unfreeze.projector: false and empty lora.trainable, or preference.reference: copy")
        return Reference(policy, "adapters", autocast, terms)
    ref = copy.deepcopy(model) if model is policy else model
    for p in ref.parameters():
        p.requires_grad_(False)
    ref.to(device).eval()
    if cfg.reference_dtype == "bf16":
        _linear_weights_to_bf16(ref)
        autocast = _autocast_factory(device, torch.bfloat16)
    return Reference(ref, "copy", autocast, terms)


@torch.no_grad()
def _linear_weights_to_bf16(model: nn.Module) -> None:
    """The unshared `nn.Linear` weights in bf16 (nearly all the bytes), run under bf16 autocast: exactly the values
    autocast gives a bf16 policy's matmuls, so such a run starts at delta = 0. Norms, embeddings and a tied LM head
    (it is the embedding) stay fp32, as the policy reads them."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for p in (module.weight, module.bias):
                if p is not None and owners[id(p)] == 1:
                    p.data = p.data.to(torch.bfloat16)


# ------------------------------------------------------------------------------------------- the step
@dataclass
class PreferenceStepResult(StepResult):
    metrics: dict[str, float] = field(default_factory=dict)


def _global(t: torch.Tensor, all_reduce) -> torch.Tensor:
    return all_reduce(t) if all_reduce is not None else t


def preference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict],
    reference: Reference,
    cfg: PreferenceConfig,
    terms: Sequence[tuple[str, float]],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    params: Sequence[torch.Tensor] | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_sync: Callable[[bool], None] | None = None,
) -> PreferenceStepResult:
    """One optimizer step over micro-batches of pairs (`stitch.data.preference.collate_pairs`); the hooks are
    `stitch.train.step.train_step`'s. Metrics (TRL's names): rewards/chosen, rewards/rejected (β × log-ratio,
    means over pairs), rewards/margins, rewards/accuracies (chosen reward > rejected), logps/chosen,
    logps/rejected, kl (mean per-token log-ratio to the reference over all answer tokens: an estimate of
    KL(π‖π_ref) on the pairs' tokens) and each loss term."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    autocast = _autocast_factory(device, autocast_dtype)
    # Global denominators first: pairs, and chosen answer tokens (the SFT term's token mean).
    counts = torch.tensor([[float(mb["num_pairs"]),
                            float((mb["labels"][: mb["num_pairs"], 1:] != -100).sum())] for mb in micro_batches],
                          device=device).sum(0)
    counts = _global(counts, all_reduce)
    n_pairs, n_chosen_tokens = counts[0], counts[1].clamp(min=1)
    beta = cfg.beta
    acc = {k: torch.zeros((), device=device) for k in
           ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
            "kl_sum", "kl_tokens", *[f"loss/{t}" for t, _ in terms])}
    label_tokens = 0
    for i, mb in enumerate(micro_batches):
        inputs = _to_device(mb, device)
        ref_sums = reference.logps(model, inputs, mb)
        ref_c, ref_r = ref_sums.chunk(2)
        if grad_sync is not None:
            grad_sync(i == len(micro_batches) - 1)
        with autocast():
            sums, n_tok, _ = sequence_logps(model, inputs)  # rows [chosen..., rejected...]
        policy = PairLogps.from_rows(sums, n_tok)
        loss, parts = preference_loss(policy, ref_c, ref_r, terms, beta, cfg.label_smoothing, n_pairs,
                                      n_chosen_tokens)
        loss.backward()
        label_tokens += int(n_tok.sum())
        with torch.no_grad():
            rc, rr = beta * (policy.chosen - ref_c), beta * (policy.rejected - ref_r)
            acc["loss"] += loss.detach()
            acc["rewards/chosen"] += rc.sum() / n_pairs
            acc["rewards/rejected"] += rr.sum() / n_pairs
            acc["rewards/accuracies"] += (rc > rr).float().sum() / n_pairs
            acc["logps/chosen"] += policy.chosen.detach().sum() / n_pairs
            acc["logps/rejected"] += policy.rejected.detach().sum() / n_pairs
            acc["kl_sum"] += (sums.detach() - ref_sums).sum()  # = the per-token log-ratios summed
            acc["kl_tokens"] += n_tok.sum()
            for t, v in parts.items():
                acc[f"loss/{t}"] += v.detach()
    names = list(acc)
    stacked = _global(torch.stack([acc[k].float() for k in names]), all_reduce)
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=device.type == "cuda" or None)
    values = dict(zip(names, stacked.tolist()))
    norm = float(grad_norm)
    metrics = {k: v for k, v in values.items() if k not in ("loss", "kl_sum", "kl_tokens")}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["kl"] = values["kl_sum"] / max(values["kl_tokens"], 1.0)
    loss_value = values["loss"]
    total_labels = int(_global(torch.tensor(float(label_tokens), device=device), all_reduce).item())
    skipped = not (math.isfinite(loss_value) and math.isfinite(norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return PreferenceStepResult(loss_value, norm, total_labels, skipped, metrics)
