"""Preference losses against TRL 1.16: the same tiny VLM (exported to HF InternVL), the same image pairs.

TRL computes DPO's log-probs, losses and metrics in `DPOTrainer._compute_loss` (its fused LM head patched onto the
HF model); a DPOTrainer is built on the HF export with a frozen reference copy, and that method is run on the
batch TRL's own `DataCollatorForPreference` makes from our pairs' prompt/chosen/rejected token ids (plus the
pixel values: TRL's vision collator would re-tile the images with HF's processor, which the export does not
ship). Stitch runs its real `train_step` (with the preference objective) on the same pairs through
`PreferenceStream`. Loss, rewards, margins, accuracy, log-probs and the first step's gradients must agree within
1e-5 in fp32.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from stitch.checkpoint.export import export_to_hf  # noqa: E402
from stitch.checkpoint.hf import vlm_state_to_hf  # noqa: E402
from stitch.checkpoint.store import load_model  # noqa: E402
from stitch.data.preference import PreferenceStream  # noqa: E402
from stitch.data.processor import Processor  # noqa: E402
from stitch.data.sources import easy_vqa_records  # noqa: E402
from stitch.train.config import PreferenceConfig, load_config  # noqa: E402
from stitch.train.preference import PairObjective, build_reference, loss_terms  # noqa: E402
from stitch.train.stages import apply_stage  # noqa: E402
from stitch.train.step import train_step  # noqa: E402

ANSWERS = [("blue", "It is red, I think."), ("There are two circles here.", "no")]

CASES = {  # name: (stitch preference config, TRL loss_type, TRL loss_weights, label_smoothing, pairs)
    "sigmoid": ({"loss_type": ["sigmoid"]}, ["sigmoid"], None, 0.0, 2),
    "ipo": ({"loss_type": ["ipo"], "beta": 0.5}, ["ipo"], None, 0.0, 2),
    "hinge": ({"loss_type": ["hinge"], "beta": 2.0}, ["hinge"], None, 0.0, 2),
    "robust": ({"loss_type": ["robust"], "label_smoothing": 0.2}, ["robust"], None, 0.2, 2),
    # conservative DPO: TRL 1.16's `sigmoid` has no smoothing; its `aot` is the same loss for a single pair
    "sigmoid-smoothed": ({"loss_type": ["sigmoid"], "label_smoothing": 0.2, "beta": 1.0}, ["aot"], None, 0.2, 1),
    "mpo": ({}, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0, 2),
}


class _KeepGrads:
    """An optimizer stand-in that records the gradients `train_step` leaves for the update."""

    def __init__(self, named):
        self.named, self.grads = named, {}

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.named if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        for _, p in self.named:
            p.grad = None


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pref-trl")
    records = easy_vqa_records("train")[:2]
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps({"question": q, "image": img, "chosen": c, "rejected": r}) + "\n"
                            for (img, q, _), (c, r) in zip(records, ANSWERS)))
    hf_dir = export_to_hf(tiny_ckpt, "internvl", tmp / "hf")
    return tiny_ckpt, path, hf_dir


def _stitch(ckpt, path, pref: dict, pairs: int):
    stage = "mpo" if not pref else "dpo"  # mpo's default terms and weights are InternVL's
    cfg = load_config(None, data={"output_dir": "unused", "stage": stage, "model": {"checkpoint": str(ckpt)},
                                  "data": {"datasets": [{"path": str(path), "limit": pairs}], "batch_size": pairs},
                                  "train": {"steps": 1, "global_batch_size": pairs}, "preference": pref})
    model = load_model(ckpt, dtype=torch.float32)
    processor = Processor.from_pretrained(ckpt)
    batch = next(iter(PreferenceStream(cfg.data, processor, seed=0)))
    apply_stage(model, cfg)
    model.train()
    terms = loss_terms(cfg.preference, cfg.stage)
    ref = build_reference(model, cfg.preference, torch.device("cpu"), contextlib.nullcontext, terms)
    opt = _KeepGrads([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    result = train_step(model, opt, [batch], device=torch.device("cpu"), objective=PairObjective(ref, cfg.preference))
    return model, batch, result, opt.grads


def _trl_batch(batch, pad_id):
    """TRL's collator on our pairs: prompt ids = all before the first answer token, completion = the answer."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    b = batch["num_pairs"]
    examples = []
    for k in range(b):
        rows = []
        for row in (k, b + k):
            ids, lab = batch["input_ids"][row], batch["labels"][row]
            where = (lab != -100).nonzero().flatten()
            rows.append((ids[: where[0]].tolist(), ids[where[0] : where[-1] + 1].tolist()))
        assert rows[0][0] == rows[1][0]  # one prompt for both answers
        examples.append({"prompt_ids": rows[0][0], "chosen_ids": rows[0][1], "rejected_ids": rows[1][1]})
    out = DataCollatorForPreference(pad_token_id=pad_id)(examples)
    out["pixel_values"] = batch["pixel_values"]  # one tile per row, rows in the same order
    return out


