"""`stitch reshard`: any TP x PP to any TP x PP and back, bit for bit, through the real command."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stitch.checkpoint.reshard import open_weights, reshard_checkpoint
from stitch.checkpoint.store import save
from stitch.cli import main
from stitch.errors import CheckpointError
from tests.parallel.common import build, tiny_config


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _keys(path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())  # noqa: SIM118


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_identical(tmp_path, tied):
    """1 -> (tp2, pp2) -> (tp1, pp3 uneven) -> (tp2, pp1) -> 1, via the CLI; the final file equals the first."""
    save(build(tiny_config("tied" if tied else "base")), tmp_path / "orig")
    (tmp_path / "orig" / "tokenizer.json").write_text("{}")
    hops = [("a", ["--tp", "2", "--pp", "2"]),
            ("b", ["--tp", "1", "--pp", "3", "--layers-per-stage", "2,1,1"]),
            ("c", ["--tp", "2", "--pp", "1", "--vision-tp", "1"]),
            ("d", [])]
    src = tmp_path / "orig"
    for name, flags in hops:
        assert main(["reshard", str(src), *flags, "--out", str(tmp_path / name)]) == 0
        src = tmp_path / name
    assert _sha(tmp_path / "d" / "model.safetensors") == _sha(tmp_path / "orig" / "model.safetensors")
    assert (tmp_path / "d" / "tokenizer.json").exists() and not (tmp_path / "d" / "layout.json").exists()

    layout = json.loads((tmp_path / "b" / "layout.json").read_text())
    assert (layout["tp"], layout["pp"], layout["layers_per_stage"]) == (1, 3, [2, 1, 1])
    assert sorted(p.name for p in (tmp_path / "b").glob("tp*_pp*")) == ["tp0_pp0", "tp0_pp1", "tp0_pp2"]
    first, last = _keys(tmp_path / "b" / "tp0_pp0" / "model.safetensors"), _keys(
        tmp_path / "b" / "tp0_pp2" / "model.safetensors")
    assert "vision.layers.0.attn.q_proj.weight" in first and "llm.embed_tokens.weight" in first
    assert "llm.layers.1.mlp.up_proj.weight" in first and "llm.layers.2.mlp.up_proj.weight" not in first
    # Megatron-style renumbering: the last stage's only layer (global 3) is its layer 0.
    assert "llm.layers.0.mlp.up_proj.weight" in last and "llm.layers.3.mlp.up_proj.weight" not in last
    assert "llm.norm.weight" in last
    assert ("llm.lm_head.weight" in last) is True  # untied: the output layer; tied: a copy of the embedding


def test_tp_shards_and_head_padding_on_disk(tmp_path):
    model = build(tiny_config())
    save(model, tmp_path / "orig")
    reshard_checkpoint(tmp_path / "orig", tmp_path / "tp2", tp=2, pp=1)
    r0 = load_file(tmp_path / "tp2" / "tp0_pp0" / "model.safetensors")
    r1 = load_file(tmp_path / "tp2" / "tp1_pp0" / "model.safetensors")
    q = model.state_dict()["vision.layers.0.attn.q_proj.weight"]  # 5 heads x 8
    assert r0["vision.layers.0.attn.q_proj.weight"].shape == (24, 40)  # padded to 6 heads, 3 per rank
    torch.testing.assert_close(torch.cat([r0["vision.layers.0.attn.q_proj.weight"],
                                          r1["vision.layers.0.attn.q_proj.weight"][:16]]), q)
    assert r1["vision.layers.0.attn.q_proj.weight"][16:].count_nonzero() == 0
    assert r0["llm.layers.0.self_attn.o_proj.weight"].shape == (64, 32)  # row-parallel: input features split
    assert r0["llm.embed_tokens.weight"].shape == (64, 64)  # vocabulary-parallel
    torch.testing.assert_close(r0["llm.norm.weight"], r1["llm.norm.weight"])  # replicated
    # Lazy reassembly gives the original tensors back.
    weights = open_weights(tmp_path / "tp2")
    for name, value in model.state_dict().items():
        assert torch.equal(weights[name], value), name


def test_nonzero_padding_is_refused_not_dropped(tmp_path):
    save(build(tiny_config()), tmp_path / "orig")
    reshard_checkpoint(tmp_path / "orig", tmp_path / "tp2", tp=2, pp=1)
    shard = tmp_path / "tp2" / "tp1_pp0" / "model.safetensors"
    state = load_file(shard)
    state["vision.layers.1.attn.v_proj.weight"][-1, 0] = 1.0
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match="padded vision heads 5..5 hold non-zero values"):
        reshard_checkpoint(tmp_path / "tp2", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_impossible_layout_is_a_clear_cli_error(tmp_path, capsys):
    save(build(tiny_config()), tmp_path / "orig")
    assert main(["reshard", str(tmp_path / "orig"), "--tp", "3", "--out", str(tmp_path / "x")]) != 0
    assert "tensor parallelism 3 does not divide llm.num_heads = 4" in capsys.readouterr().err
    assert main(["reshard", str(tmp_path / "orig"), "--pp", "2", "--layers-per-stage", "1,1",
                 "--out", str(tmp_path / "x")]) != 0
    assert "sums to 2, but the LLM has 4 layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["reshard", "--help"])
    out = capsys.readouterr().out
    assert "Example:" in out and "--layers-per-stage" in out


def test_load_model_reads_a_resharded_folder(tmp_path):
    """`stitch.load` / `load_model` merge per-rank folders on read: same weights as the unsharded save."""
    from stitch.checkpoint.store import load_model, model_state

    model = build(tiny_config())
    save(model, tmp_path / "orig")
    assert main(["reshard", str(tmp_path / "orig"), "--tp", "2", "--pp", "2", "--out", str(tmp_path / "r")]) == 0
    loaded = model_state(load_model(tmp_path / "r"))
    for name, tensor in model_state(model).items():
        assert torch.equal(loaded[name], tensor), name


def test_every_rank_folder_and_the_layout_are_checked(tmp_path):
    """An extra or missing tensor in any rank's folder (not only tp0's), a tensor the model does not have, and a
    hand-edited layout.json are clear errors naming the file."""
    import shutil

    from stitch.checkpoint.store import load_model

    model = build(tiny_config())
    save(model, tmp_path / "orig")
    reshard_checkpoint(tmp_path / "orig", tmp_path / "r", tp=2, pp=2)

    def variant(name: str):
        shutil.copytree(tmp_path / "r", tmp_path / name)
        return tmp_path / name

    bad = variant("extra_tp1")
    weights = load_file(bad / "tp1_pp1" / "model.safetensors")
    save_file({**weights, "llm.bogus": torch.zeros(2)}, bad / "tp1_pp1" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tp1_pp1: tensor 'llm.bogus' is extra"):
        load_model(bad)
    bad = variant("extra_everywhere")
    for t in range(2):
        f = bad / f"tp{t}_pp0" / "model.safetensors"
        save_file({**load_file(f), "vision.bogus": torch.zeros(2)}, f)
    with pytest.raises(CheckpointError, match="unexpected tensor 'vision.bogus'"):
        load_model(bad)
    for edit, message in (({"tp": "2"}, "tp must be a positive integer"),
                          ({"layers_per_stage": [2]}, "layers_per_stage must list 2"),
                          ({"vision_tp": 0}, "vision_tp must be a positive integer")):
        bad = variant(f"layout_{next(iter(edit))}_{len(message)}")
        layout = json.loads((bad / "layout.json").read_text())
        (bad / "layout.json").write_text(json.dumps({**layout, **edit}))
        with pytest.raises(CheckpointError, match=message):
            load_model(bad)
