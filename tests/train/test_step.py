"""The train step's numerics (token-weighted accumulation) and what each stage trains."""

from __future__ import annotations

import pytest
import torch

from stitch.checkpoint.store import load_model, model_state
from stitch.data.collate import collate
from stitch.train.config import SyntheticConfig, load_config
from stitch.train.synthetic import SyntheticStream
from stitch.train.trainer import Trainer, train_step
from tests.train.helpers import tiny_config


class _CaptureGrads(torch.optim.Optimizer):
    """An 'optimizer' that records the gradients it is asked to apply."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.grads: dict[int, torch.Tensor] = {}

    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.grads[id(p)] = p.grad.detach().clone()


def _synthetic_samples(ckpt, model, n: int) -> list:
    """`n` synthetic samples of unequal lengths (8-40 tokens, 60% with labels) for `model`."""
    data = load_config(None, data=tiny_config(ckpt, "/tmp/unused")).data
    syn = SyntheticConfig(enabled=True, min_tokens=8, max_tokens=40, answer_fraction=0.6, vocab_limit=250)
    stream = SyntheticStream(syn, data, model.config)
    return [stream.sample(i) for i in range(n)]


def test_accumulation_over_unequal_micro_batches_equals_one_big_batch(small_ckpt):
    model = load_model(small_ckpt).train()
    for p in model.vision.parameters():
        p.requires_grad_(False)
    samples = _synthetic_samples(small_ckpt, model, 8)
    lengths = [len(s) for s in samples]
    assert len(set(lengths)) > 3  # unequal lengths, so batch-averaging would differ from token-weighting
    # 4 micro-batches of 2 samples each, of different widths and label counts.
    micro = [collate(samples[i : i + 2]) for i in range(0, 8, 2)]
    big = collate(samples)
    params = [p for p in model.parameters() if p.requires_grad]

    opt = _CaptureGrads(params)
    res = train_step(model, opt, micro, device=torch.device("cpu"), max_grad_norm=None)
    out = model(**{k: big[k] for k in ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values")},
                return_logits=False)
    out.loss.backward()
    assert res.label_tokens == int(out.num_label_tokens)
    assert abs(res.loss - out.loss.item()) < 1e-6
    worst = max((opt.grads[id(p)] - p.grad).abs().max().item() for p in params)
    assert worst < 1e-6, worst
    # And it is not the batch-averaged mean of micro-batch losses (which would weight short batches up).
    per_micro = [model(**{k: m[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")},
                       return_logits=False).loss.item() for m in micro]
    assert abs(sum(per_micro) / 4 - out.loss.item()) > 1e-4


def _weights(path_or_model) -> dict[str, torch.Tensor]:
    model = load_model(path_or_model) if not isinstance(path_or_model, torch.nn.Module) else path_or_model
    return {k: v.clone() for k, v in model_state(model).items()}


@pytest.mark.parametrize(
    "stage, unfreeze, changes",
    [
        ("pretrain", {}, {"projector"}),
        ("sft", {}, {"projector", "llm"}),
        ("pretrain", {"vision_last_layers": 1}, {"projector", "vision.layers.1"}),
        ("sft", {"llm_last_layers": 1}, {"projector", "llm.layers.1", "llm.norm"}),
    ],
)
def test_stage_freezing(small_ckpt, tmp_path, stage, unfreeze, changes):
    before = _weights(small_ckpt)
    cfg = load_config(None, data=tiny_config(small_ckpt, tmp_path / "run", stage=stage, unfreeze=unfreeze,
                                             train={"steps": 3}))
    trainer = Trainer(cfg, console_print=lambda *_: None)
    trainer.fit()
    after = _weights(tmp_path / "run" / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for name in before:
        trains = any(name.split(".", 1)[0] == c or name.startswith(c + ".") for c in changes)
        if not trains:
            assert name not in changed, f"{stage}: {name} changed but should be frozen"
    for c in changes:
        assert any(k == c or k.startswith(c + ".") for k in changed), f"{stage}: nothing in {c} changed"
    counts = trainer.counts
    assert counts["projector"].frozen == 0
    assert (counts["llm"].trainable > 0) == (stage == "sft")
    assert (counts["vision"].trainable > 0) == bool(unfreeze.get("vision_last_layers"))


def test_attention_mask_dropped_only_where_it_changes_no_label():
    """Right padding and packed rows go to the fused causal/varlen kernels; left padding keeps its mask."""
    from stitch.train.trainer import _to_device, mask_is_redundant

    ids = torch.ones(2, 5, dtype=torch.long)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    left = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])}
    holes = {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    packed = {"input_ids": ids[:1], "attention_mask": torch.ones(1, 5, dtype=torch.long),
              "cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32), "max_seqlen": 3}
    assert mask_is_redundant(right) and mask_is_redundant(packed)
    assert not mask_is_redundant(left) and not mask_is_redundant(holes)
    moved = _to_device(packed, torch.device("cpu"))  # CPU keeps masks (faster there); non-tensors pass through
    assert "attention_mask" in moved and moved["max_seqlen"] == 3


def test_per_block_compile_gives_the_eager_step(small_ckpt):
    """`train.compile` (each ViT/LLM block through torch.compile, with checkpointing) changes no numbers."""
    import copy

    from stitch.train.trainer import configure_layers

    eager = load_model(small_ckpt).train()
    compiled = copy.deepcopy(eager)
    configure_layers(compiled, activation_checkpointing=True, compile_layers=True)
    micro = [collate(_synthetic_samples(small_ckpt, eager, 2))]
    results = []
    for model in (eager, compiled):
        opt = _CaptureGrads([p for p in model.parameters() if p.requires_grad])
        results.append((train_step(model, opt, micro, device=torch.device("cpu"), max_grad_norm=None), opt))
    (want, opt_eager), (got, opt_compiled) = results
    assert abs(want.loss - got.loss) < 1e-5
    grads_eager, grads_compiled = list(opt_eager.grads.values()), list(opt_compiled.grads.values())
    assert len(grads_eager) == len(grads_compiled)
    assert max((a - b).abs().max().item() for a, b in zip(grads_eager, grads_compiled)) < 1e-4


def test_per_part_checkpointing_and_dynamic_compile_give_the_eager_step(small_ckpt):
    """Checkpointing one part ("vision" / "llm") and blocks compiled for dynamic sizes (packed rows of changing
    length and tile count, as `data.pack` runs them) change no numbers, step after step."""
    import copy

    from stitch.train.trainer import configure_layers

    eager = load_model(small_ckpt).train()
    vision_only, llm_only = copy.deepcopy(eager), copy.deepcopy(eager)
    configure_layers(vision_only, "vision", compile_layers=True, dynamic_shapes=True)
    configure_layers(llm_only, "llm")
    assert vision_only.vision.gradient_checkpointing and not vision_only.llm.gradient_checkpointing
    assert llm_only.llm.gradient_checkpointing and not llm_only.vision.gradient_checkpointing
    flags = [m.any_shape_kernels for m in vision_only.modules() if hasattr(m, "any_shape_kernels")]
    assert len(flags) == len(eager.vision.layers) + len(eager.llm.layers) and all(flags)  # shapes vary: no plans
    assert not any(m.any_shape_kernels for m in llm_only.modules() if hasattr(m, "any_shape_kernels"))
    samples = _synthetic_samples(small_ckpt, eager, 5)
    steps = [[collate(samples[:2], pack=True)], [collate(samples[2:], pack=True)]]  # two row lengths
    assert steps[0][0]["input_ids"].shape[1] != steps[1][0]["input_ids"].shape[1]
    for micro in steps:
        results = []
        for model in (eager, vision_only, llm_only):
            opt = _CaptureGrads([p for p in model.parameters() if p.requires_grad])
            results.append((train_step(model, opt, micro, device=torch.device("cpu"), max_grad_norm=None), opt))
        want, opt_eager = results[0]
        for got, opt in results[1:]:
            assert abs(want.loss - got.loss) < 1e-5
            diffs = [(a - b).abs().max().item() for a, b in zip(opt_eager.grads.values(), opt.grads.values())]
            assert len(diffs) == len(opt_eager.grads) and max(diffs) < 1e-4


def test_activation_checkpointing_accepts_a_part_and_refuses_others(small_ckpt):
    cfg = tiny_config(small_ckpt, "/tmp/unused")
    set_part = ["train.activation_checkpointing=vision"]
    assert load_config(None, set_part, data=cfg).train.activation_checkpointing == "vision"
    with pytest.raises(Exception, match="activation_checkpointing"):
        load_config(None, ["train.activation_checkpointing=encoder"], data=cfg)


@pytest.mark.parametrize(("sections", "vary"), [
    ({"synthetic": {"min_tokens": 20, "max_tokens": 20}}, False),  # one length, fixed tiles: shapes repeat
    ({}, True),  # synthetic lengths 12-28
    ({"synthetic": {"min_tokens": 20, "max_tokens": 20}, "data": {"pack": True}}, True),  # rows of changing length
])
def test_attention_kernels_follow_whether_batch_shapes_vary(small_ckpt, tmp_path, sections, vary):
    """Runs whose batch shapes change keep attention to kernels without per-shape plans; fixed shapes keep
    SDPA's own (fastest) choice. Checked on the model `Trainer.setup` builds."""
    from stitch.train.trainer import batch_shapes_vary

    cfg = load_config(None, [], data=tiny_config(small_ckpt, tmp_path / "run", **sections))
    assert batch_shapes_vary(cfg) is vary
    trainer = Trainer(cfg)
    trainer.setup()
    flags = {m.any_shape_kernels for m in trainer.model.modules() if hasattr(m, "any_shape_kernels")}
    assert flags == {vary}
