"""Preference training (stages dpo/mpo): pair data and masks, a CPU learning run, LoRA's reference, exact resume.

The losses themselves are checked against TRL in test_preference_trl.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stitch.checkpoint.store import load_model
from stitch.data.check import is_preference_data, run_pair_check
from stitch.data.config import DataConfig
from stitch.data.preference import PreferenceSource, PreferenceStream, encode_pair, parse_preference_row
from stitch.data.processor import Processor
from stitch.data.skips import SampleError
from stitch.errors import DataError, StitchConfigError
from stitch.train.config import load_config
from stitch.train.loop import Trainer
from tests.train.helpers import tiny_config

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}


def _colour_pairs(folder: Path, split: str, n: int, seed: int) -> Path:
    """A synthetic VQA: a plain-coloured image, "What color is the image?", chosen = its colour, rejected = another
    colour; plus the same records as SFT conversations."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    pairs, sft = [], []
    for i in range(n):
        colour = names[i % len(names)]
        pixel = np.clip(np.array(COLORS[colour]) + rng.integers(-25, 26, size=3), 0, 255).astype(np.uint8)
        path = folder / f"{split}{i}.png"
        Image.fromarray(np.tile(pixel, (28, 28, 1))).save(path)
        wrong = names[(names.index(colour) + 1 + int(rng.integers(0, 3))) % len(names)]
        pairs.append({"question": "What color is the image?", "image": path.name, "chosen": colour, "rejected": wrong})
        turns = [{"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": colour}]
        sft.append({"image": path.name, "conversations": turns})
    (folder / f"{split}-sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    out = folder / f"{split}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return out


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    return _colour_pairs(folder, "train", 64, 0), _colour_pairs(folder, "test", 32, 1)


def _base(ckpt: Path, out: Path, data: Path, stage: str, steps: int, **extra) -> dict:
    cfg = tiny_config(ckpt, out, stage=stage, synthetic={"enabled": False},
                      data={"datasets": [{"path": str(data)}], "batch_size": 8, "num_workers": 0},
                      train={"steps": steps, "global_batch_size": 8, "device": "cpu", "precision": "fp32"},
                      schedule={"warmup_steps": 0}, checkpoint={"every": 0, "resume": True})
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@torch.no_grad()
def _held_out(ckpt: Path, pairs: Path) -> tuple[float, float]:
    """(preference accuracy: logp(chosen) > logp(rejected); exact match: the greedy answer is the right one, which
    holds iff every answer token, end-of-turn included, is the argmax given the right prefix)."""
    model = load_model(ckpt, dtype=torch.float32).eval()
    batch = next(iter(PreferenceStream(DataConfig(datasets=[{"path": str(pairs)}], batch_size=32),
                                       Processor.from_pretrained(ckpt))))
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != -100
    logp = (torch.log_softmax(logits, -1).gather(2, target.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    chosen, rejected = logp.chunk(2)
    exact = ((logits.argmax(-1) == target) | ~mask).all(1).chunk(2)[0]
    return float((chosen > rejected).float().mean()), float(exact.float().mean())


def test_dpo_after_sft_raises_held_out_preference_accuracy_and_exact_match(tiny_ckpt, colours, tmp_path):
    train, test = colours
    # A short SFT: a policy that answers but does not yet prefer the right colour reliably, for DPO to improve
    sft = _base(tiny_ckpt, tmp_path / "sft", train.with_name("train-sft.jsonl"), "sft", 6, optim={"lr": 3e-3})
    Trainer(load_config(None, data=sft)).fit()
    pref_before, exact_before = _held_out(tmp_path / "sft" / "final", test)
    dpo = _base(tmp_path / "sft" / "final", tmp_path / "dpo", train, "dpo", 40, optim={"lr": 2e-3})
    records = Trainer(load_config(None, data=dpo)).fit().records
    pref_after, exact_after = _held_out(tmp_path / "dpo" / "final", test)
    assert pref_after >= max(0.85, min(1.0, pref_before + 0.15)), (pref_before, pref_after)  # 32 held-out pairs
    assert exact_after >= exact_before, (exact_before, exact_after, pref_before, pref_after)
    # the logged metrics move the way DPO moves them
    assert records[-1]["rewards/accuracies"] > records[0]["rewards/accuracies"]
    assert records[-1]["rewards/margins"] > 0 and records[0]["rewards/margins"] == 0.0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl", "loss/sigmoid"} <= set(
        records[-1])


@torch.no_grad()
def _answer_logps(ckpt: Path, pairs: Path) -> torch.Tensor:
    """logp(answer) of every held-out pair's rows from the full logits ([64]: 32 chosen, then 32 rejected)."""
    model = load_model(ckpt, dtype=torch.float32).eval()
    batch = next(iter(PreferenceStream(DataConfig(datasets=[{"path": str(pairs)}], batch_size=32),
                                       Processor.from_pretrained(ckpt))))
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(2, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    keys = batch["sample_keys"]
    order = sorted(range(32), key=keys.__getitem__)  # a record's rows wherever the stream's shuffle put it
    return logp.sum(1).view(2, 32)[:, order]


def test_validation_logs_the_held_out_pairs_loss_rewards_and_accuracy(tiny_ckpt, colours, tmp_path):
    """eval.every on eval.data: every held-out pair once (4 micro-batches of 8 on the 32 pairs), its DPO loss,
    rewards and accuracy against the starting model, as computed here from the full logits of the final weights."""
    train, test = colours
    cfg = _base(tiny_ckpt, tmp_path / "dpo", train, "dpo", 2, optim={"lr": 2e-3},
                eval={"every": 2, "data": {"datasets": [{"path": str(test)}], "batch_size": 8}})
    Trainer(load_config(None, data=cfg)).fit()
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2]
    beta = 0.1
    reward = beta * (_answer_logps(tmp_path / "dpo" / "final", test) - _answer_logps(tiny_ckpt, test))  # [2, 32]
    delta = reward[0] - reward[1]
    want = {"val_loss": float(-torch.nn.functional.logsigmoid(delta).mean()),
            "val_rewards/chosen": float(reward[0].mean()), "val_rewards/rejected": float(reward[1].mean()),
            "val_rewards/margins": float(delta.mean()), "val_rewards/accuracies": float((delta > 0).float().mean())}
    assert delta.abs().min() > 1e-4  # no ties for the accuracy to read rounding on
    for key, value in want.items():
        assert val[0][key] == pytest.approx(value, abs=2e-5), key
    assert {"val_loss/sigmoid", "val_kl", "val_logps/chosen"} <= set(val[0])
    # without eval.data, a blend's val split holds the held-out pairs (as SFT's validation reads it)
    blend = tmp_path / "blend.yaml"
    blend.write_text(json.dumps({"splits": {"train": {"datasets": [{"path": str(train)}]},
                                            "val": {"datasets": [{"path": str(test)}]}}}))
    cfg = _base(tiny_ckpt, tmp_path / "blend", train, "dpo", 1, eval={"every": 1})
    cfg["data"] = {**cfg["data"], "datasets": [], "blend": str(blend)}
    trainer = Trainer(load_config(None, data=cfg))
    trainer.setup()
    assert [s.name for s in trainer.val_pairs.sources] == [str(test)] and len(trainer.val_pairs.index) == 32


@pytest.mark.parametrize("lora", [True, False], ids=["lora-mpo", "full-dpo"])
def test_resume_is_bit_exact_and_lora_keeps_one_copy_of_the_base(tiny_ckpt, colours, tmp_path, lora):
    train, _ = colours
    # a constant LR: the first run of b stops at its train.steps = 2, where a cosine schedule would differ
    extra = {"checkpoint": {"every": 2}, "optim": {"lr": 1e-3}, "schedule": {"kind": "constant"}}
    if lora:  # adapters only (so the reference is the policy with adapters off), with adapter dropout
        extra.update(lora={"enabled": True, "rank": 4, "dropout": 0.1, "trainable": []})
    stage = "mpo" if lora else "dpo"
    straight = Trainer(load_config(None, data=_base(tiny_ckpt, tmp_path / "a", train, stage, 4, **extra)))
    a = straight.fit().records
    ref = straight.reference
    if lora:
        assert ref.kind == "adapters" and ref.model is straight.model  # no second copy of the weights
        base, now = load_model(tiny_ckpt), straight.model.state_dict()
        assert all(torch.equal(t, now[n]) for n, t in base.state_dict().items())  # base untouched
    else:
        assert ref.kind == "copy" and ref.model is not straight.model
    Trainer(load_config(None, data=_base(tiny_ckpt, tmp_path / "b", train, stage, 2, **extra))).fit()
    resumed = Trainer(load_config(None, data=_base(tiny_ckpt, tmp_path / "b", train, stage, 4, **extra)))
    b = resumed.fit().records
    assert resumed.resume_from is not None and [r["step"] for r in b] == [3, 4]
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "kl"]
    assert [[r[k] for k in keys] for r in a[2:]] == [[r[k] for k in keys] for r in b]
    weights = "adapter.safetensors" if lora else "model.safetensors"
    fa, fb = (load_file(str(tmp_path / run / "final" / weights)) for run in ("a", "b"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_a_bf16_reference_copy_starts_a_bf16_run_at_zero_margin(tiny_ckpt, colours, tmp_path):
    train, _ = colours
    cfg = _base(tiny_ckpt, tmp_path / "run", train, "dpo", 1, train={"precision": "bf16"},
                preference={"reference_dtype": "bf16"}, checkpoint={"at_end": False, "save_final": False})
    trainer = Trainer(load_config(None, data=cfg))
    record = trainer.fit().records[0]
    linear = trainer.reference.model.llm.layers[0].mlp.down_proj.weight
    assert linear.dtype == torch.bfloat16 and trainer.model.llm.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert record["rewards/chosen"] == record["rewards/rejected"] == 0.0
    assert record["loss"] == pytest.approx(np.log(2), abs=1e-6)


def test_accumulating_unequal_micro_batches_equals_one_batch_of_all_the_pairs(tiny_ckpt, colours):
    """Pair terms are means over the global pairs and the SFT term over the global chosen tokens, so 3 + 1 pairs
    in two micro-batches give the loss, metrics and gradients of one batch of the 4."""
    from stitch.data.preference import collate_pairs
    from stitch.train.preference import PairObjective, build_reference, loss_terms
    from stitch.train.stages import apply_stage
    from stitch.train.step import train_step

    train, _ = colours
    cfg = load_config(None, data=_base(tiny_ckpt, Path("unused"), train, "mpo", 1))
    processor = Processor.from_pretrained(tiny_ckpt)
    stream = PreferenceStream(cfg.data, processor, seed=0).pairs()
    pairs = [next(stream) for _ in range(4)]
    pad = processor.pad_token_id
    results = []
    for micro in ([collate_pairs(pairs, pad)], [collate_pairs(pairs[:3], pad), collate_pairs(pairs[3:], pad)]):
        model = load_model(tiny_ckpt, dtype=torch.float32)
        apply_stage(model, cfg)
        terms = loss_terms(cfg.preference, cfg.stage)
        ref = build_reference(model, cfg.preference, torch.device("cpu"), contextlib.nullcontext, terms)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        step = train_step(model, opt, micro, device=torch.device("cpu"), objective=PairObjective(ref, cfg.preference))
        results.append((step,
                        model.llm.layers[0].self_attn.q_proj.weight.detach().clone()))
    (one, w_one), (two, w_two) = results
    assert one.loss == pytest.approx(two.loss, abs=1e-6) and one.label_tokens == two.label_tokens
    for key in ("rewards/chosen", "rewards/accuracies", "logps/chosen", "loss/sft", "kl"):
        assert one.metrics[key] == pytest.approx(two.metrics[key], abs=1e-6), key
    assert one.grad_norm == pytest.approx(two.grad_norm, rel=1e-5)
    torch.testing.assert_close(w_one, w_two, atol=1e-7, rtol=1e-6)  # the same update


def test_precomputed_reference_logps_equal_the_copy_resume_a_partial_pass_and_refuse_other_data(
        tiny_ckpt, colours, tmp_path):
    from stitch.train.preference import Reference, preference_stream, sequence_logps
    from stitch.train.reference_logps import precompute_reference_logps

    train, _ = colours
    extra = {"schedule": {"kind": "constant"}, "checkpoint": {"at_end": False, "save_final": False}}
    copy_run = Trainer(load_config(None, data=_base(tiny_ckpt, tmp_path / "copy", train, "dpo", 2, **extra)))
    a = copy_run.fit().records
    cfg = _base(tiny_ckpt, tmp_path / "pre", train, "dpo", 2, preference={"reference": "precomputed"}, **extra)
    b = Trainer(load_config(None, data=cfg)).fit().records
    for key in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-5), key
    path = tmp_path / "pre" / "reference_logps.jsonl"
    full = path.read_text()
    assert len(full.splitlines()) == 1 + 64
    # a pass killed mid-way (10 records and half a line written) continues to the same file
    lines = full.split("\n")
    path.write_text("\n".join(lines[:11]) + "\n" + lines[11][:17])
    model = load_model(tiny_ckpt, dtype=torch.float32)
    stream = PreferenceStream(load_config(None, data=cfg).data, Processor.from_pretrained(tiny_ckpt))
    precompute_reference_logps(path, model, stream, str(tiny_ckpt), torch.device("cpu"), contextlib.nullcontext,
                               sequence_logps)
    assert path.read_text() == full
    # other answers in the same file: the stored digests no longer match
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    other = tmp_path / "train.jsonl"
    other.write_text("".join(json.dumps({**r, "rejected": "purple", "image": str(train.parent / r["image"])}) + "\n"
                             for r in rows))
    processor = Processor.from_pretrained(tiny_ckpt)
    reference = Reference(model, "precomputed", contextlib.nullcontext)
    pref = {"reference": "precomputed", "reference_logps": str(path)}
    for name, error in ((None, "made for datasets"), (str(train), "not the pair its reference log-probs")):
        spec = {"path": str(other), **({"name": name} if name else {})}
        tampered = _base(tiny_ckpt, tmp_path / "pre", other, "dpo", 2, **extra, preference=pref)
        tampered["data"]["datasets"] = [spec]
        tampered = load_config(None, data=tampered)
        with pytest.raises(DataError, match=error):  # another dataset; the same one with other answers
            next(iter(preference_stream(tampered, processor, copy_run.dist, reference, resumed=True)))


# --------------------------------------------------------------------------- data
def test_pairs_from_rlaif_v_llava_rlhf_and_trl_fields_render_with_answer_only_masks(tiny_ckpt, tmp_path):
    processor = Processor.from_pretrained(tiny_ckpt)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    rlaif = {"question": "What is shown?", "image": {"bytes": (tmp_path / "a.png").read_bytes(), "path": None},
             "chosen": "A red square.", "rejected": "A blue circle.", "ds_name": "x", "origin_dataset": "y"}
    rlhf = {"conversations": [{"from": "human", "value": "<image>\nDescribe it."}], "image": "a.png",
            "output_1": {"from": "llava", "value": "It is blue."}, "output_2": {"from": "llava", "value": "It is red."},
            "preference": 2}
    trl = {"prompt": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Colour?"}],
           "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Blue"}]}
    for row, chosen, n_images in ((rlaif, "A red square.", 1), (rlhf, "It is red.", 1), (trl, "Red.", 0)):
        pair = parse_preference_row(row, "row", image_root=tmp_path)
        assert pair.chosen == chosen and len(pair.images) == n_images
        c, r = encode_pair(processor, pair)
        for sample, answer in ((c, pair.chosen), (r, pair.rejected)):
            trained = sample.input_ids[sample.labels != -100]
            # exactly the answer and its end-of-turn token: no prompt, no earlier assistant turn ("Hello.")
            assert processor.tokenizer.decode(trained) == answer + "<|im_end|>"
        n = int((c.labels != -100).nonzero()[0])
        assert torch.equal(c.input_ids[:n], r.input_ids[:n])  # one prompt
    # the same records from a WebDataset shard (image as a member) and a JSON list
    with tarfile.open(tmp_path / "pairs.tar", "w") as tar:
        for name, data in (("s0.json", json.dumps({k: v for k, v in rlaif.items() if k != "image"}).encode()),
                           ("s0.png", (tmp_path / "a.png").read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "pairs.json").write_text(json.dumps([rlhf]))
    for path in ("pairs.tar", "pairs.json"):
        spec = DataConfig(datasets=[{"path": str(tmp_path / path)}]).resolve_datasets()[0]
        pair = PreferenceSource(spec).get(0)
        assert len(pair.images) == 1 and encode_pair(processor, pair)[0].pixel_values.shape[0] >= 1
    # `stitch data check` recognises pair data and shows each pair's two renderings
    cfg = DataConfig(datasets=[{"path": str(tmp_path / "pairs.json")}])
    assert is_preference_data(cfg) and not is_preference_data(DataConfig(datasets=[{"path": "easy-vqa:train"}]))
    report = run_pair_check(cfg, processor, samples=5, show=1)
    assert report["ok"] and report["samples"] == 1
    assert [s["key"].rsplit(" ", 1)[1] for s in report["shown"]] == ["(chosen)", "(rejected)"]


def _energon_pairs(folder: Path, splits: dict[str, list[dict]], image: bytes) -> Path:
    """An Energon-prepared folder as `energon prepare` leaves it: one shard per split, members `key.question.txt`,
    `key.chosen.txt`, `key.rejected.txt`, `key.jpg`, and dataset.yaml's field_map naming them."""
    folder.mkdir()
    counts = {}
    for split, rows in splits.items():
        with tarfile.open(folder / f"{split}.tar", "w") as tar:
            for k, row in enumerate(rows):
                members = {f"{k:04d}.{name}.txt": row[name].encode() for name in ("question", "chosen", "rejected")}
                for name, data in {**members, f"{k:04d}.jpg": image}.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        counts[f"{split}.tar"] = len(rows)
    meta = folder / ".nv-meta"
    meta.mkdir()
    (meta / ".info.yaml").write_text(json.dumps({"shard_counts": counts}))
    (meta / "split.yaml").write_text(json.dumps({"split_parts": {s: [f"{s}.tar"] for s in splits}}))
    (meta / "dataset.yaml").write_text(json.dumps({
        "sample_type": {"__module__": "custom", "__class__": "PreferenceSample"},
        "field_map": {"question": "question.txt", "chosen": "chosen.txt", "rejected": "rejected.txt",
                      "image": "jpg"}}))
    return folder


def test_pairs_from_an_energon_folder_render_as_the_same_jsonl_pairs_per_split(tiny_ckpt, tmp_path):
    processor = Processor.from_pretrained(tiny_ckpt)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    (tmp_path / "a.jpg").write_bytes(buf.getvalue())
    rows = {"train": [{"question": "What colour?", "chosen": "Red.", "rejected": "Blue."},
                      {"question": "Which shape?", "chosen": "A square.", "rejected": "A circle."}],
            "val": [{"question": "Is it red?", "chosen": "Yes.", "rejected": "No."}]}
    folder = _energon_pairs(tmp_path / "energon", rows, buf.getvalue())
    for split, records in rows.items():
        jsonl = tmp_path / f"{split}.jsonl"
        jsonl.write_text("".join(json.dumps({**r, "image": "a.jpg"}) + "\n" for r in records))
        energon = DataConfig(datasets=[{"path": str(folder), "split": split}]).resolve_datasets()[0]
        plain = DataConfig(datasets=[{"path": str(jsonl)}]).resolve_datasets()[0]
        a, b = PreferenceSource(energon), PreferenceSource(plain)
        assert len(a) == len(b) == len(records)
        for i in range(len(records)):
            for x, y in zip(encode_pair(processor, a.get(i)), encode_pair(processor, b.get(i))):
                assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
                assert torch.equal(x.pixel_values, y.pixel_values)
    assert is_preference_data(DataConfig(datasets=[{"path": str(folder)}]))
    with pytest.raises(DataError, match="no split part 'test'"):
        PreferenceSource(DataConfig(datasets=[{"path": str(folder), "split": "test"}]).resolve_datasets()[0])


@pytest.mark.parametrize("row, reason, text", [
    ({"chosen": "a", "rejected": "b"}, "malformed_record", "no prompt"),
    ({"question": "q", "chosen": "a"}, "malformed_record", "no answers"),
    ({"question": "q", "output_1": "a", "output_2": "b", "preference": 3}, "malformed_record", "preference must"),
    ({"question": "q", "chosen": " ", "rejected": "b"}, "empty_conversation", "chosen answer is empty"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "bad_roles", "must end with a user turn"),
    ({"question": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "bad_roles", "chosen must end"),
    ({"question": "q", "chosen": "a", "rejected": "b", "image": 3}, "malformed_record", "image 0"),
])
def test_bad_pairs_name_what_and_where(row, reason, text):
    with pytest.raises(SampleError, match=text) as err:
        parse_preference_row(row, "data.jsonl:7")
    assert err.value.reason == reason and "data.jsonl:7" in str(err.value)


def test_preference_config_errors_name_the_field(tiny_ckpt, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(StitchConfigError, match="loss_weights"):
        load_config(None, data=_base(tiny_ckpt, tmp_path, data, "dpo", 1,
                                     preference={"loss_type": ["sigmoid"], "loss_weights": [1, 2]}))
    with pytest.raises(StitchConfigError, match="loss_weights has 2 values for 3 loss types"):
        load_config(None, data=_base(tiny_ckpt, tmp_path, data, "mpo", 1, preference={"loss_weights": [1, 2]}))
    one = load_config(None, data=_base(tiny_ckpt, tmp_path, data, "dpo", 1, preference={"loss_type": "ipo"}))
    assert one.preference.loss_type == ["ipo"]
    with pytest.raises(StitchConfigError, match="synthetic"):
        load_config(None, data={**_base(tiny_ckpt, tmp_path, data, "dpo", 1), "synthetic": {"enabled": True}})
    cfg = load_config(None, data=_base(tiny_ckpt, tmp_path, data, "dpo", 1, preference={"reference": "adapters"}))
    with pytest.raises(StitchConfigError, match="reference: adapters needs LoRA"):
        Trainer(cfg).setup()
    with pytest.raises(StitchConfigError, match="eval.every needs held-out preference pairs"):
        load_config(None, data=_base(tiny_ckpt, tmp_path, data, "dpo", 1, eval={"every": 2}))
