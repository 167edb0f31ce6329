"""`stitch build` / `stitch.load` / bad input, through the real command line entry point."""

import json

import pytest
import torch

import stitch
from stitch.checkpoint.store import build_model
from stitch.cli import main
from stitch.models.presets import vlm_preset


def test_build_tiny_and_load(tmp_path):
    out = tmp_path / "ckpt"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "qwen2-tiny", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tile_tags"] == "nvlm" and cfg["llm"]["family"] == "qwen2"
    model, processor = stitch.load(out)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(model.config.image_token)
    assert model.config.llm.vocab_size % 64 == 0 and model.config.llm.vocab_size >= len(processor.tokenizer)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 3, model.config.llm.vocab_size)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vision", "nope-vit", "--llm", "llama-tiny"], "nope-vit"),
        (["--vision", "internvit-tiny", "--llm", "no-such-llm"], "no-such-llm"),
    ],
)
def test_build_bad_source_fails_cleanly(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["build", *args, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_load_rejects_non_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(stitch.errors.CheckpointError, match="config.json"):
        stitch.load(tmp_path)


def test_nvlm_d_72b_builds_on_meta_with_counts_per_part():
    model = build_model(vlm_preset("nvlm-d-72b"), device="meta")
    counts = model.num_parameters_per_part()
    assert 5.5e9 < counts["vision"] < 5.6e9  # InternViT-6B-448px-V1-5: 45 layers, 5.54B
    assert 72e9 < counts["llm"] < 73e9  # Qwen2-72B
    # LayerNorm(12800) -> Linear(12800, 29568) -> GELU -> Linear(29568, 8192)
    assert counts["projector"] == 2 * 12800 + 12800 * 29568 + 29568 + 29568 * 8192 + 8192


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_build_from_hf_vision_folder(tmp_path, kind):
    import transformers

    from stitch.models.vision import VisionEncoder  # noqa: F401 (the encoder under test)

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                 patch_size=14)
    if kind == "siglip":
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**small))
    else:
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**small))
    hf.save_pretrained(tmp_path / "vit")
    out = tmp_path / "ckpt"
    assert main(["build", "--vision", str(tmp_path / "vit"), "--llm", "llama-tiny", "--projector", "mlp2x_gelu",
                 "--tile-tags", "none", "--out", str(out)]) == 0
    model, _ = stitch.load(out)
    hf_state = hf.state_dict()
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("vision.")}
    assert ours
    # the patch embedding came from the HF file, not from a fresh init
    patch = next(v for k, v in hf_state.items() if k.endswith("patch_embedding.weight"))
    assert any(torch.equal(v, patch) for v in ours.values())


