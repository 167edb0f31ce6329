"""Preference losses (DPO sigmoid / IPO / hinge / robust, BCO pair, SFT; MPO as their weighted sum), the
reference model, and `PairObjective`: the preference loss as an objective of the one training step
(`stitch.train.step.train_step`), so dpo/mpo run in one process and under every `stitch.parallel` layout
(FSDP2, TP, PP) through the same code as SFT; and `evaluate_pairs`, the validation on held-out pairs.

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
weights); otherwise a frozen copy made at the start (in bf16 if asked: half the memory), sharded under a layout as
the policy is. Reference forwards run in eval mode (no dropout), under no_grad, before the step's policy forwards.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stitch.data.preference import PreferenceStream
from stitch.errors import StitchConfigError
from stitch.models.llm import answer_logps
from stitch.models.lora import adapters_disabled, has_lora
from stitch.models.vlm import VLM
from stitch.parallel.runtime import ParallelModel
from stitch.train.config import PreferenceConfig, TrainConfig
from stitch.train.model_setup import build_training_model
from stitch.train.reference_logps import header as ref_header
from stitch.train.reference_logps import lookup, precompute_reference_logps, read_reference_logps
from stitch.train.step import _to_device

__all__ = ["sequence_logps", "row_logps", "preference_loss", "PairLogps", "Reference", "build_reference",
           "PairObjective", "evaluate_pairs", "loss_terms"]

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
def row_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A `VLM.forward` `loss_fn`: per-row sums of the answer tokens' log-probs and their counts ([N], [N]).

    Why not `model(...).logits`: the full [N, T, V] logits (and their log-softmax and its gradient) cost more
    than the rest of a small model's step; `stitch.models.llm.answer_logps` runs the LM head only at the
    positions that predict an answer token, and works with a vocabulary-parallel head too."""
    return answer_logps(hidden, lm_head, labels)


