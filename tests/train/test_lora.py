"""LoRA (`stitch.models.lora`, `stitch.checkpoint.lora`): merging is exact, exports load in transformers and peft, LoRA
SFT learns with the base untouched, checkpoints hold only adapters + trainable modules and resume bit for bit,
activation checkpointing and bf16 autocast give the same gradients, the parameter table counts adapters, and FSDP2 (2
gloo processes, fp32 and bf16 mixed precision) trains the adapters like one process does.

Run as a module under torchrun, this file is also the FSDP2 worker (`python -m tests.train.test_lora OUT`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stitch.checkpoint.io import TensorSource
from stitch.checkpoint.lora import ADAPTER_FILE, LORA_FILE, TRAINABLE_FILE, base_reference, save_lora_checkpoint
from stitch.errors import StitchConfigError
from stitch.models.lora import LoRALinear, apply_lora, is_adapter_name, lora_layers, merge_lora, merged_state_dict
from stitch.train.config import LoRAConfig, load_config
from tests.train.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
BOTH = dict(enabled=True, parts=["llm", "vision"], rank=4, alpha=8.0, dropout=0.0)


def _randomise_adapters(model, seed: int = 0) -> None:
    """Non-zero B (a fresh adapter's update is exactly 0, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
        for p in model.projector.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(cfg, rows: int = 2, text: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [2 text, one tile's image tokens, text]; image tokens where HF's InternVL expects them."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.tokens_per_tile
    ids = torch.randint(10, 200, (rows, 2 + t + text), generator=g)
    ids[:, 2 : 2 + t] = cfg.image_token_id
    size = cfg.vision.image_size
    return ids, torch.randn(rows, 3, size, size, generator=g)


def _load(path):
    from stitch.checkpoint.store import load_model

    return load_model(path).eval()


# ------------------------------------------------------------------------------------------- merging and export
def test_merged_model_equals_base_plus_adapters(small_ckpt):
    model = _load(small_ckpt)
    apply_lora(model, LoRAConfig(**BOTH))
    _randomise_adapters(model)
    # the base Linear's names are unchanged; adapters add lora_A/lora_B (peft's names)
    names = set(dict(model.named_parameters()))
    assert {"llm.layers.0.self_attn.q_proj.weight", "llm.layers.0.self_attn.q_proj.lora_A.weight",
            "vision.layers.1.mlp.fc2.bias", "vision.layers.1.mlp.fc2.lora_B.weight"} <= names
    assert len(lora_layers(model)) == 2 * 7 + 2 * 6  # LLM: q,k,v,o,gate,up,down; ViT: q,k,v,o,fc1,fc2
    ids, pixels = _inputs(model.config)
    with torch.no_grad():
        adapted = model(ids, pixel_values=pixels).logits
        plain = merged_state_dict(model)
        merged = merge_lora(model)
        assert not lora_layers(merged) and set(plain) == set(merged.state_dict())
        assert all(torch.equal(plain[k], v) for k, v in merged.state_dict().items())
        torch.testing.assert_close(merged(ids, pixel_values=pixels).logits, adapted, atol=1e-5, rtol=0)
    base = _load(small_ckpt)
    assert not torch.equal(base.llm.layers[0].mlp.up_proj.weight, merged.llm.layers[0].mlp.up_proj.weight)


def test_lora_checkpoint_loads_merges_and_exports_to_transformers_and_peft(tiny_ckpt, tmp_path):
    import peft
    import transformers

    import stitch
    from stitch.checkpoint.export import export_to_hf
    from stitch.cli import main

    model = _load(tiny_ckpt)
    apply_lora(model, LoRAConfig(**BOTH))
    _randomise_adapters(model)
    from transformers import AutoTokenizer

    lora_dir = save_lora_checkpoint(model, tmp_path / "lora", base_reference(tiny_ckpt),
                                    tokenizer=AutoTokenizer.from_pretrained(str(tiny_ckpt)))
    files = {p.name for p in lora_dir.iterdir()}
    assert {"config.json", ADAPTER_FILE, TRAINABLE_FILE, LORA_FILE, "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    ids, pixels = _inputs(model.config)
    with torch.no_grad():
        ref = model(ids, pixel_values=pixels).logits
        unmerged, _ = stitch.load(lora_dir)
        merged, processor = stitch.load(lora_dir, merge_lora=True)
        assert lora_layers(unmerged) and not lora_layers(merged)
        torch.testing.assert_close(unmerged(ids, pixel_values=pixels).logits, ref, atol=0, rtol=0)
        torch.testing.assert_close(merged(ids, pixel_values=pixels).logits, ref, atol=1e-5, rtol=0)

    # merged HF export (through the CLI, with the peft adapters beside it), loaded by transformers
    hf_dir, peft_dir = tmp_path / "hf", tmp_path / "peft"
    assert main(["export-hf", str(lora_dir), "--format", "internvl", "--out", str(hf_dir),
                 "--peft-out", str(peft_dir)]) == 0
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, ref, atol=1e-5, rtol=0)

    # peft format: the base exported on its own + the adapters through peft itself
    export_to_hf(tiny_ckpt, "internvl", tmp_path / "base-hf")
    base_hf = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path / "base-hf").eval()
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "model.multi_modal_projector.linear_1" in config["modules_to_save"]
    keys = set(load_file(str(peft_dir / "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_tower.encoder.layer.0.attention.projection_layer.lora_B.weight" in keys
    with torch.no_grad():
        before = base_hf(input_ids=ids, pixel_values=pixels).logits
        adapted = peft.PeftModel.from_pretrained(base_hf, str(peft_dir)).eval()
        torch.testing.assert_close(adapted(input_ids=ids, pixel_values=pixels).logits, ref, atol=1e-5, rtol=0)
    assert (before - ref).abs().max() > 1e-3  # the adapters (and projector) do change the output

    # reshard merges the adapters first: a tp2 layout of the merged weights, which loads with the same logits
    assert main(["reshard", str(lora_dir), "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    assert not (tmp_path / "tp2" / LORA_FILE).exists()
    resharded, _ = stitch.load(tmp_path / "tp2")
    with torch.no_grad():
        torch.testing.assert_close(resharded(ids, pixel_values=pixels).logits, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def confident_ckpt(tmp_path_factory) -> Path:
    """vlm-tiny (256-token vocabulary) with its final RMSNorm weight at 4 instead of 1.

    With the LM head and final norm frozen, the largest logit gap a model can reach is about
    |norm weight| x sqrt(hidden) x |head row|: ~4.6 for this random base, too little for any adapter to push the
    loss of 256-way predictions below 0.05. Trained LLMs have confident heads; scaling the norm gives the random
    base one without training anything."""
    from stitch.checkpoint.store import build_model, save
    from stitch.models.presets import vlm_preset

    cfg = vlm_preset("vlm-tiny")
    cfg.llm.vocab_size, cfg.image_token_id = 256, 255
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.llm.norm.weight.fill_(4.0)
    return save(model, tmp_path_factory.mktemp("lora") / "confident")


def _lora_run(ckpt: Path, out: Path, **sections) -> dict:
    """`tiny_config` with LoRA on (both parts, rank 4) unless `lora=` says otherwise."""
    return tiny_config(ckpt, out, lora=sections.pop("lora", {**BOTH, "trainable": ["projector"]}), **sections)


def test_lora_sft_overfits_16_samples_with_base_weights_bit_identical(confident_ckpt, tmp_path):
    from stitch.train.trainer import Trainer

    cfg = load_config(None, data=_lora_run(
        confident_ckpt, tmp_path / "run",
        lora={**BOTH, "parts": ["llm"], "rank": 16, "alpha": 32.0},
        synthetic={"num_samples": 16, "min_tokens": 16, "max_tokens": 24, "vocab_limit": 64},
        data={"batch_size": 8, "num_workers": 0},
        optim={"lr": 1e-2, "weight_decay": 0.0, "max_grad_norm": 1.0},
        schedule={"warmup_steps": 5, "min_lr": 0.0},
        train={"steps": 50, "global_batch_size": 16},  # every step sees all 16 samples (2 micro-batches)
        checkpoint={"every": 0, "at_end": False, "save_final": True},
    ))
    trainer = Trainer(cfg, console_print=lambda *_: None)
    summary = trainer.fit()
    assert summary.losses[0] > 4.0 and summary.losses[-1] < 0.05, summary.losses[::5]
    # every base tensor of the trained model is bit-identical to the checkpoint it started from
    base = TensorSource(confident_ckpt)
    trained = dict(trainer.model.named_parameters())
    frozen = [n for n in base if not n.startswith("projector.")]
    assert frozen and all(torch.equal(trained[n], base[n]) for n in frozen)
    assert not torch.equal(trained["projector.linear_1.weight"], base["projector.linear_1.weight"])
    # final/ holds adapters + projector only, and reloads to the trained model
    final = summary.final_dir
    assert not (final / "model.safetensors").exists()
    assert set(load_file(str(final / TRAINABLE_FILE))) == {n for n in base if n.startswith("projector.")}
    assert all(is_adapter_name(n) for n in load_file(str(final / ADAPTER_FILE)))
    reloaded = _load(final)
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters())


def test_checkpoints_hold_adapters_and_trainable_modules_and_resume_exactly(small_ckpt, tmp_path):
    from stitch.train.log import read_metrics
    from stitch.train.trainer import Trainer

    def run(out: Path, steps: int):
        cfg = load_config(None, data=_lora_run(
            small_ckpt, out, lora={**BOTH, "dropout": 0.1},  # dropout: the RNG state must resume too
            schedule={"warmup_steps": 1, "decay_steps": 4}, train={"steps": steps, "activation_checkpointing": True},
            checkpoint={"every": 2, "keep_last": 1}))
        return Trainer(cfg, console_print=lambda *_: None).fit()

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    step2 = tmp_path / "resumed" / "checkpoints" / "step_000002"
    files = {p.name for p in step2.iterdir()}
    assert files == {"config.json", ADAPTER_FILE, TRAINABLE_FILE, LORA_FILE, "train_state"}
    meta = json.loads((step2 / LORA_FILE).read_text())
    assert meta["base"]["path"] == str(small_ckpt.resolve()) and meta["base"]["fingerprint"].startswith("sha256:")
    assert meta["rank"] == 4 and len(meta["targets"]) == 26
    assert set(load_file(str(step2 / TRAINABLE_FILE))) == set(meta["trainable"])
    assert all(n.startswith("projector.") for n in meta["trainable"])
    summary = run(tmp_path / "resumed", 4)  # the same output folder: resumes from step 2
    assert summary.losses and len(summary.losses) == 2

    a = load_file(str(tmp_path / "straight" / "final" / ADAPTER_FILE))
    b = load_file(str(tmp_path / "resumed" / "final" / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = load_file(str(tmp_path / "straight" / "final" / TRAINABLE_FILE))
    tb = load_file(str(tmp_path / "resumed" / "final" / TRAINABLE_FILE))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    la = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert len(la) == 4 and la == lb


def test_resume_refuses_to_switch_lora_and_a_new_stage_starts_from_merged_weights(small_ckpt, tmp_path):
    from stitch.train.trainer import Trainer

    quiet = {"console_print": lambda *_: None}
    first = load_config(None, data=_lora_run(small_ckpt, tmp_path / "a", train={"steps": 2},
                                             checkpoint={"every": 1}))
    Trainer(first, **quiet).fit()
    switched = load_config(None, data=tiny_config(small_ckpt, tmp_path / "a", train={"steps": 3}))
    with pytest.raises(StitchConfigError, match="cannot switch LoRA"):
        Trainer(switched, **quiet).setup()
    narrower = load_config(None, data=_lora_run(small_ckpt, tmp_path / "a", train={"steps": 3},
                                                lora={**BOTH, "modules": ["attention"]}))
    with pytest.raises(StitchConfigError, match="cannot change lora.parts/modules"):
        Trainer(narrower, **quiet).setup()
    bigger = load_config(None, data=_lora_run(small_ckpt, tmp_path / "a", train={"steps": 3}, lora={**BOTH, "rank": 8}))
    with pytest.raises(StitchConfigError, match="already has a rank-4"):
        Trainer(bigger, **quiet).setup()
    # A next stage from the LoRA final/ (no LoRA of its own): the merged weights, saved as a full checkpoint.
    nxt = Trainer(load_config(None, data=tiny_config(tmp_path / "a" / "final", tmp_path / "b",
                                                       train={"steps": 1})), **quiet)
    nxt.setup()
    assert not lora_layers(nxt.model)
    expected = merge_lora(_load(tmp_path / "a" / "final"))
    assert all(torch.equal(p, dict(expected.named_parameters())[n]) for n, p in nxt.model.named_parameters())


# ------------------------------------------------------------------------------------------- numerics
def test_activation_checkpointing_and_bf16_autocast_with_lora(small_ckpt):
    model = _load(small_ckpt).train()
    apply_lora(model, LoRAConfig(**{**BOTH, "dropout": 0.1}))
    _randomise_adapters(model)
    ids, pixels = _inputs(model.config, rows=3)
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100

    def grads(checkpointing: bool, autocast: bool) -> dict[str, torch.Tensor]:
        model.llm.gradient_checkpointing = model.vision.gradient_checkpointing = checkpointing
        torch.manual_seed(3)  # the same dropout masks in both runs (checkpointing replays them on recompute)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            model(ids, pixel_values=pixels, labels=labels, return_logits=False).loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    plain, recomputed = grads(False, False), grads(True, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plain) == set(recomputed) == trainable
    assert any(n.startswith("vision.") and is_adapter_name(n) for n in trainable)
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], atol=1e-6, rtol=1e-5)
    low = grads(True, True)
    assert set(low) == trainable
    cos = torch.nn.functional.cosine_similarity(torch.cat([low[n].flatten() for n in plain]),
                                                torch.cat([plain[n].flatten() for n in plain]), dim=0)
    assert cos > 0.99, cos
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


# ------------------------------------------------------------------------------------------- config and table
def test_parameter_table_shows_adapter_counts_per_part(small_ckpt, tmp_path):
    from rich.console import Console

    from stitch.train.stages import parameter_table
    from stitch.train.trainer import Trainer

    cfg = load_config(None, data=_lora_run(small_ckpt, tmp_path / "run"))
    trainer = Trainer(cfg, console_print=lambda *_: None)
    trainer.setup()
    counts, model = trainer.counts, trainer.model
    c_llm, c_vit = model.config.llm, model.config.vision
    q, kv = c_llm.num_heads * c_llm.head_dim, c_llm.num_kv_heads * c_llm.head_dim
    d, f, r = c_llm.hidden_size, c_llm.intermediate_size, 4
    per_llm_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    v, fv = c_vit.hidden_size, c_vit.intermediate_size
    per_vit_layer = r * (4 * 2 * v + 2 * (v + fv))
    assert counts["llm"].adapters == c_llm.num_layers * per_llm_layer == counts["llm"].trainable
    assert counts["vision"].adapters == c_vit.num_layers_used * per_vit_layer == counts["vision"].trainable
    assert counts["projector"].adapters == 0 and counts["projector"].frozen == 0
    # everything but adapters and the projector is frozen, and the optimizer holds exactly those
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if is_adapter_name(n) or n.startswith("proj")}
    console = Console(record=True, width=120)
    console.print(parameter_table(counts))
    text = console.export_text()
    assert "adapters" in text and text.count("LoRA") == 2, text
    assert f"{counts['llm'].adapters / 1e3:.2f}K" in text


def test_lora_config_errors_name_the_field(small_ckpt, tmp_path):
    from stitch.train.trainer import Trainer

    def setup(**lora):
        cfg = load_config(None, data=_lora_run(small_ckpt, tmp_path / "x", lora={**BOTH, **lora}))
        Trainer(cfg, console_print=lambda *_: None).setup()

    with pytest.raises(StitchConfigError, match="lora.modules: 'qkv' selects no linear layer"):
        setup(modules=["attention", "qkv"])
    with pytest.raises(StitchConfigError, match="lora.trainable: 'adapter' names no module"):
        setup(trainable=["adapter"])
    with pytest.raises(StitchConfigError, match="lora.parts includes llm"):
        load_config(None, data=_lora_run(small_ckpt, tmp_path / "x", unfreeze={"llm_last_layers": 1}))
    with pytest.raises(StitchConfigError, match="tensor parallelism"):
        load_config(None, data=_lora_run(small_ckpt, tmp_path / "x", parallel={"tp": 2}))
    with pytest.raises(StitchConfigError, match="lora.rank"):
        load_config(None, data=_lora_run(small_ckpt, tmp_path / "x", lora={"enabled": True, "rank": 0}))
    # explicit names: only v_proj in the LLM, with the embeddings and head trained in full
    cfg = load_config(None, data=_lora_run(small_ckpt, tmp_path / "y", lora={
        "enabled": True, "parts": ["llm"], "modules": ["v_proj"], "trainable": ["projector", "llm.lm_head"]}))
    trainer = Trainer(cfg, console_print=lambda *_: None)
    trainer.setup()
    assert list(lora_layers(trainer.model)) == ["llm.layers.0.self_attn.v_proj", "llm.layers.1.self_attn.v_proj"]
    assert isinstance(trainer.model.llm.layers[0].self_attn.v_proj, LoRALinear)
    assert trainer.model.llm.lm_head.weight.requires_grad and not trainer.model.llm.norm.weight.requires_grad


def test_8b_lora_recipe_counts_and_runs_at_tiny_scale(smol_tokenizer_dir, tmp_path):
    """configs/internvl-8b-lora-synthetic.yaml (the H200 LoRA-vs-full benchmark): the 8B shape gets rank-16
    adapters on all 7 projections of its 28 layers, and the recipe runs end to end at vlm-tiny scale."""
    from stitch.models.presets import vlm_preset
    from stitch.models.vlm import VLM
    from stitch.train.trainer import Trainer

    recipe = ROOT / "configs" / "internvl-8b-lora-synthetic.yaml"
    cfg = load_config(recipe, [f"output_dir={tmp_path / 'run'}"])
    assert cfg.lora.enabled and cfg.model.preset == "internvl-8b" and cfg.train.activation_checkpointing
    with torch.device("meta"):
        big = VLM(vlm_preset("internvl-8b"))
    counts = apply_lora(big, cfg.lora)
    llm = big.config.llm
    q, kv, d, f = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim, llm.hidden_size, llm.intermediate_size
    per_layer = 16 * ((d + q) + 2 * (d + kv) + (q + d) + 3 * (d + f))
    assert counts == {"vision": 0, "projector": 0, "llm": llm.num_layers * per_layer}  # 40.4M on 7.6B
    small = load_config(recipe, [
        f"output_dir={tmp_path / 'run'}", "model.preset=vlm-tiny", f"model.tokenizer={smol_tokenizer_dir}",
        "synthetic.min_tokens=24", "synthetic.max_tokens=24", "data.seq_length=24", "data.num_workers=0",
        "train.steps=2", "train.global_batch_size=2", "train.device=cpu", "train.precision=fp32", "log.progress=false",
    ])
    trainer = Trainer(small, console_print=lambda *_: None)
    trainer.fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_per_s"] > 0 and summary["peak_memory_gb"] > 0
    assert trainer.counts["llm"].adapters == trainer.counts["llm"].trainable > 0
    assert trainer.counts["vision"].trainable == 0 and not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------------------------------- FSDP2
def _fsdp_worker(out: Path) -> None:
    """Under torchrun: dp2 FSDP2 LoRA training of the tests/parallel tiny VLM, fp32 and bf16 mixed precision."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from stitch.parallel import parallelize, split_batch
    from tests.parallel.common import MAX_GRAD_NORM, STEPS, build, make_batch, make_optimizer
    from tests.parallel.common import tiny_config as parallel_config

    cfg = parallel_config()
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = build(cfg)
        apply_lora(model, LoRAConfig(**BOTH))
        _randomise_adapters(model)
        pm = parallelize(model, {"dp": 2, "fsdp": True}, device=torch.device("cpu"), param_dtype=dtype,
                         reduce_dtype=torch.float32 if dtype else None)
        opt = make_optimizer([p for p in pm.parameters() if p.requires_grad])
        losses = []
        for step in range(STEPS):
            batch = split_batch(make_batch(cfg, step), 2, cfg.tokens_per_tile, cfg.image_token_id)[pm.dp_rank]
            losses.append(pm.forward_backward(batch).loss.item())
            pm.clip_grad_norm_(MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
        state = get_model_state_dict(pm.model, options=StateDictOptions(full_state_dict=True))
        results[name] = {"losses": losses,
                         "adapters": {k: v.float().flatten()[:64].tolist() for k, v in state.items()
                                      if is_adapter_name(k)}}
    if dist.get_rank() == 0:
        (out / "fsdp_lora.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_fsdp2_lora_matches_one_process(tmp_path):
    from tests.parallel.common import MAX_GRAD_NORM, STEPS, build, make_batch, make_optimizer
    from tests.parallel.common import tiny_config as parallel_config

    env = {**os.environ, "OMP_NUM_THREADS": "1", "STITCH_TEST_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tests.train.test_lora", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads((tmp_path / "fsdp_lora.json").read_text())

    cfg = parallel_config()
    model = build(cfg)
    apply_lora(model, LoRAConfig(**BOTH))
    _randomise_adapters(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    losses = []
    for step in range(STEPS):
        out = model(**make_batch(cfg, step), return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert got["fp32"]["losses"] == pytest.approx(losses, abs=1e-5)
    state = model.state_dict()
    assert set(got["fp32"]["adapters"]) == {k for k in state if is_adapter_name(k)}
    for k, values in got["fp32"]["adapters"].items():
        torch.testing.assert_close(torch.tensor(values), state[k].flatten()[:64], atol=1e-5, rtol=0)
    # bf16 compute (fp32 master weights and gradient reduction): close to fp32, but not equal
    assert got["bf16"]["losses"] == pytest.approx(losses, abs=0.05) and got["bf16"]["losses"] != got["fp32"]["losses"]


if __name__ == "__main__":
    _fsdp_worker(Path(sys.argv[1]))