def test_outputs_never_replace_inputs_or_folders_of_other_files(tmp_path, capsys):
    """`--out` naming the input, a folder holding it, or a folder of other files is refused before any work, and
    everything there survives; an earlier output folder is replaced as before."""
    runs = tmp_path / "runs"
    ckpt = runs / "ckpt"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "llama-tiny", "--out", str(ckpt)]) == 0
    (runs / "notes.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args in (["reshard", str(ckpt), "--tp", "2", "--out", str(runs)],
                 ["export-hf", str(ckpt), "--format", "internvl", "--out", str(ckpt)],
                 ["export-hf", str(ckpt), "--format", "internvl", "--out", str(runs)]):
        capsys.readouterr()
        assert main(args) != 0
        err = capsys.readouterr().err
        assert str(runs) in err and ("replace the input" in err or "other files" in err), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (runs / "notes.txt").read_text() == "keep me" and stitch.load(ckpt)
    hf = tmp_path / "hf"
    for _ in range(2):  # the second export replaces the first
        assert main(["export-hf", str(ckpt), "--format", "internvl", "--out", str(hf)]) == 0
    assert (hf / "config.json").exists() and not list(tmp_path.glob(".hf.*"))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["llm"].update(rope_theta=-1), "rope_theta"),
    (lambda c: c["llm"].update(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (lambda c: c["llm"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (lambda c: c["projector"].update(downsample_ratio=0), "downsample_ratio"),
    (lambda c: c["projector"].update(downsample_ratio=0.3), "downsample_ratio"),
    (lambda c: c["projector"].update(downsample_ratio=0.125), "do not tile"),
])
def test_configs_the_model_cannot_run_are_refused_at_load(tmp_path, edit, message):
    """Values that passed validation but broke later (NaN logits, a KeyError at build, a reshape error at the
    first image) are refused when the config is read, naming the field."""
    out = tmp_path / "ckpt"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "llama-tiny", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(stitch.errors.StitchConfigError, match=message) as info:
        stitch.load(out)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("flag", [["--downsample-ratio", "0.3"], ["--downsample-ratio", "0"],
                                  ["--projector-hidden", "-5"], ["--max-tiles", "0"]])
def test_build_refuses_bad_flags_in_one_line(tmp_path, capsys, flag):
    out = tmp_path / "out"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "llama-tiny", *flag, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_tensor_files_are_unambiguous(tmp_path):
    """A tensor in two files is an error naming both (no silent last-file-wins); with an index, the index decides
    and a tensor it lists in a file that lacks it is named; a config that is not a JSON object is named."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "llama-tiny", "--out", str(out)]) == 0
    state = load_file(out / "model.safetensors")
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    save_file(zeros, out / "model.zbackup.safetensors")
    with pytest.raises(stitch.errors.CheckpointError, match="in both model.safetensors and model.zbackup"):
        stitch.load(out)
    weight_map = dict.fromkeys(state, "model.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = stitch.load(out)  # the index names model.safetensors: the zero copies are not read
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
    weight_map["llm.norm.weight"] = "model.zbackup.safetensors"
    del zeros["llm.norm.weight"]
    save_file(zeros, out / "model.zbackup.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(stitch.errors.CheckpointError, match="lists 'llm.norm.weight'"):
        stitch.load(out)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))
    with pytest.raises(stitch.errors.CheckpointError, match="weight_map"):
        stitch.load(out)
    (out / "model.safetensors.index.json").unlink()
    (out / "model.zbackup.safetensors").unlink()
    (out / "config.json").write_text("[]")
    with pytest.raises(stitch.errors.CheckpointError, match="config.json: expected a JSON object"):
        stitch.load(out)


def test_an_hf_folder_loads_with_its_processor_and_generates(tmp_path):
    """`stitch.load` on an HF InternVL folder (what `generate --help` promises): the model and a processor built
    from the folder's tokenizer and config; a text prompt answers as the Stitch checkpoint it came from."""
    from PIL import Image

    from stitch.infer.generate import generate

    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "llama-tiny", "--out", str(ckpt)]) == 0
    assert main(["export-hf", str(ckpt), "--format", "internvl", "--out", str(hf)]) == 0
    (m1, p1), (m2, p2) = stitch.load(ckpt), stitch.load(hf)
    assert m2.config.image_token_id == p2.tokenizer.convert_tokens_to_ids(m2.config.image_token)
    assert generate(m1, p1, None, "hello", max_new_tokens=6) == generate(m2, p2, None, "hello", max_new_tokens=6)
    assert isinstance(generate(m2, p2, [Image.new("RGB", (60, 40), (200, 10, 10))], "what is it?", max_new_tokens=3),
                      str)


def test_a_stray_dtype_is_cast_and_a_non_float_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "llama-tiny", "--out", str(out)]) == 0
    state = load_file(out / "model.safetensors")
    name = "llm.layers.0.mlp.up_proj.weight"
    state[name] = state[name].half()
    save_file(state, out / "model.safetensors")
    model, _ = stitch.load(out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the majority's dtype
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    state[name] = state[name].long()
    save_file(state, out / "model.safetensors")
    with pytest.raises(stitch.errors.CheckpointError, match=f"'{name}' is torch.int64"):
        stitch.load(out)


def test_peft_out_on_a_plain_checkpoint_writes_nothing(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["build", "--vision", "internvit-tiny", "--llm", "llama-tiny", "--out", str(out)]) == 0
    args = ["export-hf", str(out), "--format", "internvl", "--out", str(tmp_path / "hf"), "--peft-out",
            str(tmp_path / "peft")]
    assert main(args) != 0
    assert "not a LoRA checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "peft").exists()