def sequence_logps(model: VLM | ParallelModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [N], counts [N]) of the answer tokens' log-probs of a batch's rows, labels unshifted (-100 = no
    loss) as the model takes them; fp32. Under a layout (collective) on every rank."""
    if isinstance(model, ParallelModel):
        counts = (inputs["labels"][:, 1:] != -100).sum(1)
        sums = model.from_last_stage(model.forward_output(inputs, row_logps), counts)
        return sums, counts
    out = model(**inputs, loss_fn=row_logps, return_logits=False)
    return out.loss, out.num_label_tokens


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
    def logps(self, policy: nn.Module | ParallelModel, batch: dict, device: torch.device) -> torch.Tensor | None:
        """Summed answer log-probs of the micro-batch's rows [chosen..., rejected...] ([2B]). Under a layout
        (collective) they exist on the last pipeline stage only (None elsewhere), where the loss needs them."""
        if self.kind == "precomputed":
            return torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(device)
        target = policy if self.kind == "adapters" else self.model
        parallel = isinstance(target, ParallelModel)
        module = target.model if parallel else target
        was_training = module.training
        target.eval()
        try:
            ctx = adapters_disabled(module) if self.kind == "adapters" else contextlib.nullcontext()
            with ctx, self._autocast():
                if parallel:
                    return target.forward_output(batch, row_logps)
                return sequence_logps(target, _to_device(batch, device))[0]
        finally:
            target.train(was_training)

    def parallelize(self, parallelize: Callable[[nn.Module], ParallelModel], policy: ParallelModel) -> None:
        """Under a layout: shard a frozen copy as the policy is sharded (it then joins every reference forward
        collectively); a precomputed reference's pass runs through the parallelised policy before its first
        step (the policy is then still the starting model)."""
        if self.kind == "copy":
            self.model = parallelize(self.model)
        elif self.kind == "precomputed":
            self.model = policy


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
                      resumed: bool = False, device: torch.device | None = None, val: bool = False
                      ) -> PreferenceStream:
    """This rank's stream of pair micro-batches (`stitch.data.preference.PreferenceStream`) of `data`, or with
    `val` of the held-out pairs: `eval.data`, else the `val` split of the training blend (as SFT's
    validation). With a precomputed reference, the pass over the data runs here first (or continues; a resumed
    run needs it complete, since its model has trained) and the stream attaches each pair's stored log-probs;
    the held-out pairs get their own file (`reference_logps` with `.val` before the suffix), so the trainer
    builds that stream before the first step."""
    if processor is None:
        raise StitchConfigError(f"stage {cfg.stage}: preference data needs a tokenizer (the checkpoint has none; "
                                "set model.tokenizer)")
    data = cfg.data
    if val:
        data = cfg.eval.data if cfg.eval.data is not None else cfg.data.model_copy(update={"split": "val"})
    stream = PreferenceStream(data, processor, rank=dist.dp_rank, world_size=dist.dp_size, seed=cfg.train.seed)
    if reference is not None and reference.kind == "precomputed":
        path = Path(cfg.preference.reference_logps or Path(cfg.output_dir) / "reference_logps.jsonl")
        if val:
            path = path.with_name(f"{path.stem}.val{path.suffix}")
        if resumed:
            done = read_reference_logps(path, ref_header(stream, cfg.model.checkpoint)) if path.exists() else []
            if len(done) < len(stream.index):
                raise StitchConfigError(f"{path}: {len(done)} of {len(stream.index)} reference log-probs, but this "
                                        "run resumes a trained model, which is no longer the reference")
            table = {r["i"]: r for r in done}
        else:
            collective = dist.collective and torch.distributed.is_initialized()
            table = precompute_reference_logps(
                path, reference.model, stream, cfg.model.checkpoint, device or torch.device("cpu"),
                reference._autocast, sequence_logps, writer=dist.is_main,
                barrier=torch.distributed.barrier if collective else None, shard=(dist.dp_rank, dist.dp_size),
                gather=_all_gather if collective else None)
        stream.reference_logps = lookup(table, path)
    return stream


def _all_gather(local: dict) -> list[dict]:
    """Every rank's `local` (the precomputed pass's share of a round), on every rank."""
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, local)
    return out


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


# ------------------------------------------------------------------------------------------- the objective
class PairObjective:
    """The preference loss as `stitch.train.step.train_step`'s objective, so a dpo/mpo step is the SFT step
    (one process or any `stitch.parallel` layout) with another loss.

    Per step: the global pair and chosen-token counts (summed over data ranks), the reference log-probs of
    every micro-batch, then one `loss_fn` per micro-batch for the policy forward (`VLM.forward`), which runs on
    the rank that holds the output layer and returns its share of the global loss. Metrics (TRL's names):
    rewards/chosen, rewards/rejected (β × log-ratio, means over pairs), rewards/margins, rewards/accuracies
    (chosen reward > rejected), logps/chosen, logps/rejected, kl (mean per-token log-ratio to the reference
    over all answer tokens: an estimate of KL(π‖π_ref) on the pairs' tokens) and each loss term."""

    STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
             "kl_sum", "kl_tokens")

    def __init__(self, reference: Reference, cfg: PreferenceConfig, terms: Sequence[tuple[str, float]] | None = None):
        self.reference = reference
        self.terms = list(terms if terms is not None else reference.terms)
        self.beta, self.label_smoothing = cfg.beta, cfg.label_smoothing
        self.names = [*self.STATS, *[f"loss/{t}" for t, _ in self.terms]]
        self._acc: torch.Tensor | None = None

    def loss_fns(self, model: nn.Module | ParallelModel, micro_batches: Sequence[dict], device: torch.device,
                 reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[Callable]:
        """One `loss_fn(hidden, labels, lm_head)` per micro-batch; `reduce` sums a tensor over data ranks."""
        counts = torch.tensor([[float(mb["num_pairs"]),
                                float((mb["labels"][: mb["num_pairs"], 1:] != -100).sum())] for mb in micro_batches],
                              device=device).sum(0)
        counts = reduce(counts)
        n_pairs, n_tokens = counts[0], counts[1].clamp(min=1)
        self._acc = torch.zeros(len(self.names), device=device)
        refs = [self.reference.logps(model, mb, device) for mb in micro_batches]
        return [functools.partial(self._loss, int(mb["num_pairs"]), ref, n_pairs, n_tokens)
                for mb, ref in zip(micro_batches, refs)]

    def _loss(self, b: int, ref: torch.Tensor, n_pairs: torch.Tensor, n_tokens: torch.Tensor,
              hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = row_logps(hidden, labels, lm_head)  # rows [chosen..., rejected..., (pipeline padding)]
        sums, counts = sums[: 2 * b], counts[: 2 * b]
        policy = PairLogps.from_rows(sums, counts)
        ref_c, ref_r = ref.to(sums.device).chunk(2)
        loss, parts = preference_loss(policy, ref_c, ref_r, self.terms, self.beta, self.label_smoothing, n_pairs,
                                      n_tokens)
        with torch.no_grad():
            rc, rr = self.beta * (policy.chosen - ref_c), self.beta * (policy.rejected - ref_r)
            stats = [rc.sum() / n_pairs, rr.sum() / n_pairs, (rc > rr).float().sum() / n_pairs,
                     policy.chosen.sum() / n_pairs, policy.rejected.sum() / n_pairs,
                     (sums - ref.to(sums.device)).sum(),  # = the per-token log-ratios summed
                     counts.sum().float(), *[parts[t] for t, _ in self.terms]]
            self._acc += torch.stack([v.detach().float().reshape(()) for v in stats])
        return loss, counts.sum()

    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The step's metrics, summed over data ranks (and pipeline stages) by `reduce`."""
        values = dict(zip(self.names, reduce(self._acc.clone()).tolist()))
        kl_sum, kl_tokens = values.pop("kl_sum"), values.pop("kl_tokens")
        values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        values["kl"] = kl_sum / max(kl_tokens, 1.0)
        return values


@torch.no_grad()
def evaluate_pairs(model: nn.Module | ParallelModel, objective: PairObjective, batches: Iterable[dict],
                   device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The preference loss and metrics of held-out pairs (no gradients; collective under a layout): `loss`, each
    `loss/<term>`, `rewards/*`, `logps/*` and `kl` as a training step logs them, over all of `batches` on every
    data rank at once (pair terms are means over all the pairs, the SFT term over all chosen tokens). Call with
    the model in eval mode."""
    parallel = isinstance(model, ParallelModel)
    reduce = model.all_reduce_metrics if parallel else (lambda t: t)
    beta, terms = objective.beta, objective.terms
    names = ["pairs", "chosen_tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "kl_sum", "kl_tokens", *[f"loss/{t}" for t, _ in terms]]
    acc = torch.zeros(len(names), dtype=torch.float64, device=device)
    autocast = _autocast_factory(device, autocast_dtype)
    for batch in batches:
        ref = objective.reference.logps(model, batch, device)
        with autocast():
            if parallel:
                sums, counts = model.forward_output(batch, row_logps), None
                if sums is not None:  # the last pipeline stage
                    counts = (batch["labels"][:, 1:] != -100).sum(1).to(device)
            else:
                sums, counts = sequence_logps(model, _to_device(batch, device))
        if sums is None:
            continue
        b = int(batch["num_pairs"])
        sums, counts, ref = sums[: 2 * b].float(), counts[: 2 * b], ref.to(sums.device)
        policy = PairLogps.from_rows(sums, counts)
        ref_c, ref_r = ref.chunk(2)
        _, parts = preference_loss(policy, ref_c, ref_r, terms, beta, objective.label_smoothing, 1.0, 1.0)  # sums
        rc, rr = beta * (policy.chosen - ref_c), beta * (policy.rejected - ref_r)
        acc += torch.stack([torch.tensor(float(b), device=sums.device), policy.chosen_tokens.sum().float(),
                            rc.sum(), rr.sum(), (rc > rr).float().sum(), policy.chosen.sum(), policy.rejected.sum(),
                            (sums - ref).sum(), counts.sum().float(), *[parts[t] for t, _ in terms]]).double()
    values = dict(zip(names, reduce(acc).tolist()))
    n_pairs, n_tokens = max(values.pop("pairs"), 1.0), max(values.pop("chosen_tokens"), 1.0)
    out = {k: v / n_pairs for k, v in values.items() if k.startswith(("rewards/", "logps/"))}
    for t, _ in terms:
        out[f"loss/{t}"] = values[f"loss/{t}"] / (n_tokens if t == "sft" else n_pairs)
    out["loss"] = sum(w * out[f"loss/{t}"] for t, w in terms)
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    out["kl"] = values["kl_sum"] / max(values["kl_tokens"], 1.0)
    return out