def _module_names(state: dict) -> dict:
    """The export's file names (InternVL's original layout) as transformers 5's module names (it renames on
    load: `language_model.model.*` -> `model.language_model.*`, `language_model.lm_head` -> `lm_head`...)."""
    out = {}
    for name, t in state.items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        elif name.startswith("language_model.lm_head"):
            name = name[len("language_model."):]
        else:
            name = "model." + name
        out[name] = t
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_loss_metrics_and_gradients_equal_trl(setup, case, tmp_path):
    from trl import DPOConfig, DPOTrainer

    ckpt, path, hf_dir = setup
    pref, loss_type, weights, smoothing, pairs = CASES[case]
    torch.manual_seed(0)
    model, batch, result, grads = _stitch(ckpt, path, pref, pairs)
    beta = PreferenceConfig(**pref).beta

    hf_cls = transformers.InternVLForConditionalGeneration
    policy, reference = hf_cls.from_pretrained(hf_dir).float(), hf_cls.from_pretrained(hf_dir).float()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    args = DPOConfig(output_dir=str(tmp_path), loss_type=loss_type, loss_weights=weights, beta=beta,
                     label_smoothing=smoothing, use_cpu=True, bf16=False, report_to="none", max_length=None,
                     per_device_train_batch_size=pairs, remove_unused_columns=False)
    from datasets import Dataset

    dummy = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dummy, processing_class=tok)
    trainer.model.train()
    inputs = _trl_batch(batch, tok.pad_token_id)
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    torch.testing.assert_close(result.loss, loss.item(), atol=1e-5, rtol=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        torch.testing.assert_close(result.metrics[name], trl_metrics[name], atol=1e-5, rtol=1e-5, msg=name)

    # First-step gradients, mapped to the HF names through the exporter's own tensor mapping.
    # Frozen tensors (the ViT) carry zeros, and a mask of ones marks where Stitch trained.
    state = {n: grads.get(n, torch.zeros_like(t)) for n, t in model.state_dict().items()}
    trained = {n: torch.full_like(t, float(n in grads)) for n, t in model.state_dict().items()}
    mapped = vlm_state_to_hf(state, model.config, "internvl")
    mask = vlm_state_to_hf(trained, model.config, "internvl")
    hf_grads = {n: p.grad for n, p in policy.named_parameters()}
    mapped, mask = _module_names(mapped), _module_names(mask)
    assert set(mapped) <= set(hf_grads)
    # HF's embedding has `padding_idx = pad_token_id`, which never gets a gradient; SmolLM2 pads with <|im_end|>,
    # a token every answer ends with, so that one row differs by design (Stitch trains it) and is left out.
    mask["model.language_model.embed_tokens.weight"][tok.pad_token_id] = 0
    compared = [n for n in mapped if mask[n].any()]
    assert len(compared) > 10
    worst = max(((mapped[n] - hf_grads[n]) * mask[n]).abs().max().item() for n in compared)
    scale = max(mapped[n].abs().max().item() for n in compared)
    assert scale > 1e-4  # the gradients are not trivially zero
    assert worst < 1e-5, f"largest gradient difference {worst:.3g}"
